"""`meddinov3-nnunet benchmark`: nnU-Net trainings of several trainer/configuration rows under one budget,
evaluated on the same validation folds, collected into paper-style tables and plots.

With seeds (``--seeds 0 1`` or the preset's ``seeds``) every row and fold is trained once per seed: the trainer
seeds torch / numpy / random and nnU-Net's augmentation workers from ``MEDDINOV3_SEED`` (`trainers/budget.py`),
and each seed's nnU-Net results live under ``$nnUNet_results/benchmark_seed_S/`` (row outputs under
``rows/ROW/seed_S/fold_F``), so runs of different seeds never share a folder. Without seeds nothing is seeded
and the layout is nnU-Net's own.

For each row and fold it runs (or resumes with ``--c``, or re-validates with ``--val``) ``nnUNetv2_train`` in a
subprocess, then evaluates ``fold_F/validation`` against nnU-Net's ``gt_segmentations`` with
`evaluate_folders`. A row is finished when its ``checkpoint_final.pth`` and its evaluation exist; re-running
skips finished work, ``--collect-only`` runs nothing. A fresh training records the weights files named in the
environment (``fold_F/meddinov3_initialisation.json``); a finished or interrupted fold recorded with other weights
is refused (one folder must not stand for two initialisations) rather than skipped or resumed. Peak memory is the
largest resident set of the training process tree (``ru_maxrss`` of a wrapper that runs only that row). Tables,
plots and the log parsing are in `benchmark_report`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .. import named_files
from ..atomic_io import write_text_atomic
from ..errors import InputError
from ..nnunet.budget import BATCH_SIZE, BUDGET_VARIABLES, ITERS_PER_EPOCH, SEED
from ..nnunet.environment import (PATH_VARIABLES, WEIGHTS_VARIABLES, command_failed, dataset_id, find_dataset_name,
                                  nnunet_tool, plan_and_preprocess_command, plugin_environment, required_path,
                                  run_logged)
from .benchmark_report import parse_training_logs, write_outputs
from .folder_evaluation import evaluate_folders, load_summary

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class BenchmarkError(InputError):
    """Bad benchmark input; the message says what to fix."""


def load_preset(name_or_path: str) -> dict:
    """A shipped benchmark preset (``cpu``, ``gpu``) or a preset .json file."""
    return named_files.load_json(name_or_path, PRESET_DIR, "benchmark preset", BenchmarkError)


INITIALISATION_RECORD = "meddinov3_initialisation.json"


def initialisation(env: dict) -> dict:
    """The weights files a training's environment names, each with its size and modification time (so that a file
    replaced under the same path counts as other weights); {} for random initialisation or the plans' weights."""
    record = {}
    for variable in WEIGHTS_VARIABLES:
        if env.get(variable):
            path = Path(env[variable]).expanduser().resolve()
            stat = path.stat() if path.is_file() else None
            record[variable] = {"path": str(path), "bytes": stat.st_size if stat else None,
                                "mtime_ns": stat.st_mtime_ns if stat else None}
    return record


