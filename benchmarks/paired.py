"""Paired comparison of benchmark runs on the same validation cases (class-averaged per-case metric).

    python benchmarks/paired.py --a RUN_A1/per_case.csv RUN_A2/per_case.csv --b RUN_B1/per_case.csv [--metric dsc]

Prints, for every pairing of an A run with a B run: mean of (A - B) over the cases ± its sd, and on how many cases A
is better (higher DSC / NSD, lower HD95); a per-case value that is undefined (empty or NaN) is counted and left out
of that pairing.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path


def case_means(path: Path, metric: str) -> tuple[dict[str, float], int]:
    """{case: class-averaged metric} and the number of undefined per-class values."""
    values, undefined = defaultdict(list), 0
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            text = row[metric].strip()
            if not text or math.isnan(float(text)):
                undefined += 1
                continue
            values[row["case"]].append(float(text))
    return {case: sum(v) / len(v) for case, v in values.items()}, undefined


def label(path: Path) -> str:
    """The run's folder names above ``per_case.csv`` (row, seed, fold)."""
    return "/".join(path.parts[-4:-1])


def compare(a: dict[str, float], b: dict[str, float], lower_is_better: bool = False) -> tuple[float, float, int, int]:
    """(mean of A - B, its sd, cases where A is better, cases paired) over the cases both runs have."""
    cases = sorted(set(a) & set(b))
    diffs = [a[c] - b[c] for c in cases]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
    better = sum(d < 0 for d in diffs) if lower_is_better else sum(d > 0 for d in diffs)
    return mean, sd, better, len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True)
    parser.add_argument("--b", nargs="+", type=Path, required=True)
    parser.add_argument("--metric", default="dsc", choices=("dsc", "nsd", "hd95"))
    args = parser.parse_args()
    scale = 1.0 if args.metric == "hd95" else 100.0
    for path_a in args.a:
        a, undefined_a = case_means(path_a, args.metric)
        for path_b in args.b:
            b, undefined_b = case_means(path_b, args.metric)
            mean, sd, better, n = compare(a, b, lower_is_better=args.metric == "hd95")
            print(f"{label(path_a)} vs {label(path_b)}: "
                  f"{mean * scale:+.2f} ± {sd * scale:.2f} ({args.metric}), A better on {better}/{n} cases"
                  f" (undefined values: A {undefined_a}, B {undefined_b})")


if __name__ == "__main__":
    main()
