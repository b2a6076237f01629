"""`meddinov3-nnunet benchmark`: nnU-Net trainings of several trainer/configuration rows under one budget,
evaluated on the same validation folds, collected into paper-style tables and plots.

For each row and fold it runs (or resumes with ``--c``, or re-validates with ``--val``) ``nnUNetv2_train`` in a
subprocess, then evaluates ``fold_F/validation`` against nnU-Net's ``gt_segmentations`` with
`evaluate_folders`. A row is finished when its ``checkpoint_final.pth`` and its evaluation exist; re-running
skips finished work, ``--collect-only`` runs nothing. Learning curves and timings are parsed from nnU-Net's
training logs (no checkpoint is unpickled). Peak memory is the largest resident set of the training process
tree (``ru_maxrss`` of a wrapper that runs only that row).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..atomic_io import save_figure_atomic, write_text_atomic
from ..errors import InputError
from ..nnunet.budget import BATCH_SIZE, BUDGET_VARIABLES, ITERS_PER_EPOCH
from .folder_evaluation import evaluate_folders, format_cell, load_summary, strict_json
from .segmentation_metrics import METRICS

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class BenchmarkError(InputError):
    """Bad benchmark input; the message says what to fix."""


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path) if name_or_path.endswith(".json") else PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise BenchmarkError(f"unknown benchmark preset {name_or_path!r}; choose one of "
                             f"{sorted(p.stem for p in PRESET_DIR.glob('*.json'))} or give a .json file")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Row:
    trainer: str
    configuration: str
    plans: str = "nnUNetPlans"
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> "Row":
        """``TRAINER:CONFIGURATION[:PLANS][=LABEL]``."""
        spec, _, label = text.partition("=")
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise BenchmarkError(f"row {text!r} must look like TRAINER:CONFIGURATION[:PLANS][=LABEL]")
        return cls(*parts, label=label.strip() or spec)

    @property
    def folder_name(self) -> str:  # nnU-Net's results folder of this row
        return f"{self.trainer}__{self.plans}__{self.configuration}"


# ---------------------------------------------------------------------------------------------
# nnU-Net logs
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
class Benchmark:
    def __init__(self, dataset: str, rows: list[Row], folds: list[int], preset: dict, out_dir: Path,
                 device: str | None = None, log=print):
        from meddinov3_nnunet.nnunet.planning import find_dataset_name

        self.dataset = find_dataset_name(dataset)
        self.rows, self.folds, self.preset = rows, folds, preset
        self.out_dir, self.device, self.log = out_dir, device or preset.get("device", "cpu"), log
        self.results_root = Path(os.environ["nnUNet_results"]) / self.dataset
        self.preprocessed = Path(os.environ["nnUNet_preprocessed"]) / self.dataset
        self.commands: list[str] = []

    # -- environment of the trainings -----------------------------------------------------------
    def base_env(self) -> dict:
        """The user's environment with this plugin's trainer folder and without inherited budget variables
        (the preset alone sets the budget, or rows would differ silently)."""
        import meddinov3_nnunet

        env = {k: v for k, v in os.environ.items() if k not in BUDGET_VARIABLES}
        folders = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        if meddinov3_nnunet.ext_trainer_dir() not in folders:
            folders.append(meddinov3_nnunet.ext_trainer_dir())
        env["nnUNet_extTrainer"] = os.pathsep.join(folders)
        if self.device == "cpu":
            # nnU-Net's own defaults (12 augmentation workers capped at the core count, 8 spawned export and
            # preprocessing workers) oversubscribe a small CPU machine; the user's values win
            workers = str(min(2, os.cpu_count() or 1))
            env.setdefault("nnUNet_n_proc_DA", workers)
            env.setdefault("nnUNet_def_n_proc", workers)
        return env

    def env(self, row: Row) -> dict:
        """Environment of one row's training: the preset's budget and the configuration's batch size."""
        env = self.base_env()
        env.update({k: str(v) for k, v in self.preset.get("budget", {}).items()})
        batch = self.preset.get("batch_size", {}).get(row.configuration)
        if batch:
            env[BATCH_SIZE] = str(batch)
        return env

    def _run(self, command: list[str], env: dict, log_file: Path, stats_file: Path | None = None) -> dict:
        self.commands.append(" ".join(f"{k}={v}" for k, v in env.items() if k.startswith("MEDDINOV3_"))
                             + (" " if any(k.startswith("MEDDINOV3_") for k in env) else "") + " ".join(command))
        self.log(f"$ {self.commands[-1]}")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        stats_file = stats_file or log_file.with_suffix(".stats.json")
        # a stale file must not pass for this run's result; a resumed run (--c) adds to the earlier attempts
        earlier = json.loads(stats_file.read_text()) if stats_file.is_file() and "--c" in command else None
        stats_file.unlink(missing_ok=True)
        with open(log_file, "a") as handle:
            process = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.evaluation.process_monitor",
                                      str(stats_file), *command], env=env,
                                     stdout=handle, stderr=subprocess.STDOUT)
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"returncode": process.returncode}
        if earlier and "wall_seconds" in stats:
            stats.update(wall_seconds=stats["wall_seconds"] + earlier.get("wall_seconds", 0.0),
                         max_rss_mib=max(stats["max_rss_mib"], earlier.get("max_rss_mib", 0.0)),
                         gpu_peak_mib=max((v for v in (stats.get("gpu_peak_mib"), earlier.get("gpu_peak_mib"))
                                           if v is not None), default=None),
                         attempts=earlier.get("attempts", 1) + 1)
            write_text_atomic(stats_file, json.dumps(stats))
        if stats["returncode"] != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {stats['returncode']}); see {log_file}")
        return stats

    @staticmethod
    def _tool(name: str) -> str:
        candidate = Path(sys.executable).parent / name
        return str(candidate) if candidate.exists() else name

    # -- preparation ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """nnU-Net planning/preprocessing for the rows' configurations, the ViT-aware plan, and nnU-Net's
        default 5-fold split (so that pretraining can use the training cases of a fold before any training)."""
        log_file = self.out_dir / "logs" / "prepare.log"
        env = self.base_env()
        configurations = sorted({r.configuration for r in self.rows})
        stock = [c for c in configurations if c in ("2d", "3d_fullres", "3d_lowres")]
        plans_file = self.preprocessed / "nnUNetPlans.json"
        missing = [c for c in stock if not (self.preprocessed / f"nnUNetPlans_{c}").is_dir()]
        if not plans_file.is_file() or missing:
            self._run([self._tool("nnUNetv2_plan_and_preprocess"), "-d", self.dataset[7:10], "-c",
                       *(missing or stock or ["2d"]), "-np", "2"], env, log_file)
        for configuration in configurations:
            plans = json.loads(plans_file.read_text())
            if configuration not in plans["configurations"]:
                self._run([sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", self.dataset, "-c",
                           configuration, "--preset", self.preset.get("plan_preset", "default")], env, log_file)
        ensure_default_splits(self.preprocessed)

    # -- one row / fold -------------------------------------------------------------------------
    def fold_dir(self, row: Row, fold: int) -> Path:
        return self.results_root / row.folder_name / f"fold_{fold}"

    def row_out(self, row: Row, fold: int) -> Path:
        return self.out_dir / "rows" / row.folder_name / f"fold_{fold}"

    def train(self, row: Row, fold: int) -> None:
        fold_dir, out = self.fold_dir(row, fold), self.row_out(row, fold)
        command = [self._tool("nnUNetv2_train"), self.dataset[7:10], row.configuration, str(fold), "-tr", row.trainer,
                   "-p", row.plans, "-device", self.device]
        if (fold_dir / "checkpoint_final.pth").is_file():
            if (fold_dir / "validation" / "summary.json").is_file():
                self.log(f"[{row.label} fold {fold}] trained and validated: skipped")
                return
            self._run(command + ["--val"], self.env(row), out / "train.log", out / "validation.stats.json")
            return
        if (fold_dir / "checkpoint_latest.pth").is_file():
            command.append("--c")
        self._run(command, self.env(row), out / "train.log", out / "train.stats.json")

    def evaluate(self, row: Row, fold: int) -> dict:
        out, validation = self.row_out(row, fold), self.fold_dir(row, fold) / "validation"
        # reuse an evaluation only if it is newer than every file of the validation folder (a row trained or
        # validated again must not keep the numbers of its previous predictions)
        newest_prediction = max((p.stat().st_mtime for p in validation.iterdir()), default=0.0)
        if (out / "summary.json").is_file() and (out / "summary.json").stat().st_mtime >= newest_prediction:
            return load_summary(out / "summary.json")
        validation_cases = json.loads((self.preprocessed / "splits_final.json").read_text())[fold]["val"]
        return evaluate_folders(validation, self.preprocessed / "gt_segmentations",
                                self.preprocessed / "dataset.json", self.preset.get("nsd_tolerance_mm", 1.0), out,
                                num_processes=2, cases=validation_cases)

    def run(self, collect_only: bool = False) -> dict:
        if not collect_only:
            self.prepare()
        collected = {}
        for row in self.rows:
            for fold in self.folds:
                if not collect_only:
                    self.log(f"[{row.label} fold {fold}] {datetime.now():%H:%M:%S}")
                    self.train(row, fold)
                if not (self.fold_dir(row, fold) / "validation").is_dir():
                    self.log(f"[{row.label} fold {fold}] no validation predictions yet: left out of the table")
                    continue
                collected[(row, fold)] = self.collect(row, fold)
        if self.commands:
            with open(self.out_dir / "commands.txt", "a") as handle:
                handle.write(f"# {datetime.now():%Y-%m-%d %H:%M}\n" + "\n".join(self.commands) + "\n")
        return write_outputs(collected, self.out_dir, self.preset)

    def collect(self, row: Row, fold: int) -> dict:
        summary = self.evaluate(row, fold)
        out = self.row_out(row, fold)
        logs = parse_training_logs(self.fold_dir(row, fold))
        stats = json.loads((out / "train.stats.json").read_text()) if (out / "train.stats.json").is_file() else {}
        budget = self.preset.get("budget", {})
        iterations = int(budget.get(ITERS_PER_EPOCH, 250))
        train_seconds = sum(logs["epoch_seconds"])
        return {"row": row, "fold": fold, "summary": summary, "curves": logs, "stats": stats,
                "epochs": len(logs["train_loss"]), "iterations_per_epoch": iterations,
                "iterations_per_second": len(logs["epoch_seconds"]) * iterations / train_seconds if train_seconds else math.nan}


def ensure_default_splits(preprocessed: Path) -> None:
    """Writes nnU-Net's default 5-fold split (same function, same seed as nnUNetTrainer.do_split) if missing."""
    split_file = preprocessed / "splits_final.json"
    if split_file.is_file():
        return
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    configuration_dirs = [p for p in preprocessed.iterdir() if p.is_dir() and p.name.startswith("nnUNetPlans_")]
    identifiers = sorted({p.name.split(".")[0] for d in configuration_dirs for p in d.iterdir()
                          if p.name.endswith((".b2nd", ".npz", ".pkl")) and not p.name.endswith("_seg.b2nd")})
    if not identifiers:
        raise BenchmarkError(f"{preprocessed}: no preprocessed cases to split")
    write_text_atomic(split_file, json.dumps(generate_crossval_split(identifiers, seed=12345, n_splits=5), indent=1))


