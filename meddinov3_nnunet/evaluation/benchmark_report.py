"""The benchmark's report: learning curves and timings parsed from nnU-Net's training logs (no checkpoint is
unpickled), and the tables (Markdown, long CSV, JSON) and plots of the collected rows.

`meddinov3_nnunet.evaluation.benchmark` runs the trainings and collects, per row and fold, a dict with
``summary`` (`evaluate_folders`), ``curves`` (`parse_training_logs`), ``stats`` (the process monitor's),
``epochs``, ``iterations_per_epoch`` and ``iterations_per_second``; `write_outputs` turns them into files.
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np

from ..atomic_io import save_figure_atomic, write_text_atomic
from .folder_evaluation import format_cell, strict_json
from .segmentation_metrics import METRICS

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+): (.*)$")


def parse_training_logs(fold_dir: Path) -> dict:
    """Per-epoch train/val loss, pseudo Dice and epoch time, plus validation inference timing, from every
    ``training_log_*.txt`` of a fold (several when a run was resumed)."""
    curves = {"train_loss": {}, "val_loss": {}, "pseudo_dice": {}, "epoch_seconds": {}}
    predicting, validation_done, epoch = [], None, None
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        for line in log.read_text(errors="replace").splitlines():
            match = _STAMP.match(line.strip())
            if not match:
                continue
            stamp, message = datetime.fromisoformat(match.group(1)), match.group(2).strip()
            if message.startswith("Epoch ") and message[6:].strip().isdigit():
                epoch = int(message[6:])
            elif message.startswith("train_loss") and epoch is not None:
                curves["train_loss"][epoch] = float(message.split()[-1])
            elif message.startswith("val_loss") and epoch is not None:
                curves["val_loss"][epoch] = float(message.split()[-1])
            elif message.startswith("Pseudo dice") and epoch is not None:
                listed = message.split("dice", 1)[1].replace("np.float32(", "").replace(")", "")
                values = [float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", listed)]
                curves["pseudo_dice"][epoch] = float(np.mean(values)) if values else math.nan
            elif message.startswith("Epoch time:") and epoch is not None:
                curves["epoch_seconds"][epoch] = float(message.split(":")[1].split()[0])
            elif message.startswith("predicting "):
                if validation_done is not None:  # a later validation (--val) replaces an earlier one
                    predicting, validation_done = [], None
                predicting.append(stamp)
            elif message.startswith("Validation complete"):
                validation_done = stamp
    result = {key: [values[e] for e in sorted(values)] for key, values in curves.items()}
    if predicting and validation_done:
        # per case: the median gap between consecutive "predicting" lines (sliding window, mirroring and the
        # hand-off to the export workers); the first gap also holds the export pool's start, and the time after
        # the last case nnU-Net's metric computation, so the total is reported separately
        result["validation_seconds"] = (validation_done - predicting[0]).total_seconds()
        gaps = np.diff([p.timestamp() for p in predicting])
        result["inference_seconds_per_case"] = float(np.median(gaps)) if gaps.size else result["validation_seconds"]
    return result


def write_outputs(collected: dict, out_dir: Path, preset: dict) -> dict:
    """``collected`` maps ``(row, fold)`` or ``(row, fold, seed)`` to a collected run. One table line per row and
    fold: a single run as mean ± sd over cases, several seeds as the mean over seeds ± the sd over seeds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not collected:
        return {}
    first = next(iter(collected.values()))["summary"]
    classes = list(first["per_class"])
    header = (["method", "trainer", "configuration", "fold"] + [f"DSC {c}" for c in classes]
              + ["DSC mean", "NSD mean", "HD95 mean (mm)", "epochs x iterations", "nnUNetv2_train wall (min)",
                 "train it/s", "inference s/case", "peak RSS (MiB)"])
    with_gpu = any(item["stats"].get("gpu_peak_mib") is not None for item in collected.values())
    header += ["peak GPU memory (MiB)"] if with_gpu else []
    header += ["seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records, groups = [], {}
    for key, item in collected.items():
        row, fold, seed = (*key, None)[:3]
        summary = item["summary"]
        overall = _overall_with_undefined(summary)
        record = {"label": row.label, "trainer": row.trainer, "configuration": row.configuration, "fold": fold,
                  "seed": seed,
                  "summary": {"per_class": summary["per_class"], "overall": overall,
                              "num_cases": summary["num_cases"], "nsd_tolerance_mm": summary["nsd_tolerance_mm"]},
                  "curves": item["curves"], "stats": item["stats"], "epochs": item["epochs"],
                  "iterations_per_epoch": item["iterations_per_epoch"],
                  "iterations_per_second": item["iterations_per_second"]}
        records.append(record)
        groups.setdefault((row, fold), []).append(record)
    several = False
    for (row, fold), runs in groups.items():
        several |= len(runs) > 1
        cells = [row.label, row.trainer, row.configuration, str(fold)]
        cells += [format_cell(_over_seeds([r["summary"]["per_class"][c]["dsc"] for r in runs]), "dsc") for c in classes]
        cells += [format_cell(_over_seeds([r["summary"]["overall"][m] for r in runs]), m) for m in METRICS]
        timing = {name: float(np.mean([fn(r) for r in runs])) for name, fn in _TIMING.items()}
        cells += [f"{runs[0]['epochs']} x {runs[0]['iterations_per_epoch']}", f"{timing['wall'] / 60:.1f}",
                  f"{timing['it_s']:.2f}", f"{timing['inference']:.2f}", f"{timing['rss']:.0f}"]
        if with_gpu:
            gpu = [r["stats"]["gpu_peak_mib"] for r in runs if r["stats"].get("gpu_peak_mib") is not None]
            cells.append(f"{np.mean(gpu):.0f}" if gpu else "n/a")
        seeds = [r["seed"] for r in runs if r["seed"] is not None]
        cells.append(", ".join(map(str, seeds)) if seeds else "none")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"DSC and NSD in % (NSD tolerance {first['nsd_tolerance_mm']:g} mm), mean ± sd over the "
            f"{first['num_cases']} validation cases; means are class-averaged. "
            + ("Rows with several seeds: mean over the seeds' values ± their sd over seeds (n - 1), timings averaged "
               "over seeds. " if several else "")
            + "(k undef.): k case x class values without a defined value (e.g. HD95 when the prediction or the "
            "reference is empty), left out of that mean (class-averaged columns: summed over classes"
            + (" and seeds" if several else "") + "). Seeds: MEDDINOV3_SEED of the run ('none': unseeded). "
            "Wall time: the whole nnUNetv2_train "
            f"call (start-up, training, final validation). it/s: training iterations per second of epoch time "
            f"(epoch time includes nnU-Net's per-epoch validation batches). Inference: seconds per validation case "
            f"(sliding window with mirroring, export). Peak RSS: largest process of the training. "
            + ("Peak GPU memory: nvidia-smi, the training's processes summed, CUDA context included. " if with_gpu else "")
            + f"Budget: {preset.get('description', '')}")
    table = "\n".join(lines) + "\n\n" + note + "\n"
    write_text_atomic(out_dir / "table.md", table)
    write_text_atomic(out_dir / "table.csv", table_csv(records))
    write_text_atomic(out_dir / "results.json", json.dumps(strict_json(records), indent=1, allow_nan=False))
    plot_results(collected, out_dir, classes)
    return {"table": table, "records": records}


