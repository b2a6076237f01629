"""TRAINER_NAMES is derived from the trainer modules, and nnU-Net's trainer folder re-exports exactly those."""
import importlib.util
from pathlib import Path

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import meddinov3_nnunet
from meddinov3_nnunet import trainers


def test_every_trainer_class_of_the_package_is_listed_once():
    assert len(trainers.TRAINER_NAMES) == len(set(trainers.TRAINER_NAMES)) and trainers.__all__ == trainers.TRAINER_NAMES
    for name in trainers.TRAINER_NAMES:
        assert issubclass(getattr(trainers, name), nnUNetTrainer) and getattr(trainers, name).__name__ == name
    assert {"MedDINOv3Trainer", "MedDINOv3Trainer_smoke", "DINOv3Trainer", "nnUNetTrainer_budget",
            "meddinov3_base_primus_multiscale_Trainer"} <= set(trainers.TRAINER_NAMES)
    assert "nnUNetTrainer" not in trainers.TRAINER_NAMES and "FromScratch" not in trainers.TRAINER_NAMES
    assert not any(name.endswith("Base") for name in trainers.TRAINER_NAMES)


def test_the_nnunet_trainer_folder_exposes_the_same_classes():
    # nnU-Net imports each module of the nnUNet_extTrainer folder by file and looks the trainer up by name
    path = Path(meddinov3_nnunet.ext_trainer_dir()) / "meddinov3_nnunet_trainers.py"
    spec = importlib.util.spec_from_file_location("meddinov3_nnunet_trainers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exposed = {name for name, value in vars(module).items() if isinstance(value, type) and issubclass(value, nnUNetTrainer)}
    assert exposed == set(trainers.TRAINER_NAMES)
    assert module.MedDINOv3Trainer is trainers.MedDINOv3Trainer
