"""Linear probe of frozen encoder features on Dataset004_Hippocampus: how much of the hippocampus segmentation a
per-pixel logistic regression can read from the patch features, pretrained vs randomly initialised.

Protocol (decided for this benchmark):
* slices: every axial slice (LPS, as the pretraining corpus) of every case, normalised exactly as the corpus
  normalises it (per-volume robust z-score for this MRI);
* features: the slice resized to ``--size`` x ``--size`` (bilinear), the encoder's normed patch tokens of the
  decoder's tap blocks (the last block of each quarter of the depth) concatenated, bilinearly upsampled from
  the 16-pixel patch grid back to the slice's own pixels; the encoder stays frozen;
* probe: scikit-learn multinomial logistic regression (balanced class weights: ~5% of the pixels are
  hippocampus) on standardised features of ``--train-pixels`` pixels sampled at random (fixed seed) from
  the training cases; 3 classes (background, anterior, posterior);
* split by case: the cases in ``--test-cases`` (every 5th case; also excluded from the pretraining corpus)
  are only used for evaluation, the others only for training the probe;
* metric: 3D Dice per test case for labels 1 and 2 (mean over cases), plus pixel accuracy.

Rows: each ``--encoder`` file, a random initialisation of the same architecture (``--random-seed``), and an
intensity-only probe (the pixel's normalised intensity as the single feature) for scale.

    python benchmarks/pretraining/linear_probe.py --encoder RUN/export/encoder.pth --out probe_results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddinov3_nnunet.models.checkpoints import load_encoder
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import default_tap_blocks, preset
from meddinov3_nnunet.pretraining.config import load_config
from meddinov3_nnunet.pretraining.corpus import settings_from_config
from meddinov3_nnunet.pretraining.volumes import Candidate, index_volume, normalise_slice, read_volume

HERE = Path(__file__).resolve().parent
DEFAULT_DATASET = HERE.parents[2] / "shared" / "datasets" / "Dataset004_Hippocampus"


def load_cases(dataset: Path, settings: dict, limit: int | None = None) -> dict:
    """case -> (normalised slices (Z, H, W) float32, labels (Z, H, W) uint8)."""
    cases = sorted(p.name[:-len(".nii.gz")] for p in (dataset / "labelsTr").glob("*.nii.gz"))[:limit]
    out = {}
    for case in cases:
        image_path = dataset / "imagesTr" / f"{case}_0000.nii.gz"
        entry = index_volume(Candidate(0, str(image_path), case, "auto", channel=0), settings)
        if "skipped" in entry:
            raise RuntimeError(f"{image_path}: {entry['skipped']}")
        image, _, _ = read_volume(str(image_path))
        labels, _, _ = read_volume(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        if image.shape != labels.shape:
            raise RuntimeError(f"{case}: image {image.shape} and label {labels.shape} differ")
        out[case] = (np.stack([normalise_slice(s, entry["norm"]) for s in image]), labels.astype(np.uint8))
    return out


@torch.no_grad()
def encoder_features(encoder, slices: np.ndarray, size: int, batch: int = 64) -> list[torch.Tensor]:
    """Per slice: features (D_total, H, W) at the slice's own pixels."""
    taps = default_tap_blocks(encoder.arch.depth)
    height, width = slices.shape[1:]
    out = []
    for start in range(0, len(slices), batch):
        x = torch.from_numpy(slices[start:start + batch])[:, None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        layers = encoder.get_intermediate_layers(x, n=taps, reshape=True, norm=True)
        grid = torch.cat(layers, dim=1)  # (B, D_total, h, w)
        out.extend(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))
    return out


def intensity_features(slices: np.ndarray, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(s)[None] for s in slices]


