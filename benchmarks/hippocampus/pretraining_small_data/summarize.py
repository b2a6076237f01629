"""Issue 22's comparison: fine-tuning from this project's `small_data` pretraining against random initialisation,
everything else identical (Hippocampus, 500 steps, CPU preset), paired per seed and fold on the same validation cases.

    .venv/bin/python benchmarks/hippocampus/pretraining_small_data/summarize.py

Reads every run under runs/ (run_rows.sh with RUNS_PARENT=this folder), and the pretraining's own logs under
pretraining/ (metrics.jsonl, probe.jsonl); writes results.md beside this script. Each run's DSC is the mean over
cases of the class-averaged DSC from its per-case file (as `benchmarks/paired.py`).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from paired import case_means, compare  # noqa: E402  (benchmarks/ is not a package)

PAIRS = {  # design -> (pretrained trainer, random trainer, configuration)
    "paper's 2D design (ViT tokens only)": ("MedDINOv3Trainer_S_enclr3e4", "MedDINOv3Trainer_S_scratch_ls01", "2d"),
    "3D hybrid (conv path + ViT)": ("MedDINOv3Trainer_S_hybrid_3d_enclr3e4",
                                    "MedDINOv3Trainer_S_hybrid_3d_scratch_ls01", "3d_fullres"),
}


def runs() -> dict[tuple[str, str, int, int], Path]:
    """{(trainer, configuration, seed, fold): per_case.csv} of every finished run."""
    found = {}
    for path in sorted(HERE.glob("runs/*/rows/*/seed_*/fold_*/per_case.csv")):
        trainer, _, configuration = path.parts[-4].split("__")
        found[(trainer, configuration, int(path.parts[-3][5:]), int(path.parts[-2][5:]))] = path
    return found


def case_dsc(path: Path | None) -> tuple[dict[str, float], int] | None:
    """({case: class-averaged DSC}, undefined values) of a run's per-case file, None for a run not made."""
    return case_means(path, "dsc") if path else None


def fmt(values: list[float]) -> str:
    if not values:
        return "not run"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)})"


def comparison_table(found: dict) -> list[str]:
    lines = ["| design | fold | seed | pretrained DSC | random DSC | paired pretrained − random (cases better) |",
             "|---|---|---|---|---|---|"]
    summary = ["", "| design | fold | pretrained | random | gain | goal (+3 beyond both seed spreads) |",
               "|---|---|---|---|---|---|"]
    for design, (pretrained, random, configuration) in PAIRS.items():
        for fold in sorted({k[3] for k in found if k[0] in (pretrained, random)} | {0}):
            a_runs, b_runs = [], []
            for seed in sorted({k[2] for k in found if k[0] in (pretrained, random) and k[3] == fold} | {0, 1}):
                a = case_dsc(found.get((pretrained, configuration, seed, fold)))
                b = case_dsc(found.get((random, configuration, seed, fold)))
                a_dsc, b_dsc = ((100 * statistics.mean(x[0].values()), x[1]) if x else None for x in (a, b))
                paired = "–"
                if a and b:
                    diff, sd, better, n = compare(a[0], b[0])
                    paired = f"{100 * diff:+.2f} ± {100 * sd:.2f} ({better}/{n})"
                undefined = sum(x[1] for x in (a, b) if x)
                lines.append(f"| {design} | {fold} | {seed} | {f'{a_dsc[0]:.2f}' if a_dsc else 'not run'} | "
                             f"{f'{b_dsc[0]:.2f}' if b_dsc else 'not run'} | {paired}"
                             f"{f' ({undefined} undefined)' if undefined else ''} |")
                a_runs += [a_dsc[0]] if a_dsc else []
                b_runs += [b_dsc[0]] if b_dsc else []
            gain = statistics.mean(a_runs) - statistics.mean(b_runs) if a_runs and b_runs else None
            spreads = [statistics.stdev(r) for r in (a_runs, b_runs) if len(r) > 1]
            if gain is None or len(a_runs) < 2 or len(b_runs) < 2:
                verdict = "not decidable (fewer than 2 seeds per row)"
            else:
                verdict = "met" if gain >= 3 and gain > max(spreads) else "not met"
            summary.append(f"| {design} | {fold} | {fmt(a_runs)} | {fmt(b_runs)} | "
                           f"{'–' if gain is None else f'{gain:+.2f}'} | {verdict} |")
    return lines + summary


def pretraining_lines() -> list[str]:
    folder = HERE / "pretraining"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    probes = [json.loads(line) for line in (folder / "probe.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "probe.jsonl").exists() else []
    first, last = metrics[0], metrics[-1]
    window = [m for m in metrics if m["step"] >= last["step"] - 49]
    seconds = sorted({round(m["step_seconds"], 3) for m in metrics})
    lines = [f"Pretraining: {last['step'] + 1} steps; s/step over the logged windows: median "
             f"{statistics.median(seconds):.2f}, min {seconds[0]:.2f}, max {seconds[-1]:.2f}.", "",
             "| loss | step 0 | mean of the last 50 steps |", "|---|---|---|"]
    for key in ("dino_global", "dino_local", "ibot", "koleo", "total"):
        lines.append(f"| {key} | {first[key]:.3f} | {statistics.mean(m[key] for m in window):.3f} |")
    if probes:
        lines += ["", "| linear probe after step | mean Dice | per label |", "|---|---|---|"]
        for probe in probes:
            labels = ", ".join(f"{k} {v:.3f}" for k, v in probe.get("probe_dice", {}).items())
            lines.append(f"| {probe['step'] + 1} | {probe['probe_dice_mean']:.3f} | {labels} |")
    return lines


def main() -> None:
    lines = ["# Issue 22: small_data pretraining against random initialisation (generated by summarize.py)", ""]
    lines += comparison_table(runs()) + [""]
    if (HERE / "pretraining" / "metrics.jsonl").exists():
        lines += pretraining_lines()
    text = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