_TIMING = {
    "wall": lambda r: r["stats"].get("wall_seconds", math.nan),
    "it_s": lambda r: r["iterations_per_second"],
    "inference": lambda r: r["curves"].get("inference_seconds_per_case", math.nan),
    "rss": lambda r: r["stats"].get("max_rss_mib", math.nan),
}


def _overall_with_undefined(summary: dict) -> dict:
    """The class-averaged statistics with ``undefined``: the undefined case values summed over classes."""
    return {metric: {**stats, "undefined": sum(int(summary["per_class"][c][metric].get("undefined", 0))
                                               for c in summary["per_class"])}
            for metric, stats in summary["overall"].items()}


def _over_seeds(stats: list[dict]) -> dict:
    """One run: its statistics. Several (seeds): mean and sd (n - 1) over the runs' finite means; undefined
    values summed."""
    undefined = sum(int(s.get("undefined", 0)) for s in stats)
    if len(stats) == 1:
        return {**stats[0], "undefined": undefined}
    means = np.array([s["mean"] for s in stats], dtype=float)
    means = means[np.isfinite(means)]
    return {"mean": float(means.mean()) if means.size else math.nan,
            "sd": float(means.std(ddof=1)) if means.size > 1 else math.nan, "undefined": undefined}


CSV_COLUMNS = ["label", "trainer", "configuration", "fold", "seed", "class", "metric", "mean", "sd", "n", "undefined",
               "epochs", "iterations_per_epoch", "train_wall_seconds", "train_iterations_per_second",
               "inference_seconds_per_case", "validation_seconds", "peak_rss_mib", "peak_gpu_mib"]


