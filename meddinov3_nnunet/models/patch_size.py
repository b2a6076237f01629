"""Finer tokens from the released patch-16 weights: FlexiViT's pseudo-inverse resize of the patch embedding.

`with_patch_size` turns an `EncoderCheckpoint` of patch size 16 into one of patch size 8 (or any other) with
timm's `resample_patch_embed` (bicubic, antialiased resize matrix, pseudo-inverse): an 8x8 patch then gives about
the token the 16x16 patch of the same content at twice the resolution gave. Every other tensor is unchanged;
DINOv3's RoPE uses grid coordinates normalised to [-1, 1], so it needs no change for a finer grid.
"""
from __future__ import annotations

import dataclasses

from timm.layers import resample_patch_embed

from .checkpoints import EncoderCheckpoint

PATCH_EMBED_KEY = "patch_embed.proj.weight"


def with_patch_size(checkpoint: EncoderCheckpoint, patch_size: int) -> EncoderCheckpoint:
    """The checkpoint unchanged when its patch size already is ``patch_size``, else a copy with the patch
    embedding resampled (``meta['resampled_patch_size']`` records ``[old, new]``)."""
    old = checkpoint.arch.patch_size
    if old == patch_size:
        return checkpoint
    if patch_size < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    weight = checkpoint.state_dict[PATCH_EMBED_KEY]
    resampled = resample_patch_embed(weight.float(), [patch_size, patch_size], interpolation="bicubic",
                                     antialias=True).to(weight.dtype)
    state = dict(checkpoint.state_dict)
    state[PATCH_EMBED_KEY] = resampled
    return dataclasses.replace(checkpoint, arch=checkpoint.arch.replace(patch_size=patch_size), state_dict=state,
                               meta={**checkpoint.meta, "resampled_patch_size": [old, patch_size]})
