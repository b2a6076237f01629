"""Issue 22's comparison: fine-tuning from this project's `small_data` pretraining against random initialisation,
everything else identical (Hippocampus, 500 steps, CPU preset), paired per seed and fold on the same validation cases.

    .venv/bin/python benchmarks/hippocampus/pretraining_small_data/summarize.py

Two pretraining candidates, each in its own folder: DINO + iBOT + KoLeo (this folder) and the same with the
masked-pixel head (`mim/`, `--set mim.enabled=true`). Reads every run under <candidate>/runs/ (run_rows.sh with
RUNS_PARENT=<candidate folder>; the random rows live in this folder's runs/ and serve both candidates), and each
pretraining's own logs under <candidate>/pretraining/ (metrics.jsonl, probe.jsonl); writes results.md beside this
script. Each run's DSC is the mean over cases of the class-averaged DSC from its per-case file (as
`benchmarks/paired.py`).
"""
from __future__ import annotations

import functools
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


CANDIDATES = {  # name -> folder holding its pretraining/ logs and its pretrained runs/
    "DINO + iBOT + KoLeo": HERE,
    "DINO + iBOT + KoLeo + masked pixels (mim)": HERE / "mim",
}


def runs(folder: Path) -> dict[tuple[str, str, int, int], Path]:
    """{(trainer, configuration, seed, fold): per_case.csv} of every finished run under folder/runs."""
    found = {}
    for path in sorted(folder.glob("runs/*/rows/*/seed_*/fold_*/per_case.csv")):
        trainer, _, configuration = path.parts[-4].split("__")
        found[(trainer, configuration, int(path.parts[-3][5:]), int(path.parts[-2][5:]))] = path
    return found


@functools.cache  # the per-candidate tables and the between-candidates table read the same files
def case_dsc(path: Path | None) -> tuple[dict[str, float], int] | None:
    """({case: class-averaged DSC}, undefined values) of a run's per-case file, None for a run not made."""
    return case_means(path, "dsc") if path else None


def fmt(values: list[float]) -> str:
    if not values:
        return "not run"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)})"


def comparison_table(found: dict, random_found: dict) -> list[str]:
    """Per-seed and per-fold table of one candidate's pretrained runs (found) against the random runs."""
    lines = ["| design | fold | seed | pretrained DSC | random DSC | paired pretrained − random (cases better) |",
             "|---|---|---|---|---|---|"]
    summary = ["", "| design | fold | pretrained | random | gain | goal (+3 beyond both seed spreads) |",
               "|---|---|---|---|---|---|"]
    found = {**random_found, **found}
    for design, (pretrained, random, configuration) in PAIRS.items():
        if not any(k[0] == pretrained for k in found):
            continue
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


def between_candidates(first: dict, second: dict) -> list[str]:
    """Paired second − first candidate on the pretrained rows both have run."""
    lines = ["| design | fold | seed | paired mim − DINO-only (cases better) |", "|---|---|---|---|"]
    for design, (pretrained, _, configuration) in PAIRS.items():
        for key in sorted(k for k in second if k[0] == pretrained and k[1] == configuration and k in first):
            diff, sd, better, n = compare(case_dsc(second[key])[0], case_dsc(first[key])[0])
            lines.append(f"| {design} | {key[3]} | {key[2]} | {100 * diff:+.2f} ± {100 * sd:.2f} ({better}/{n}) |")
    return lines if len(lines) > 2 else []


def pretraining_lines(candidate: Path) -> list[str]:
    folder = candidate / "pretraining"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    probes = [json.loads(line) for line in (folder / "probe.jsonl").read_text().splitlines() if line.strip()] \
        if (folder / "probe.jsonl").exists() else []
    first, last = metrics[0], metrics[-1]
    window = [m for m in metrics if m["step"] >= last["step"] - 49]
    seconds = sorted({round(m["step_seconds"], 3) for m in metrics})
    lines = [f"Pretraining: {last['step'] + 1} steps; s/step over the logged windows: median "
             f"{statistics.median(seconds):.2f}, min {seconds[0]:.2f}, max {seconds[-1]:.2f}.", "",
             "| loss | step 0 | mean of the last 50 steps |", "|---|---|---|"]
    for key in ("dino_global", "dino_local", "ibot", "koleo", "mim", "total"):
        if key in first:
            lines.append(f"| {key} | {first[key]:.3f} | {statistics.mean(m[key] for m in window):.3f} |")
    if probes:
        lines += ["", "| linear probe after step | mean Dice | per label |", "|---|---|---|"]
        for probe in probes:
            labels = ", ".join(f"{k} {v:.3f}" for k, v in probe.get("probe_dice", {}).items())
            lines.append(f"| {probe['step'] + 1} | {probe['probe_dice_mean']:.3f} | {labels} |")
    return lines


def main() -> None:
    lines = ["# Issue 22: small_data pretraining against random initialisation (generated by summarize.py)", ""]
    random_trainers = {random for _, random, _ in PAIRS.values()}
    found_by_folder = {folder: runs(folder) for folder in CANDIDATES.values()}
    random_found = {k: v for k, v in found_by_folder[HERE].items() if k[0] in random_trainers}
    for name, folder in CANDIDATES.items():
        found = {k: v for k, v in found_by_folder[folder].items() if k[0] not in random_trainers}
        if not found and not (folder / "pretraining" / "metrics.jsonl").exists():
            lines += [f"## {name}", "", "not run", ""]
            continue
        table = comparison_table(found, random_found) if found else ["no fine-tune run yet"]
        lines += [f"## {name}", ""] + table + [""]
        if (folder / "pretraining" / "metrics.jsonl").exists():
            lines += pretraining_lines(folder) + [""]
    between = between_candidates(*found_by_folder.values())
    if between:
        lines += ["## Between the candidates (pretrained rows, same seed and fold)", ""] + between + [""]
    text = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
