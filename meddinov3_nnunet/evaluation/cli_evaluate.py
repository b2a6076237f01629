"""`meddinov3-nnunet evaluate --pred DIR --gt DIR`: DSC / NSD / HD95 per case and class, summary tables."""
from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="folder of predicted label maps")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label maps (same file names)")
    parser.add_argument("--dataset-json", help="nnU-Net dataset.json: class names and file ending")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    parser.add_argument("--out", help="where to write summary.json/.csv/.md and per_case.csv (default: --pred)")
    parser.add_argument("--file-ending", help="file ending when there is no dataset.json (default .nii.gz)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="parallel cases (default 2)")


def run(args: argparse.Namespace) -> int:
    from .folder_evaluation import evaluate_folders, markdown_table

    summary = evaluate_folders(args.pred, args.gt, args.dataset_json, args.nsd_tolerance, args.out,
                               args.num_processes, args.file_ending)
    print(markdown_table(summary))
    print(f"written: {args.out or args.pred}/summary.json, summary.csv, summary.md, per_case.csv")
    return 0
