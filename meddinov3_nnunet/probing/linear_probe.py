"""Frozen-encoder linear probe on an nnU-Net raw dataset: how much of a segmentation a 1x1 convolution can read
from the patch tokens. Used by `meddinov3-nnunet probe`, the pretraining loop (`evaluation.probe_every`) and
`benchmarks/pretraining/linear_probe.py`.

Protocol:
* cases: those with a label map in ``labelsTr``, channel 0 of ``imagesTr``; a fixed split by case, every 5th
  case of the sorted list (the 5th, 10th, ...) for testing and the others for training, or a given list;
* slices: every axial slice (LPS), normalised as the pretraining corpus does (CT window + z-score, MRI z-score
  per volume; the modality from dataset.json's channel name);
* features: each slice resized to ``size`` x ``size`` (bilinear), the normed patch tokens of the decoder's tap
  blocks (the last block of each quarter of the depth) concatenated, bilinearly upsampled back to the slice's
  pixels; the encoder stays frozen;
* probe: a 1x1 convolution (multinomial logistic regression per pixel) on standardised features of
  ``train_pixels`` pixels drawn at random (fixed seed) from the training cases, balanced class weights and an
  L2 penalty of 1/(2C) per pixel, fitted to convergence with L-BFGS: scikit-learn's
  ``LogisticRegression(C=1, class_weight="balanced")`` objective;
* metric: 3D Dice per test case and foreground label (both empty counts as 1), averaged over cases; the mean
  over labels; pixel accuracy.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.pretraining.corpus import _nnunet_modality as nnunet_modality
from meddinov3_nnunet.probing.encoders import read_normalised, resolve_blocks, token_maps
from meddinov3_nnunet.volume_io import read_volume

# slices (Z, H, W) -> per slice a feature map (D, H, W) at the slice's own pixels, in slice order (an iterable:
# consumers take one slice at a time, so a featuriser may produce them lazily)
Featuriser = Callable[[np.ndarray], Iterable[torch.Tensor]]


@dataclass
class ProbeData:
    """Normalised slices and label maps per case, the foreground labels (name -> value) and the modality."""

    cases: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: dict[str, int]
    modality: str


def load_dataset(folder: str | Path, max_cases: int | None = None) -> ProbeData:
    """Reads an nnU-Net raw dataset (``dataset.json``, ``imagesTr``, ``labelsTr``); ``max_cases``: the first N."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        raise InputError(f"{folder}: no dataset.json; pass an nnU-Net raw dataset folder (nnUNet_raw/DatasetXXX_Name)")
    meta = json.loads((folder / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    modality = nnunet_modality(meta.get("channel_names") or meta.get("modality") or {}, 0)
    labels = {name: int(value) for name, value in meta.get("labels", {}).items() if int(value) != 0}
    names = sorted(p.name[:-len(ending)] for p in (folder / "labelsTr").glob(f"*{ending}"))[:max_cases]
    if len(names) < 2:
        raise InputError(f"{folder / 'labelsTr'}: {len(names)} label maps ({ending}); the probe needs at least two "
                         f"cases (one to train, one to test)")
    cases = {}
    for name in names:
        image, _ = read_normalised(folder / "imagesTr" / f"{name}_0000{ending}", modality)
        label = read_volume(folder / "labelsTr" / f"{name}{ending}", orient_lps=True).array
        if image.shape != label.shape:
            raise InputError(f"{folder}: case {name}: image {image.shape} and label map {label.shape} differ")
        cases[name] = (image, label.astype(np.uint8))
    return ProbeData(cases, labels, modality)


def split_cases(cases: Sequence[str], test_cases: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(training, test) cases: the given test cases, or every 5th case of the sorted list."""
    ordered = sorted(cases)
    held_out = set(ordered[4::5] if test_cases is None else test_cases)
    train, test = [c for c in ordered if c not in held_out], [c for c in ordered if c in held_out]
    if not train or not test:
        raise InputError(f"the case split leaves {len(train)} training and {len(test)} test cases; use at least "
                         f"5 cases or give test cases that exist ({', '.join(ordered[:3])}, ...)")
    return train, test


def encoder_featuriser(encoder, size: int, blocks: Sequence[int] | None = None, batch: int = 64,
                       upsample_slices: int = 1) -> Featuriser:
    """Token maps of ``batch`` slices per encoder pass, upsampled to the slices' pixels ``upsample_slices`` at a
    time and handed out one slice at a time: a case never exists at full resolution all at once (ViT-B's four
    taps at 512^2 are 3.2 GB per slice). Bilinear upsampling is per slice, so the chunking changes no number."""
    taps = resolve_blocks(encoder, blocks)

    def featurise(slices: np.ndarray) -> Iterator[torch.Tensor]:
        for start in range(0, len(slices), batch):
            grid = token_maps(encoder, slices[start:start + batch], (size, size), taps, batch)
            for first in range(0, len(grid), upsample_slices):
                yield from F.interpolate(grid[first:first + upsample_slices], size=slices.shape[1:],
                                         mode="bilinear", align_corners=False)

    return featurise


def intensity_featuriser(slices: np.ndarray) -> list[torch.Tensor]:
    """The normalised intensity as the only feature: the floor any encoder has to beat."""
    return [torch.from_numpy(s)[None] for s in slices]


@dataclass
class LinearProbe:
    """Standardisation and a 1x1 convolution from D features to K classes."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    iterations: int

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Features (D, H, W) -> class map (H, W)."""
        x = (features - self.mean[:, None, None]) / self.std[:, None, None]
        return F.conv2d(x[None], self.weight[:, :, None, None], self.bias)[0].argmax(0)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 1.0, max_iter: int = 3000) -> LinearProbe:
    """Minimises mean_i w_{y_i} CE_i + ||W||^2 / (2 C N) (balanced w; no penalty on the bias) with L-BFGS."""
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    x = (x - mean) / std
    counts = torch.bincount(y, minlength=num_classes).double()
    present = int((counts > 0).sum())
    class_weight = torch.where(counts > 0, len(y) / (present * counts.clamp_min(1)), 0).float()
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y, weight=class_weight, reduction="sum") / len(y)
        loss = loss + (weight ** 2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    optimiser.step(closure)
    iterations = int(optimiser.state[weight]["n_iter"])
    return LinearProbe(mean, std, weight.detach(), bias.detach(), iterations)


def sample_pixels(featurise: Featuriser, data: ProbeData, cases: Sequence[str], train_pixels: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``train_pixels`` (features, label) pairs drawn uniformly from the cases' pixels (fixed seed)."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, train_pixels / sum(data.cases[c][1].size for c in cases))
    xs, ys = [], []
    for case in cases:
        slices, labels = data.cases[case]
        for features, label in zip(featurise(slices), labels):
            chosen = torch.from_numpy(rng.random(label.size) < keep)
            xs.append(features.flatten(1).T[chosen])
            ys.append(torch.from_numpy(label.reshape(-1).astype(np.int64))[chosen])
    return torch.cat(xs), torch.cat(ys)


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    denominator = int(predicted.sum() + truth.sum())
    return 2.0 * float(np.logical_and(predicted, truth).sum()) / denominator if denominator else 1.0


@torch.no_grad()
def score(probe: LinearProbe, featurise: Featuriser, data: ProbeData, cases: Sequence[str]) -> dict:
    per_label: dict[str, list[float]] = {name: [] for name in data.labels}
    correct = total = 0
    for case in cases:
        slices, labels = data.cases[case]
        predicted = np.stack([probe.predict(f).numpy() for f in featurise(slices)])
        correct += int((predicted == labels).sum())
        total += labels.size
        for name, value in data.labels.items():
            per_label[name].append(dice(predicted == value, labels == value))
    dices = {name: float(np.mean(values)) for name, values in per_label.items()}
    return {"dice": dices, "dice_mean": float(np.mean(list(dices.values()))), "pixel_accuracy": correct / total}


def run_probe(name: str, featurise: Featuriser, data: ProbeData, train_cases: Sequence[str],
              test_cases: Sequence[str], train_pixels: int = 100_000, seed: int = 0) -> dict:
    """Fits the probe on the training cases' pixels and scores it on the test cases; one result row."""
    started = time.time()
    with torch.no_grad():
        x, y = sample_pixels(featurise, data, train_cases, train_pixels, seed)
    probe = fit_probe(x, y, num_classes=max([0, *data.labels.values()]) + 1)
    return {"features": name, "feature_dim": int(x.shape[1]), "train_pixels": int(len(y)),
            **score(probe, featurise, data, test_cases), "test_cases": len(test_cases),
            "solver_iterations": probe.iterations, "seconds": round(time.time() - started, 1)}