def _describe(record: dict) -> str:
    return ", ".join(f"{k}={v['path']}" for k, v in record.items()) or "no weights file (random initialisation)"


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
# running
# ---------------------------------------------------------------------------------------------
class Benchmark:
    def __init__(self, dataset: str, rows: list[Row], folds: list[int], preset: dict, out_dir: Path,
                 device: str | None = None, log=print, seeds: list[int] | None = None):
        self.dataset = find_dataset_name(dataset)
        self.rows, self.folds, self.preset = rows, folds, preset
        self.out_dir, self.device, self.log = out_dir, device or preset.get("device", "cpu"), log
        seeds = list(seeds if seeds is not None else preset.get("seeds") or [])
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
            raise BenchmarkError(f"seeds {seeds} must be distinct non-negative integers, e.g. --seeds 0 1")
        self.seeds: list[int | None] = seeds or [None]
        self.results_base = Path(os.environ["nnUNet_results"])
        self.preprocessed = Path(os.environ["nnUNet_preprocessed"]) / self.dataset
        self.commands: list[str] = []

    # -- environment of the trainings -----------------------------------------------------------
    def base_env(self) -> dict:
        """The user's environment with this plugin's trainer folder and without inherited budget variables
        (the preset alone sets the budget, or rows would differ silently)."""
        env = {k: v for k, v in os.environ.items() if k not in BUDGET_VARIABLES}
        return plugin_environment(env, few_workers=self.device == "cpu")

    def env(self, row: Row, seed: int | None = None) -> dict:
        """Environment of one row's training: the preset's budget, the configuration's batch size and, for a
        seeded run, ``MEDDINOV3_SEED`` and that seed's own ``nnUNet_results`` folder."""
        env = self.base_env()
        env.update({k: str(v) for k, v in self.preset.get("budget", {}).items()})
        batch = self.preset.get("batch_size", {}).get(row.configuration)
        if batch:
            env[BATCH_SIZE] = str(batch)
        if seed is not None:
            env[SEED] = str(seed)
            env["nnUNet_results"] = str(self.seed_results(seed))
        return env

    def seed_results(self, seed: int | None) -> Path:
        """The ``nnUNet_results`` folder of a seed's trainings (nnU-Net's own for unseeded runs)."""
        return self.results_base if seed is None else self.results_base / f"benchmark_seed_{seed}"

    def _run(self, command: list[str], env: dict, log_file: Path, stats_file: Path | None = None) -> dict:
        self.commands.append(" ".join(f"{k}={v}" for k, v in env.items() if k.startswith("MEDDINOV3_"))
                             + (" " if any(k.startswith("MEDDINOV3_") for k in env) else "") + " ".join(command))
        self.log(f"$ {self.commands[-1]}")
        stats_file = stats_file or log_file.with_suffix(".stats.json")
        # a stale file must not pass for this run's result; a resumed run (--c) adds to the earlier attempts
        earlier = json.loads(stats_file.read_text()) if stats_file.is_file() and "--c" in command else None
        stats_file.unlink(missing_ok=True)
        returncode = run_logged([sys.executable, "-m", "meddinov3_nnunet.evaluation.process_monitor", str(stats_file),
                                 *command], env, log_file, check=False)
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"returncode": returncode}
        if earlier and "wall_seconds" in stats:
            stats.update(wall_seconds=stats["wall_seconds"] + earlier.get("wall_seconds", 0.0),
                         max_rss_mib=max(stats["max_rss_mib"], earlier.get("max_rss_mib", 0.0)),
                         gpu_peak_mib=max((v for v in (stats.get("gpu_peak_mib"), earlier.get("gpu_peak_mib"))
                                           if v is not None), default=None),
                         attempts=earlier.get("attempts", 1) + 1)
            write_text_atomic(stats_file, json.dumps(stats))
        if stats["returncode"] != 0:
            raise command_failed(command, stats["returncode"], log_file)
        return stats

    # -- preparation ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """nnU-Net planning/preprocessing for the rows' configurations, the ViT-aware plan, and nnU-Net's
        default 5-fold split (so that pretraining can use the training cases of a fold before any training)."""
        log_file = self.out_dir / "logs" / "prepare.log"
        env = self.base_env()
        configurations = sorted({r.configuration for r in self.rows})
        stock = [c for c in configurations if c in ("2d", "3d_fullres", "3d_lowres")]
        derived_3d = [c for c in configurations if c.startswith("3d_") and c not in ("3d_fullres", "3d_lowres")]
        if derived_3d and "3d_fullres" not in stock:  # `plan` derives 3d_meddinov3 from 3d_fullres
            stock.append("3d_fullres")
        plans_file = self.preprocessed / "nnUNetPlans.json"
        missing = [c for c in stock if not (self.preprocessed / f"nnUNetPlans_{c}").is_dir()]
        if not plans_file.is_file() or missing:
            self._run(plan_and_preprocess_command(str(dataset_id(self.dataset)), missing or stock or ["2d"]), env,
                      log_file)
        for configuration in configurations:
            plans = json.loads(plans_file.read_text())
            if configuration not in plans["configurations"]:
                # a 3D one (3d_X) comes with its 2D sibling (2d_X) from the same `plan` run
                name = "2d_" + configuration[3:] if configuration in derived_3d else configuration
                self._run([sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", self.dataset, "-c",
                           name, "--preset", self.preset.get("plan_preset", "default")], env, log_file)
        ensure_default_splits(self.preprocessed)

    # -- one row / fold -------------------------------------------------------------------------
    def fold_dir(self, row: Row, fold: int, seed: int | None = None) -> Path:
        return self.seed_results(seed) / self.dataset / row.folder_name / f"fold_{fold}"

    def row_out(self, row: Row, fold: int, seed: int | None = None) -> Path:
        seed_part = () if seed is None else (f"seed_{seed}",)
        return self.out_dir.joinpath("rows", row.folder_name, *seed_part, f"fold_{fold}")

    def train(self, row: Row, fold: int, seed: int | None = None) -> None:
        fold_dir, out = self.fold_dir(row, fold, seed), self.row_out(row, fold, seed)
        command = [nnunet_tool("nnUNetv2_train"), str(dataset_id(self.dataset)), row.configuration, str(fold),
                   "-tr", row.trainer, "-p", row.plans, "-device", self.device]
        env = self.env(row, seed)
        started = (fold_dir / "checkpoint_final.pth").is_file() or (fold_dir / "checkpoint_latest.pth").is_file()
        if started:
            self._check_initialisation(fold_dir, initialisation(env))
        else:
            fold_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(fold_dir / INITIALISATION_RECORD, json.dumps(initialisation(env), indent=1))
        if (fold_dir / "checkpoint_final.pth").is_file():
            if (fold_dir / "validation" / "summary.json").is_file():
                self.log(f"[{row.label} fold {fold}{_seed_text(seed)}] trained and validated: skipped")
                return
            self._run(command + ["--val"], env, out / "train.log", out / "validation.stats.json")
            return
        if (fold_dir / "checkpoint_latest.pth").is_file():
            command.append("--c")
        self._run(command, env, out / "train.log", out / "train.stats.json")

    def _check_initialisation(self, fold_dir: Path, wanted: dict) -> None:
        """Refuse to skip or resume a fold that was trained from other weights than this run names."""
        record_file = fold_dir / INITIALISATION_RECORD
        if not record_file.is_file():
            self.log(f"{fold_dir}: no record of its initialisation (trained before the benchmark kept one, or by "
                     "nnUNetv2_train itself): taken as it is")
            return
        recorded = json.loads(record_file.read_text())
        if recorded != wanted:
            raise BenchmarkError(
                f"{fold_dir} was trained from {_describe(recorded)} (recorded in {record_file}), but this run starts "
                f"from {_describe(wanted)}: give this run its own nnUNet_results folder, or remove that fold folder "
                "to train it again")

    def evaluate(self, row: Row, fold: int, seed: int | None = None) -> dict:
        out, validation = self.row_out(row, fold, seed), self.fold_dir(row, fold, seed) / "validation"
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
                for seed in self.seeds:
                    where = f"[{row.label} fold {fold}{_seed_text(seed)}]"
                    if not collect_only:
                        self.log(f"{where} {datetime.now():%H:%M:%S}")
                        self.train(row, fold, seed)
                    if not (self.fold_dir(row, fold, seed) / "validation").is_dir():
                        self.log(f"{where} no validation predictions yet: left out of the table")
                        continue
                    collected[(row, fold, seed)] = self.collect(row, fold, seed)
        if self.commands:
            with open(self.out_dir / "commands.txt", "a") as handle:
                handle.write(f"# {datetime.now():%Y-%m-%d %H:%M}\n" + "\n".join(self.commands) + "\n")
        return write_outputs(collected, self.out_dir, self.preset)

    def collect(self, row: Row, fold: int, seed: int | None = None) -> dict:
        summary = self.evaluate(row, fold, seed)
        out = self.row_out(row, fold, seed)
        logs = parse_training_logs(self.fold_dir(row, fold, seed))
        stats = json.loads((out / "train.stats.json").read_text()) if (out / "train.stats.json").is_file() else {}
        budget = self.preset.get("budget", {})
        iterations = int(budget.get(ITERS_PER_EPOCH, 250))
        train_seconds = sum(logs["epoch_seconds"])
        return {"row": row, "fold": fold, "seed": seed, "summary": summary, "curves": logs, "stats": stats,
                "epochs": len(logs["train_loss"]), "iterations_per_epoch": iterations,
                "iterations_per_second": len(logs["epoch_seconds"]) * iterations / train_seconds if train_seconds else math.nan}


def _seed_text(seed: int | None) -> str:
    return "" if seed is None else f" seed {seed}"


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


def run_benchmark(dataset: str, preset_name: str, rows: list[str] | None, folds: list[int] | None, out_dir: str,
                  device: str | None = None, collect_only: bool = False, prepare_only: bool = False,
                  seeds: list[int] | None = None) -> dict:
    for name in PATH_VARIABLES:
        required_path(name)
    preset = load_preset(preset_name)
    parsed = [Row.parse(text) for text in (rows or preset["rows"])]
    benchmark = Benchmark(dataset, parsed, folds or preset.get("folds", [0]), preset, Path(out_dir), device,
                          seeds=seeds)
    started = time.time()
    if prepare_only:
        benchmark.prepare()
        print(f"prepared {benchmark.dataset}: splits in {benchmark.preprocessed / 'splits_final.json'}")
        return {}
    result = benchmark.run(collect_only=collect_only)
    print(f"benchmark: {time.time() - started:.0f} s; outputs in {out_dir}")
    return result