# ---------------------------------------------------------------------------------------------
# tables and plots
# ---------------------------------------------------------------------------------------------
def write_outputs(collected: dict, out_dir: Path, preset: dict) -> dict:
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for (row, fold), item in collected.items():
        summary, stats = item["summary"], item["stats"]
        cells = [row.label, row.trainer, row.configuration, str(fold)]
        cells += [format_cell(summary["per_class"][c]["dsc"], "dsc") for c in classes]
        cells += [format_cell(summary["overall"][m], m) for m in METRICS]
        wall = stats.get("wall_seconds", math.nan) / 60
        cells += [f"{item['epochs']} x {item['iterations_per_epoch']}", f"{wall:.1f}",
                  f"{item['iterations_per_second']:.2f}",
                  f"{item['curves'].get('inference_seconds_per_case', math.nan):.2f}",
                  f"{stats.get('max_rss_mib', math.nan):.0f}"]
        if with_gpu:
            cells.append(f"{stats['gpu_peak_mib']:.0f}" if stats.get("gpu_peak_mib") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
        records.append({"label": row.label, "trainer": row.trainer, "configuration": row.configuration, "fold": fold,
                        "summary": {k: summary[k] for k in ("per_class", "overall", "num_cases", "nsd_tolerance_mm")},
                        "curves": item["curves"], "stats": stats, "epochs": item["epochs"],
                        "iterations_per_epoch": item["iterations_per_epoch"],
                        "iterations_per_second": item["iterations_per_second"]})
    note = (f"DSC and NSD in % (NSD tolerance {first['nsd_tolerance_mm']:g} mm), mean ± sd over the "
            f"{first['num_cases']} validation cases; means are class-averaged. Wall time: the whole nnUNetv2_train "
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


CSV_COLUMNS = ["label", "trainer", "configuration", "fold", "class", "metric", "mean", "sd", "n", "undefined",
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
                writer.writerow([record["label"], record["trainer"], record["configuration"], record["fold"], name,
                                 metric, f"{entry['mean']:.6g}", f"{entry['sd']:.6g}", entry.get("n", ""),
                                 entry.get("undefined", "")] + [f"{v:.6g}" if isinstance(v, float) else v
                                                                 for v in timing])
    return text.getvalue()


def plot_results(collected: dict, out_dir: Path, classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row.label}" + (f" (fold {fold})" if len({f for _, f in collected}) > 1 else "")
              for row, fold in collected]
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
    for (row, fold), item in collected.items():
        curves = item["curves"]
        line, = axes[0].plot(curves["train_loss"], label=f"{row.label} train")
        axes[0].plot(curves["val_loss"], linestyle="--", color=line.get_color())
        axes[1].plot(curves["pseudo_dice"], label=row.label, color=line.get_color())
    axes[0].set(xlabel="epoch", ylabel="loss (Dice + CE; dashed: validation)")
    axes[1].set(xlabel="epoch", ylabel="pseudo Dice (nnU-Net's online validation)", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, out_dir / "learning_curves.png", dpi=120)
    plt.close(figure)


def run_benchmark(dataset: str, preset_name: str, rows: list[str] | None, folds: list[int] | None, out_dir: str,
                  device: str | None = None, collect_only: bool = False, prepare_only: bool = False) -> dict:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(name):
            raise BenchmarkError(f"environment variable {name} is not set (nnU-Net's paths)")
    preset = load_preset(preset_name)
    parsed = [Row.parse(text) for text in (rows or preset["rows"])]
    benchmark = Benchmark(dataset, parsed, folds or preset.get("folds", [0]), preset, Path(out_dir), device)
    started = time.time()
    if prepare_only:
        benchmark.prepare()
        print(f"prepared {benchmark.dataset}: splits in {benchmark.preprocessed / 'splits_final.json'}")
        return {}
    result = benchmark.run(collect_only=collect_only)
    print(f"benchmark: {time.time() - started:.0f} s; outputs in {out_dir}")
    return result
