"""`meddinov3-nnunet benchmark`: run / resume / collect nnU-Net trainings of several rows, evaluate, tabulate."""
from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("--preset", default="cpu", help="budget preset: cpu, gpu or a .json file (default cpu)")
    parser.add_argument("--rows", nargs="+", metavar="TRAINER:CONFIG[:PLANS][=LABEL]",
                        help="rows instead of the preset's")
    parser.add_argument("--folds", nargs="+", type=int, help="folds (default: the preset's, [0])")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="train every row and fold once per seed (MEDDINOV3_SEED; separate results folders) "
                             "and report mean and spread over seeds (default: the preset's seeds, else unseeded)")
    parser.add_argument("-o", "--out", default="benchmark_results", help="output folder for tables and plots")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="nnU-Net -device (default: the preset's)")
    parser.add_argument("--collect-only", action="store_true", help="run nothing; tabulate what is finished")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only plan/preprocess the configurations and write nnU-Net's default splits_final.json "
                             "(e.g. to pretrain on a fold's training cases first)")


def run(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark

    result = run_benchmark(args.dataset, args.preset, args.rows, args.folds, args.out, args.device,
                           args.collect_only, args.prepare_only, seeds=args.seeds)
    if result:
        print(result["table"])
    return 0