def table_csv(records: list[dict]) -> str:
    """Long, numeric form of the table: one line per row, fold, class (and "mean" for the class average) and
    metric; DSC and NSD as fractions, HD95 in mm; the row's timing columns repeated on each of its lines."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for record in records:
        stats, curves = record["stats"], record["curves"]
        timing = [record["epochs"], record["iterations_per_epoch"], stats.get("wall_seconds", math.nan),
                  record["iterations_per_second"], curves.get("inference_seconds_per_case", math.nan),
                  curves.get("validation_seconds", math.nan), stats.get("max_rss_mib", math.nan),
                  stats.get("gpu_peak_mib") if stats.get("gpu_peak_mib") is not None else ""]
        groups = list(record["summary"]["per_class"].items()) + [("mean", record["summary"]["overall"])]
        for name, metrics in groups:
            for metric, entry in metrics.items():
                writer.writerow([record["label"], record["trainer"], record["configuration"], record["fold"],
                                 "" if record.get("seed") is None else record["seed"], name,
                                 metric, f"{entry['mean']:.6g}", f"{entry['sd']:.6g}", entry.get("n", ""),
                                 entry.get("undefined", "")] + [f"{v:.6g}" if isinstance(v, float) else v
                                                                 for v in timing])
    return text.getvalue()


def plot_results(collected: dict, out_dir: Path, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(*key, None)[:3] for key in collected]
    several_folds = len({fold for _, fold, _ in keys}) > 1
    labels = [row.label + (f" (fold {fold})" if several_folds else "") + ("" if seed is None else f" seed {seed}")
              for row, fold, seed in keys]
    per_case = [[np.mean([case[c]["dsc"] for c in classes]) for case in item["summary"]["per_case"].values()]
                for item in collected.values()]
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4.5))
    axis.boxplot(per_case, showmeans=True)
    wrapped = [textwrap.fill(label, 24, break_on_hyphens=False) for label in labels]
    axis.set_xticks(range(1, len(labels) + 1), wrapped, fontsize=7)
    axis.set_ylabel("class-averaged DSC per validation case")
    axis.set_ylim(0, 1)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, out_dir / "dsc_boxplot.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, item in zip(labels, collected.values()):
        curves = item["curves"]
        line, = axes[0].plot(curves["train_loss"], label=f"{label} train")
        axes[0].plot(curves["val_loss"], linestyle="--", color=line.get_color())
        axes[1].plot(curves["pseudo_dice"], label=label, color=line.get_color())
    axes[0].set(xlabel="epoch", ylabel="loss (Dice + CE; dashed: validation)")
    axes[1].set(xlabel="epoch", ylabel="pseudo Dice (nnU-Net's online validation)", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, out_dir / "learning_curves.png", dpi=120)
    plt.close(figure)
