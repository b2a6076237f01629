"""Encoders and slices for `features` and `probe`: the checkpoint or random initialisation, the pretraining
corpus's normalisation, and patch-token maps at a chosen input size."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.models.checkpoints import load_encoder
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import SIZES, default_tap_blocks, preset
from meddinov3_nnunet.pretraining.config import CorpusConfig
from meddinov3_nnunet.pretraining.volumes import guess_modality, normalise_slice, volume_normalisation
from meddinov3_nnunet.volume_io import read_volume

RANDOM_PREFIX = "random:"


def open_encoder(spec: str) -> tuple[DINOv3Encoder, str]:
    """(encoder in eval mode, label) for a checkpoint file in any supported layout, or ``random:PRESET[:SEED]``
    (e.g. ``random:vit_tiny16:0``), a random initialisation for baselines and pictures without weights."""
    if spec.startswith(RANDOM_PREFIX):
        name, _, seed = spec[len(RANDOM_PREFIX):].partition(":")
        if name not in SIZES:
            raise InputError(f"{spec}: unknown preset {name!r}; use random:PRESET[:SEED] with one of {sorted(SIZES)}")
        if seed and not seed.isdigit():
            raise InputError(f"{spec}: the seed must be a whole number, e.g. random:{name}:0")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed or 0))
        encoder = DINOv3Encoder(preset(name))
        torch.random.set_rng_state(generator_state)
        return encoder.eval(), f"random init ({name}, seed {int(seed or 0)})"
    if not Path(spec).is_file():
        raise InputError(f"{spec}: no such checkpoint file (or use random:PRESET[:SEED] for a random encoder)")
    return load_encoder(spec).eval(), Path(spec).name


def read_normalised(path: str | Path, modality: str = "auto") -> tuple[np.ndarray, str]:
    """(normalised float32 (Z, H, W), modality) of a volume in LPS (axial slices along axis 0), normalised as the
    pretraining corpus does: CT window [-1000, 1000] HU and z-score (65.108, 178.017), MRI clipped to its 0.5/99.5
    percentiles and z-scored per volume. ``modality`` 'auto' applies the corpus's guess."""
    raw = read_volume(path, orient_lps=True).array
    modality = guess_modality(raw) if modality == "auto" else modality
    norm = volume_normalisation(raw, modality, asdict(CorpusConfig()))
    if norm is None:
        raise InputError(f"{path}: constant volume (no intensity variation); nothing to show or probe")
    return normalise_slice(raw, norm), modality


def resolve_blocks(encoder: DINOv3Encoder, blocks: Sequence[int] | None) -> list[int]:
    """Block indices (0-based; negative counts from the end); None: the decoder's tap blocks."""
    depth = len(encoder.blocks)
    if blocks is None:
        return list(default_tap_blocks(depth)) if depth % 4 == 0 else [depth - 1]
    resolved = [b + depth if b < 0 else b for b in blocks]
    bad = [b for b, r in zip(blocks, resolved) if not 0 <= r < depth]
    if bad:
        raise InputError(f"block {bad[0]} does not exist: the encoder has blocks 0..{depth - 1} (or -1 for the last)")
    return resolved


@torch.no_grad()
def token_maps(encoder: DINOv3Encoder, slices: np.ndarray, size: tuple[int, int], blocks: Sequence[int],
               batch: int = 32) -> torch.Tensor:
    """Normed patch tokens (N, D * len(blocks), h, w) of slices (N, H, W) resized (bilinear) to ``size``,
    grey copied to the three input channels as the trainers do."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(slices), batch):
        x = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch], dtype=np.float32))[:, None]
        x = F.interpolate(x.to(device), size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        layers = encoder.get_intermediate_layers(x, n=list(blocks), reshape=True, norm=True)
        out.append(torch.cat(layers, dim=1).float().cpu())
    return torch.cat(out)
