"""Benchmark-only trainers: from-scratch ViT-S forms and ablations that the CPU benchmarks run
(benchmarks/hippocampus*). Users pick from `base`, `variants`, `volumetric` and `hybrid`."""
from __future__ import annotations

from meddinov3_nnunet.nnunet.finetune import FinetuneRecipe

from .hybrid import MedDINOv3Trainer_S_hybrid, MedDINOv3Trainer_S_hybrid_3d
from .variants import FromScratch, MedDINOv3Trainer_S, MedDINOv3Trainer_tiny, MedDINOv3Trainer_tiny_scratch
from .volumetric import (MedDINOv3Trainer_3d, MedDINOv3Trainer_S_25d, MedDINOv3Trainer_S_3d, MedDINOv3Trainer_S_patch8,
                         MedDINOv3Trainer_S_proj, MedDINOv3Trainer_skip, MedDINOv3Trainer_slicemix)


# -- 2D ViT-S from scratch and the pretraining ablation (benchmarks/hippocampus) ----------------------------
class MedDINOv3Trainer_S_scratch(FromScratch, MedDINOv3Trainer_S):
    """ViT-S/16 from scratch (CPU benchmark rows)."""


class MedDINOv3Trainer_S_singlescale_scratch(MedDINOv3Trainer_S_scratch):
    multiscale = False


class MedDINOv3Trainer_tiny_enclr3e4(MedDINOv3Trainer_tiny):
    """Pretraining ablation: a pretrained tiny encoder at the from-scratch encoder lr 3e-4 (the paper's recipe uses
    3e-5 for pretrained weights), so that against `MedDINOv3Trainer_tiny_scratch_ls1` only the initialisation differs."""
    recipe = FinetuneRecipe(encoder_lr=3e-4)


class MedDINOv3Trainer_tiny_scratch_ls1(MedDINOv3Trainer_tiny_scratch):
    """Pretraining ablation: random tiny encoder whose LayerScale starts at 1.0, where the tiny_cpu pretraining starts
    (the preset's random start is 1e-5)."""
    layerscale_init = 1.0


# -- depth and token-size designs (benchmarks/hippocampus_depth) -----------------------------------------
class MedDINOv3Trainer_3d_scratch(FromScratch, MedDINOv3Trainer_3d):
    pass


class MedDINOv3Trainer_S_3d_scratch(FromScratch, MedDINOv3Trainer_S_3d):
    pass


class MedDINOv3Trainer_S_25d_scratch(FromScratch, MedDINOv3Trainer_S_25d):
    pass


class MedDINOv3Trainer_S_slicemix_scratch(FromScratch, MedDINOv3Trainer_slicemix):
    encoder_preset = "vit_s16"


class MedDINOv3Trainer_S_patch8_scratch(FromScratch, MedDINOv3Trainer_S_patch8):
    pass


class MedDINOv3Trainer_S_patch4_scratch(FromScratch, MedDINOv3Trainer_S_patch8):
    """Benchmark row beyond issue 9: patch 4 (16x the tokens of patch 16), decoder with two 2x stages."""
    encoder_patch_size = 4


class MedDINOv3Trainer_S_skip_scratch(FromScratch, MedDINOv3Trainer_skip):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_S_patch8_skip_scratch(MedDINOv3Trainer_S_patch8_scratch):
    """Benchmark row: patch 8 + the image skip (lost to both alone in its one run; no user trainer)."""
    image_skip = True


class MedDINOv3Trainer_S_patch4_skip_scratch(MedDINOv3Trainer_S_patch4_scratch):
    image_skip = True


class MedDINOv3Trainer_S_proj_scratch(FromScratch, MedDINOv3Trainer_S_proj):
    pass


# -- hybrids (benchmarks/hippocampus_hybrid) ---------------------------------------------------------------
class MedDINOv3Trainer_S_hybrid_scratch(FromScratch, MedDINOv3Trainer_S_hybrid):
    pass


class MedDINOv3Trainer_S_hybrid_3d_scratch(FromScratch, MedDINOv3Trainer_S_hybrid_3d):
    pass


class MedDINOv3Trainer_S_hybrid_novit_scratch(MedDINOv3Trainer_S_hybrid_scratch):
    """Ablation: the 2D hybrid's conv path and decoder with zeros in place of the ViT's tokens (a U-Net alone)."""
    vit_tokens = False


class MedDINOv3Trainer_S_hybrid_3d_novit_scratch(MedDINOv3Trainer_S_hybrid_3d_scratch):
    """Ablation: the 3D hybrid's conv path and decoder with zeros in place of the ViT's tokens."""
    vit_tokens = False


class MedDINOv3Trainer_S_patch8_hybrid_scratch(MedDINOv3Trainer_S_hybrid_scratch):
    """The 2D hybrid with 8-px tokens: a three-level pyramid (1, 1/2, 1/4)."""
    encoder_patch_size = 8


class MedDINOv3Trainer_S_hybrid_ds_scratch(MedDINOv3Trainer_S_hybrid_scratch):
    """The 2D hybrid with nnU-Net's deep supervision (logits at 1/2, 1/4, 1/8 as well): the first remedy tried for
    its slow starts."""
    deep_supervision = True


class MedDINOv3Trainer_S_hybrid_3d_ds_scratch(MedDINOv3Trainer_S_hybrid_3d_scratch):
    """The 3D hybrid with nnU-Net's deep supervision."""
    deep_supervision = True


class MedDINOv3Trainer_S_hybrid_inject_scratch(MedDINOv3Trainer_S_hybrid_scratch):
    """The 2D hybrid with PrimusV3-style token injection: the conv path's 1/16 features added to the patch
    embeddings through a projection that starts at zero."""
    token_injection = True


# -- pretraining on a small dataset (issue 22, benchmarks/hippocampus/pretraining_small_data) ------------------
class MedDINOv3Trainer_S_hybrid_3d_enclr3e4(MedDINOv3Trainer_S_hybrid_3d):
    """The 3D hybrid from a ViT-S encoder of this project's `small_data` pretraining, at the from-scratch encoder lr
    3e-4, so that against `MedDINOv3Trainer_S_hybrid_3d_scratch_ls01` only the initialisation differs."""
    recipe = FinetuneRecipe(encoder_lr=3e-4)


class MedDINOv3Trainer_S_hybrid_3d_scratch_ls01(MedDINOv3Trainer_S_hybrid_3d_scratch):
    """The 3D hybrid from a random ViT-S whose LayerScale starts at 0.1, where the `small_data` pretraining starts."""
    layerscale_init = 0.1


class MedDINOv3Trainer_S_enclr3e4(MedDINOv3Trainer_S):
    """The paper's 2D design (ViT tokens only, no conv path) from a `small_data` export at the from-scratch encoder lr
    3e-4: where the encoder is all the network has, so an encoder that helps shows most; pairs with
    `MedDINOv3Trainer_S_scratch_ls01`."""
    recipe = FinetuneRecipe(encoder_lr=3e-4)


class MedDINOv3Trainer_S_scratch_ls01(MedDINOv3Trainer_S_scratch):
    """The paper's 2D design from a random ViT-S whose LayerScale starts at 0.1, where the `small_data` pretraining
    starts."""
    layerscale_init = 0.1
