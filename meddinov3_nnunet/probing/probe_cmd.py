"""`meddinov3-nnunet probe`: frozen-encoder linear probe Dice of one or more checkpoints on an nnU-Net raw
dataset, with a fixed case split (protocol: meddinov3_nnunet/probing/linear_probe.py). Prints a table, writes
JSON. Use it to choose which pretraining checkpoint to export, or to compare with `random:PRESET`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="encoder checkpoints (any supported layout) or random:PRESET[:SEED]")
    parser.add_argument("--data", required=True, help="nnU-Net raw dataset folder (nnUNet_raw/DatasetXXX_Name)")
    parser.add_argument("--test-cases", default=None,
                        help="file listing the test cases (default: every 5th case of the sorted list)")
    parser.add_argument("--size", type=int, default=112, help="encoder input size, px (default 112)")
    parser.add_argument("--train-pixels", type=int, default=100_000, help="pixels the probe trains on (default 100000)")
    parser.add_argument("--max-cases", type=int, default=None, help="first N cases only (quick checks)")
    parser.add_argument("--intensity", action="store_true", help="add a row with the intensity as the only feature")
    parser.add_argument("--seed", type=int, default=0, help="pixel sampling seed (default 0)")
    parser.add_argument("-o", "--out", default="probe_results.json", help="JSON to write (default probe_results.json)")


def table(rows: list[dict]) -> str:
    labels = list(rows[0]["dice"])
    lines = ["| features | " + " | ".join(f"Dice {name}" for name in labels) + " | mean Dice | pixel accuracy |",
             "|---|" + "---:|" * (len(labels) + 2)]
    for row in rows:
        cells = [f"{row['dice'][name]:.3f}" for name in labels] + [f"{row['dice_mean']:.3f}",
                                                                   f"{row['pixel_accuracy']:.4f}"]
        lines.append(f"| {row['features']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from meddinov3_nnunet.atomic_io import write_text_atomic
    from meddinov3_nnunet.errors import InputError
    from meddinov3_nnunet.probing.encoders import open_encoder
    from meddinov3_nnunet.probing.linear_probe import (encoder_featuriser, intensity_featuriser, load_dataset,
                                                       run_probe, split_cases)

    if args.size < 16 or args.size % 16:
        raise InputError(f"--size {args.size} must be a positive multiple of 16 (the patch size)")
    encoders = [open_encoder(spec) for spec in args.checkpoints]  # every file checked before the slow part
    test_list = None
    if args.test_cases:
        if not Path(args.test_cases).is_file():
            raise InputError(f"--test-cases {args.test_cases}: no such file (one case name per line)")
        test_list = Path(args.test_cases).read_text().split()
    data = load_dataset(args.data, args.max_cases)
    train_cases, test_cases = split_cases(list(data.cases), test_list)
    print(f"{args.data}: {len(train_cases)} training cases, {len(test_cases)} test cases, input {args.size} px",
          flush=True)
    torch.manual_seed(args.seed)
    rows = []
    for spec, (encoder, label) in zip(args.checkpoints, encoders):
        rows.append({**run_probe(label, encoder_featuriser(encoder, args.size), data, train_cases, test_cases,
                                 args.train_pixels, args.seed), "checkpoint": spec})
        print(f"  {label}: mean Dice {rows[-1]['dice_mean']:.3f} ({rows[-1]['seconds']} s)", flush=True)
    if args.intensity:
        rows.append(run_probe("intensity only", intensity_featuriser, data, train_cases, test_cases,
                              args.train_pixels, args.seed))
    print(table(rows), end="")
    protocol = {"data": str(args.data), "size": args.size, "train_pixels": args.train_pixels, "seed": args.seed,
                "modality": data.modality, "train_cases": train_cases, "test_cases": test_cases}
    write_text_atomic(args.out, json.dumps({"protocol": protocol, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0
