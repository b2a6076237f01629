"""`meddinov3-nnunet features`: a slice beside the first three principal components of its patch tokens as RGB.

The picture the MedDINOv3 and DINOv3 notebooks show: tokens of one block (default the last) of the chosen slices
are projected together on their first three principal components (so colours compare across slices), each
component stretched between its 1st and 99th percentile, and drawn at the encoder's input resolution (one
colour per 16x16 patch). Slices are preprocessed as in pretraining (CT window and z-score, MRI z-score per
volume) and resized so that the longer side is ``--size`` pixels (both sides multiples of 16).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="encoder checkpoint (any supported layout) or random:PRESET[:SEED]")
    parser.add_argument("volume", help="NIfTI / NRRD / MHA volume")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--slice", type=int, default=None, help="axial slice index (LPS order, 0 = feet)")
    which.add_argument("--slices", type=int, default=1,
                       help="this many evenly spaced axial slices (default 1: the middle)")
    parser.add_argument("--block", type=int, default=-1,
                        help="block whose tokens to show (0-based, -1 = last; default -1)")
    parser.add_argument("--size", type=int, default=448, help="encoder input size of the longer side, px (default 448)")
    parser.add_argument("--modality", choices=("auto", "ct", "mri"), default="auto",
                        help="preprocessing: ct (HU window + z-score), mri (per-volume z-score); "
                             "auto guesses (default)")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")


def input_size(height: int, width: int, longer: int) -> tuple[int, int]:
    """(H', W'): the longer side ``longer``, aspect kept, each side rounded to a multiple of 16 (at least 16)."""
    scale = longer / max(height, width)
    return tuple(max(16, int(round(side * scale / 16)) * 16) for side in (height, width))


def pca_rgb(tokens, components: int = 3) -> np.ndarray:
    """Tokens (N, D, h, w) -> (N, h, w, 3) in [0, 1]: projections on the first principal components of all
    N*h*w tokens together, each stretched between its 1st and 99th percentile."""
    import torch

    n, dim, h, w = tokens.shape
    flat = tokens.permute(0, 2, 3, 1).reshape(-1, dim).double()
    centred = flat - flat.mean(dim=0)
    _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vectors[:components].T
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    if scaled.shape[1] < 3:  # fewer tokens or channels than components: pad with grey
        scaled = torch.cat([scaled, torch.full((len(scaled), 3 - scaled.shape[1]), 0.5, dtype=scaled.dtype)], 1)
    return scaled.reshape(n, h, w, 3).float().numpy()


def choose_slices(depth: int, index: int | None, count: int) -> list[int]:
    from meddinov3_nnunet.errors import InputError

    if index is not None:
        if not 0 <= index < depth:
            raise InputError(f"--slice {index} is outside the volume's {depth} axial slices (0..{depth - 1})")
        return [index]
    if count < 1:
        raise InputError(f"--slices must be at least 1, got {count}")
    return sorted({int(round(z)) for z in np.linspace(0, depth - 1, count + 2)[1:-1]})


def feature_picture(encoder, normalised: np.ndarray, slice_indices: list[int], block: int, size: int) -> np.ndarray:
    """(rows*H', 2*W', 3) float image: each row the slice (grey, min-max over the shown slices) and its PCA map."""
    import torch
    import torch.nn.functional as F

    from meddinov3_nnunet.probing.encoders import resolve_blocks, token_maps

    slices = normalised[slice_indices]
    height, width = input_size(*slices.shape[1:], size)
    tokens = token_maps(encoder, slices, (height, width), resolve_blocks(encoder, [block]))
    colours = pca_rgb(tokens)  # (N, h, w, 3)
    patch = encoder.patch_size
    colours = colours.repeat(patch, axis=1).repeat(patch, axis=2)
    grey = F.interpolate(torch.from_numpy(slices)[:, None], size=(height, width), mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-12)
    rows = [np.concatenate([np.repeat(g[..., None], 3, axis=2), c], axis=1) for g, c in zip(grey, colours)]
    return np.concatenate(rows, axis=0)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meddinov3_nnunet.atomic_io import atomic_path
    from meddinov3_nnunet.errors import InputError
    from meddinov3_nnunet.probing.encoders import open_encoder, read_normalised

    if args.size < 16:
        raise InputError(f"--size {args.size} is smaller than one 16-pixel patch")
    if not Path(args.output).name.lower().endswith(".png"):
        raise InputError(f"-o {args.output}: the picture is written as PNG; name it *.png")
    encoder, label = open_encoder(args.checkpoint)
    normalised, modality = read_normalised(args.volume, args.modality)
    indices = choose_slices(len(normalised), args.slice, args.slices)
    picture = feature_picture(encoder, normalised, indices, args.block, args.size)
    with atomic_path(args.output) as tmp:
        plt.imsave(tmp, picture, format="png")
    print(f"{args.output}: {picture.shape[1]}x{picture.shape[0]} px, slices {indices} of {len(normalised)} "
          f"({modality}), block {args.block} of {label}, PCA of {len(indices)} x "
          f"{picture.shape[0] // len(indices) // 16}x{picture.shape[1] // 32} tokens")
    return 0