def fit_and_score(name: str, featurise, data: dict, train_cases: list[str], test_cases: list[str], train_pixels: int,
                  seed: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    started = time.time()
    rng = np.random.default_rng(seed)
    total_train = sum(data[c][1].size for c in train_cases)
    keep_probability = min(1.0, train_pixels / total_train)
    xs, ys = [], []
    for case in train_cases:
        slices, labels = data[case]
        for features, label in zip(featurise(slices), labels):
            flat = features.flatten(1).T.numpy()
            chosen = rng.random(flat.shape[0]) < keep_probability
            xs.append(flat[chosen])
            ys.append(label.reshape(-1)[chosen])
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=3000, C=1.0, class_weight="balanced")  # ~5% of pixels are hippocampus
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # iterations used are reported instead
        probe.fit(scaler.transform(x_train), y_train)
    dices = {1: [], 2: []}
    correct = total = 0
    for case in test_cases:
        slices, labels = data[case]
        predicted = np.stack([probe.predict(scaler.transform(f.flatten(1).T.numpy())).reshape(labels.shape[1:])
                              for f in featurise(slices)])
        correct += int((predicted == labels).sum())
        total += labels.size
        for label in (1, 2):
            p, t = predicted == label, labels == label
            denominator = p.sum() + t.sum()
            dices[label].append(2.0 * np.logical_and(p, t).sum() / denominator if denominator else 1.0)
    result = {"features": name, "feature_dim": int(x_train.shape[1]), "train_pixels": int(len(y_train)),
              "dice_anterior": float(np.mean(dices[1])), "dice_posterior": float(np.mean(dices[2])),
              "dice_mean": float((np.mean(dices[1]) + np.mean(dices[2])) / 2), "pixel_accuracy": correct / total,
              "test_cases": len(test_cases), "solver_iterations": int(np.max(probe.n_iter_)),
              "seconds": round(time.time() - started, 1)}
    print(f"{name:>42}: Dice anterior {result['dice_anterior']:.3f}, posterior {result['dice_posterior']:.3f}, "
          f"mean {result['dice_mean']:.3f}, pixel accuracy {result['pixel_accuracy']:.4f} "
          f"({result['train_pixels']} training pixels, {result['seconds']} s)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", action="append", default=[], help="encoder checkpoint(s) to probe")
    parser.add_argument("--arch", default="vit_tiny16",
                        help="preset of the random-init row when no --encoder is given (default: %(default)s)")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--test-cases", type=Path, default=HERE / "probe_test_cases.txt")
    parser.add_argument("--size", type=int, default=112, help="encoder input size (default: %(default)s)")
    parser.add_argument("--train-pixels", type=int, default=100_000)
    parser.add_argument("--max-cases", type=int, default=None, help="first N cases only (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    settings = settings_from_config(load_config("tiny_cpu"))
    data = load_cases(args.dataset, settings, args.max_cases)
    held_out = set(args.test_cases.read_text().split())
    test_cases = [c for c in data if c in held_out]
    train_cases = [c for c in data if c not in held_out]
    print(f"{len(train_cases)} training cases, {len(test_cases)} test cases, input {args.size}x{args.size}", flush=True)

    rows = []
    for path in args.encoder:
        encoder = load_encoder(path).eval()
        rows.append(fit_and_score(f"pretrained ({Path(path).name})", lambda s, e=encoder: encoder_features(e, s, args.size),
                                  data, train_cases, test_cases, args.train_pixels, args.seed))
        rows[-1]["encoder"] = str(path)
    # the random row starts where pretraining started: the probed encoder's architecture (incl. its LayerScale
    # init), initialised with the run's seed
    arch = load_encoder(args.encoder[0]).arch if args.encoder else preset(args.arch)
    torch.manual_seed(args.random_seed)
    random_encoder = DINOv3Encoder(arch).eval()
    rows.append(fit_and_score(f"random init (same arch, seed {args.random_seed})",
                              lambda s: encoder_features(random_encoder, s, args.size), data, train_cases, test_cases,
                              args.train_pixels, args.seed))
    rows.append(fit_and_score("intensity only", lambda s: intensity_features(s, args.size), data, train_cases,
                              test_cases, args.train_pixels, args.seed))
    if args.out:
        args.out.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                       indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
