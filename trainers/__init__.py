"""nnU-Net trainer classes of meddinov3-nnunet (installed as `meddinov3_nnunet.trainers`).

nnU-Net finds them through `nnUNet_extTrainer` pointing at `meddinov3_nnunet.ext_trainer_dir()`.
"""
from .base import MedDINOv3Trainer
from .budget import nnUNetTrainer_budget
from .variants import (DINOv3Trainer, MedDINOv3Trainer_5epochs, MedDINOv3Trainer_L, MedDINOv3Trainer_S,
                       MedDINOv3Trainer_S_scratch, MedDINOv3Trainer_S_singlescale_scratch, MedDINOv3Trainer_scratch,
                       MedDINOv3Trainer_singlescale, MedDINOv3Trainer_smoke, MedDINOv3Trainer_tiny,
                       MedDINOv3Trainer_tiny_scratch, dinov3_base_primus_multiscale_Trainer,
                       meddinov3_base_primus_multiscale_Trainer)

TRAINER_NAMES = [
    "MedDINOv3Trainer", "MedDINOv3Trainer_S", "MedDINOv3Trainer_L", "MedDINOv3Trainer_singlescale",
    "MedDINOv3Trainer_scratch", "MedDINOv3Trainer_S_scratch", "MedDINOv3Trainer_S_singlescale_scratch",
    "MedDINOv3Trainer_tiny", "MedDINOv3Trainer_tiny_scratch", "DINOv3Trainer", "MedDINOv3Trainer_5epochs",
    "MedDINOv3Trainer_smoke",
    "meddinov3_base_primus_multiscale_Trainer", "dinov3_base_primus_multiscale_Trainer", "nnUNetTrainer_budget",
]
__all__ = TRAINER_NAMES
