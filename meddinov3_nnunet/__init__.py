"""MedDINOv3 for stock nnU-Net v2: DINOv3 ViT encoder, multi-scale token decoder, CT pretraining.

Heavy imports (torch, timm) happen on first use of the public names below, so that the console
script and nnU-Net's trainer lookup stay fast.
"""
import warnings

__version__ = "0.1.0"

# timm's import triggers torch's deprecation notice for torch.jit.interface on every start; it is not ours to fix
warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.*", category=FutureWarning)

_LAZY = {
    "load_encoder": "meddinov3_nnunet.models.checkpoints",
    "read_checkpoint": "meddinov3_nnunet.models.checkpoints",
    "save_encoder": "meddinov3_nnunet.models.checkpoints",
    "build_encoder": "meddinov3_nnunet.models.encoder",
    "DINOv3Encoder": "meddinov3_nnunet.models.encoder",
    "EncoderArch": "meddinov3_nnunet.models.presets",
    "MedDINOv3Net": "meddinov3_nnunet.models.network",
    "build_network": "meddinov3_nnunet.models.network",
}

__all__ = sorted(_LAZY) + ["ext_trainer_dir"]


def ext_trainer_dir() -> str:
    """The folder to put in nnU-Net's `nnUNet_extTrainer` so that `-tr MedDINOv3Trainer` is found."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meddinov3_nnunet' has no attribute {name!r}")
