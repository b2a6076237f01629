"""Hybrid trainers: a convolutional pyramid beside the ViT, fused into a U-Net decoder (`HybridDecoder`).

nnU-Net's own stage blocks run on the input image at 1, 1/2, 1/4 and 1/8 of the patch (widths 32 / 64 / 128 / 256);
the ViT's concatenated taps enter below the last level, and each decoder step up fuses the conv map of its
resolution (UNETR's skips). The encoder is untouched: every supported checkpoint loads unchanged, and the new blocks
train at the decoder's learning rate with nnU-Net's initialisation.

* `MedDINOv3Trainer_hybrid` (2D configurations: ``2d``, ``2d_meddinov3``): 2D pyramid on the slice.
* `MedDINOv3Trainer_hybrid_3d` (3D configurations: ``3d_fullres``): the ViT runs on every slice of the 3D patch
  exactly as in 2D (one grey slice copied to the stem, as the pretrained weights saw it); a 3D pyramid with the
  plans' kernels and depth strides and a 3D decoder bring depth in at the pixel level. Chosen before any run: no
  2.5D stem input and no slice mixing, which measured no gain on their own (benchmarks/hippocampus_depth).
"""
from __future__ import annotations

from .base import MedDINOv3Trainer
from .variants import MedDINOv3Trainer_S
from .volumetric import MedDINOv3Trainer3DBase


class MedDINOv3Trainer_hybrid(MedDINOv3Trainer):
    """ViT-B/16 (MedDINOv3 weights required) + 2D conv pyramid + U-Net decoder."""
    decoder = "hybrid"


class MedDINOv3Trainer_hybrid_3d(MedDINOv3Trainer3DBase):
    """ViT-B/16 per slice (MedDINOv3 weights required) + 3D conv pyramid from the plans + 3D U-Net decoder."""
    decoder = "hybrid"
    context = 0
    mix_slices = False


class MedDINOv3Trainer_S_hybrid(MedDINOv3Trainer_hybrid):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_S_hybrid_3d(MedDINOv3Trainer_hybrid_3d):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint
