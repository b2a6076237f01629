"""Trainer variants: each changes one thing of `MedDINOv3Trainer`, named after that thing (nnU-Net style)."""
from meddinov3_nnunet.nnunet.finetune import FinetuneRecipe

from .base import MedDINOv3Trainer


class FromScratch:
    """Mixin (put first): random encoder, trained at the decoder's learning rate (as the reference's scratch run)."""
    encoder_weights = "none"
    recipe = FinetuneRecipe(encoder_lr=3e-4)


class MedDINOv3Trainer_S(MedDINOv3Trainer):
    """ViT-S/16 encoder (weights: your own pretraining export, or Meta's ViT-S)."""
    encoder_preset = "vit_s16"
    weights_hint = "a ViT-S/16 encoder (`meddinov3-nnunet export` or Meta's dinov3_vits16_pretrain_*.pth)"


class MedDINOv3Trainer_L(MedDINOv3Trainer):
    """ViT-L/16 encoder; the decoder taps blocks 5, 11, 17, 23."""
    encoder_preset = "vit_l16"
    weights_hint = "a ViT-L/16 encoder (`meddinov3-nnunet export` or Meta's dinov3_vitl16_pretrain_*.pth)"


class MedDINOv3Trainer_singlescale(MedDINOv3Trainer):
    """Ablation: the decoder reads the last block only."""
    multiscale = False


class MedDINOv3Trainer_scratch(FromScratch, MedDINOv3Trainer):
    """Ablation: ViT-B/16 from scratch."""


class DINOv3Trainer(MedDINOv3Trainer):
    """Meta's natural-image DINOv3 ViT-B/16 weights (registers kept), encoder lr 1e-4."""
    encoder_flavour = "meta"
    weights_env_var = "DINOV3_WEIGHTS"
    weights_hint = "Meta's dinov3_vitb16_pretrain_lvd1689m-*.pth (github.com/facebookresearch/dinov3)"
    recipe = FinetuneRecipe(encoder_lr=1e-4)


class MedDINOv3Trainer_5epochs(MedDINOv3Trainer):
    epochs = 5


class MedDINOv3Trainer_tiny(MedDINOv3Trainer):
    """Tiny encoder (96 dim, 4 blocks, 3 heads): the size the pretraining module's tiny_cpu preset trains."""
    encoder_preset = "vit_tiny16"
    drop_path_rate = 0.0
    weights_hint = "a tiny encoder exported by `meddinov3-nnunet export` (pretraining config tiny_cpu)"


class MedDINOv3Trainer_tiny_scratch(FromScratch, MedDINOv3Trainer_tiny):
    """Tiny encoder from scratch (the benchmark's comparison row for the pretrained tiny encoder)."""


class SmokeBudget:
    """Mixin (put first) of the smoke trainers: 3 epochs of 12 iterations (2 validation), a checkpoint every epoch,
    encoder at the decoder's learning rate, no test-time mirroring; loads encoder weights when some are configured
    (e.g. a tiny pretraining export), else random. The trainer sets its batch size."""
    encoder_weights = "optional"
    epochs = 3
    iterations_per_epoch = 12
    val_iterations_per_epoch = 2
    checkpoint_every = 1
    recipe = FinetuneRecipe(encoder_lr=3e-4)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's augmentation for training; validation and prediction without test-time mirroring (nnU-Net's
        code, not this plugin's: 4 forward passes per tile in 2D, 8 in 3D, most of a smoke run's time)."""
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configured


class MedDINOv3Trainer_smoke(SmokeBudget, MedDINOv3Trainer_tiny):
    """Tiny encoder, a few iterations: checks an install or a pipeline on a CPU in about a minute.
    Loads encoder weights when some are configured (e.g. a tiny pretraining export), else random."""
    batch_size_override = 8


# Names of the official MedDINOv3 repository, for existing scripts.
class meddinov3_base_primus_multiscale_Trainer(MedDINOv3Trainer):
    """Alias of MedDINOv3Trainer."""


class dinov3_base_primus_multiscale_Trainer(DINOv3Trainer):
    """Alias of DINOv3Trainer."""
