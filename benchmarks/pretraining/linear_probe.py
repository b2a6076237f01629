"""Linear probe of frozen encoder features on Dataset004_Hippocampus: how much of the hippocampus segmentation a
per-pixel logistic regression can read from the patch features, pretrained vs randomly initialised.

Protocol: `meddinov3-nnunet probe`'s (meddinov3_nnunet/probing/linear_probe.py): every axial slice normalised as
the pretraining corpus does, the frozen encoder's normed tap-block tokens at ``--size`` px upsampled to the
slice's pixels, a 1x1-convolution probe with scikit-learn's balanced logistic-regression objective on
``--train-pixels`` sampled pixels of the training cases, 3D Dice per test case (``--test-cases``: every 5th case,
also excluded from the pretraining corpus). This script keeps the benchmark's rows and JSON keys
(``dice_anterior`` / ``dice_posterior``); the committed results were fitted with scikit-learn's solver, which
reaches the same optimum (tests/probing/test_probe.py).

Rows: each ``--encoder`` file, a random initialisation of the same architecture (``--random-seed``), and an
intensity-only probe (the pixel's normalised intensity as the single feature) for scale.

    python benchmarks/pretraining/linear_probe.py --encoder RUN/export/encoder.pth --out probe_results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from meddinov3_nnunet.models.checkpoints import load_encoder
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import preset
from meddinov3_nnunet.probing.linear_probe import (encoder_featuriser, intensity_featuriser, load_dataset, run_probe,
                                                   split_cases)

HERE = Path(__file__).resolve().parent
DEFAULT_DATASET = HERE.parents[2] / "shared" / "datasets" / "Dataset004_Hippocampus"


def benchmark_row(name: str, featurise, data, train_cases, test_cases, args) -> dict:
    """One row in the benchmark's own keys (Hippocampus: anterior and posterior)."""
    row = run_probe(name, featurise, data, train_cases, test_cases, args.train_pixels, args.seed)
    dices = row.pop("dice")
    row = {"features": row["features"], "feature_dim": row["feature_dim"], "train_pixels": row["train_pixels"],
           "dice_anterior": dices["Anterior"], "dice_posterior": dices["Posterior"], **row}
    print(f"{name:>42}: Dice anterior {row['dice_anterior']:.3f}, posterior {row['dice_posterior']:.3f}, "
          f"mean {row['dice_mean']:.3f}, pixel accuracy {row['pixel_accuracy']:.4f} "
          f"({row['train_pixels']} training pixels, {row['seconds']} s)", flush=True)
    return row


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
    data = load_dataset(args.dataset, args.max_cases)
    train_cases, test_cases = split_cases(list(data.cases), args.test_cases.read_text().split())
    print(f"{len(train_cases)} training cases, {len(test_cases)} test cases, input {args.size}x{args.size}", flush=True)

    rows = []
    for path in args.encoder:
        encoder = load_encoder(path).eval()
        rows.append(benchmark_row(f"pretrained ({Path(path).name})", encoder_featuriser(encoder, args.size), data,
                                  train_cases, test_cases, args))
        rows[-1]["encoder"] = str(path)
    # the random row starts where pretraining started: the probed encoder's architecture (incl. its LayerScale
    # init), initialised with the run's seed
    arch = load_encoder(args.encoder[0]).arch if args.encoder else preset(args.arch)
    torch.manual_seed(args.random_seed)
    random_encoder = DINOv3Encoder(arch).eval()
    rows.append(benchmark_row(f"random init (same arch, seed {args.random_seed})",
                              encoder_featuriser(random_encoder, args.size), data, train_cases, test_cases, args))
    rows.append(benchmark_row("intensity only", intensity_featuriser, data, train_cases, test_cases, args))
    if args.out:
        args.out.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                       indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
