"""Issue 20's learning curve: class-averaged DSC at 500 and 2000 steps (Hippocampus fold 0, CPU presets `cpu` and
`cpu_2000.json`: the same recipe, the schedule decaying over each budget) for the rows the issue names.

    .venv/bin/python benchmarks/hippocampus_hybrid/learning_curve.py

Each run's DSC is computed from its committed per-case file (mean over cases of the class-averaged DSC, as
`benchmarks/paired.py`); the two runs that left no per-case file give their reported mean, with the README that
reports it. Writes learning_curve.md (table) and learning_curve.png beside this script; a row with no run at a budget
is left out there, and the table says so.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
sys.path.insert(0, str(BENCHMARKS))

from paired import case_means  # noqa: E402  (benchmarks/ is not a package)

ROWS = {  # label -> trainer : configuration
    "nnU-Net 2d": "nnUNetTrainer_budget:2d",
    "nnU-Net 3d_fullres": "nnUNetTrainer_budget:3d_fullres",
    "ViT-S 2d, paper design": "MedDINOv3Trainer_S_scratch:2d",
    "2D hybrid": "MedDINOv3Trainer_S_hybrid_scratch:2d",
    "3D hybrid": "MedDINOv3Trainer_S_hybrid_3d_scratch:3d_fullres",
}
HYBRID_RUNS = "hippocampus_hybrid/runs"
# (row, steps, seed (None: not recorded), per-case file under benchmarks/, or (reported DSC %, where it is reported))
RUNS = [
    ("nnU-Net 2d", 500, None, "hippocampus/rows/nnUNetTrainer_budget__nnUNetPlans__2d/fold_0/per_case.csv"),
    ("nnU-Net 2d", 500, None, "hippocampus/repeat_run2/nnUNetTrainer_budget__nnUNetPlans__2d/per_case.csv"),
    ("nnU-Net 2d", 500, None, (74.8, "hippocampus_depth/README.md")),
    ("nnU-Net 3d_fullres", 500, None,
     "hippocampus/rows/nnUNetTrainer_budget__nnUNetPlans__3d_fullres/fold_0/per_case.csv"),
    ("nnU-Net 3d_fullres", 500, None,
     "hippocampus/repeat_run2/nnUNetTrainer_budget__nnUNetPlans__3d_fullres/per_case.csv"),
    ("nnU-Net 3d_fullres", 500, None, (82.4, "hippocampus_depth/README.md")),
    ("ViT-S 2d, paper design", 500, None,
     "hippocampus_depth/rows/MedDINOv3Trainer_S_scratch__nnUNetPlans__2d/per_case.csv"),
    ("ViT-S 2d, paper design", 500, 0,
     "hippocampus/precision/bf16/rows/MedDINOv3Trainer_S_scratch__nnUNetPlans__2d/seed_0/fold_0/per_case.csv"),
    ("ViT-S 2d, paper design", 500, 1,
     "hippocampus/precision/bf16/rows/MedDINOv3Trainer_S_scratch__nnUNetPlans__2d/seed_1/fold_0/per_case.csv"),
    ("2D hybrid", 500, 0, f"{HYBRID_RUNS}/S_hybrid_scratch_2d_s0_f0/rows/"
                          "MedDINOv3Trainer_S_hybrid_scratch__nnUNetPlans__2d/seed_0/fold_0/per_case.csv"),
    ("2D hybrid", 500, 1, f"{HYBRID_RUNS}/S_hybrid_scratch_2d_s1_f0/rows/"
                          "MedDINOv3Trainer_S_hybrid_scratch__nnUNetPlans__2d/seed_1/fold_0/per_case.csv"),
    ("3D hybrid", 500, 0, f"{HYBRID_RUNS}/S_hybrid_3d_scratch_3d_fullres_s0_f0/rows/"
                          "MedDINOv3Trainer_S_hybrid_3d_scratch__nnUNetPlans__3d_fullres/seed_0/fold_0/per_case.csv"),
    ("3D hybrid", 500, 1, f"{HYBRID_RUNS}/S_hybrid_3d_scratch_3d_fullres_s1_f0/rows/"
                          "MedDINOv3Trainer_S_hybrid_3d_scratch__nnUNetPlans__3d_fullres/seed_1/fold_0/per_case.csv"),
    ("3D hybrid", 500, 2, f"{HYBRID_RUNS}/S_hybrid_3d_scratch_3d_fullres_s2_f0/rows/"
                          "MedDINOv3Trainer_S_hybrid_3d_scratch__nnUNetPlans__3d_fullres/seed_2/fold_0/per_case.csv"),
]


def long_run(row: str, seed: int = 0) -> tuple:
    """The 2000-step run of ``row`` as run_rows.sh names it under PRESET=cpu_2000.json."""
    trainer, configuration = ROWS[row].split(":")
    name = f"{trainer.replace('MedDINOv3Trainer_', '')}_{configuration}_s{seed}_f0_cpu_2000"
    return (row, 2000, seed, f"{HYBRID_RUNS}/{name}/rows/{trainer}__nnUNetPlans__{configuration}/seed_{seed}/fold_0/"
                             f"per_case.csv")


RUNS += [long_run(row) for row in ROWS] + [long_run("nnU-Net 3d_fullres", 1), long_run("3D hybrid", 1)]


def run_dsc(source) -> tuple[float | None, str]:
    """(DSC %, where from); None where the per-case file does not exist (the run has not been made)."""
    if isinstance(source, tuple):
        return source[0], f"reported in {source[1]}"
    path = BENCHMARKS / source
    if not path.is_file():
        return None, source
    means, undefined = case_means(path, "dsc")
    if undefined:
        raise SystemExit(f"{path}: {undefined} undefined DSC values; the curve uses complete runs only")
    return 100 * statistics.mean(means.values()), source


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meddinov3_nnunet.atomic_io import save_figure_atomic, write_text_atomic

    found: dict[tuple[str, int], list[float]] = {}
    missing = []
    for row, steps, _seed, source in RUNS:
        dsc, where = run_dsc(source)
        if dsc is None:
            missing.append(f"{row} at {steps} steps")
        else:
            found.setdefault((row, steps), []).append(dsc)
    lines = ["| row | trainer : configuration | 500 steps | 2000 steps |", "|---|---|---|---|"]
    for row, spec in ROWS.items():
        cells = []
        for steps in (500, 2000):
            values = found.get((row, steps), [])
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread} ({len(values)} run{'s' * (len(values) > 1)}: "
                         f"{' / '.join(f'{v:.2f}' for v in values)})" if values else "not run")
        lines.append(f"| {row} | `{spec}` | {cells[0]} | {cells[1]} |")
    if missing:
        lines += ["", "Not run yet: " + "; ".join(missing) + "."]
    write_text_atomic(HERE / "learning_curve.md", "\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, row in enumerate(ROWS):
        colour = f"C{index}"
        shift = 2 ** (0.06 * (index - (len(ROWS) - 1) / 2))  # rows side by side at each budget
        points = [(steps * shift, found[(row, steps)]) for steps in (500, 2000) if (row, steps) in found]
        for steps, values in points:
            axis.scatter([steps] * len(values), values, color=colour, s=14, alpha=0.6)
        axis.plot([s for s, _ in points], [statistics.mean(v) for _, v in points], color=colour, marker="o",
                  label=row)
    axis.set_xscale("log", base=2)
    axis.set_xticks([500, 2000], ["500", "2000"])
    axis.set_xlim(400, 2500)
    axis.set_xlabel("training steps (schedule decays over each budget)")
    axis.set_ylabel("DSC, class-averaged (%)")
    axis.set_title("Hippocampus fold 0, from scratch: mean of runs (line), each run (dots)", fontsize=9)
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, HERE / "learning_curve.png", dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
