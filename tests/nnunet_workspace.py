"""Builds small nnU-Net workspaces (raw / preprocessed / results) from the shared datasets for tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import meddinov3_nnunet

BIN = Path(sys.executable).parent


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.raw, self.preprocessed, self.results = root / "raw", root / "preprocessed", root / "results"
        for folder in (self.raw, self.preprocessed, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDINOV3_", "DINOV3_"))}
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), nnUNet_extTrainer=meddinov3_nnunet.ext_trainer_dir(),
                   nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2",
                   nnUNet_npp="0", nnUNet_nps="0")  # nnUNetv2_predict in one process: no worker start-ups
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *command, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
        program = str(BIN / command[0]) if (BIN / command[0]).exists() else command[0]
        result = subprocess.run([program, *map(str, command[1:])], env=self.env(**extra_env), capture_output=True,
                                text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, command))} failed with {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def cli(self, *args, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "meddinov3_nnunet.cli", *args, check=check, **extra_env)

    def trainer(self, trainer_class, configuration: str, fold: int, dataset: str = "Dataset004_Hippocampus"):
        """An in-process instance of ``trainer_class`` on this workspace's plans, as nnUNetv2_train builds it
        (``continue_training`` False); the caller sets the environment (``env()``) first."""
        import torch

        base = self.preprocessed / dataset
        plans = json.loads((base / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False  # what nnU-Net's run_training sets before building a trainer
        dataset_json = json.loads((base / "dataset.json").read_text())
        return trainer_class(plans, configuration, fold, dataset_json, device=torch.device("cpu"))


def link_cases(source: Path, target: Path, identifiers: list[str], channels: int, ending: str = ".nii.gz",
               labels: bool = True) -> None:
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    for identifier in identifiers:
        for channel in range(channels):
            name = f"{identifier}_{channel:04d}{ending}"
            (target / "imagesTr" / name).symlink_to(source / "imagesTr" / name)
        if labels:
            (target / "labelsTr" / f"{identifier}{ending}").symlink_to(source / "labelsTr" / f"{identifier}{ending}")


def hippocampus_subset(shared: Path, workspace: Workspace, count: int, dataset_id: int = 4) -> list[str]:
    """First ``count`` Hippocampus cases as Dataset{id}_Hippocampus; returns all case identifiers (sorted)."""
    source = shared / "datasets" / "Dataset004_Hippocampus"
    identifiers = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    target = workspace.raw / f"Dataset{dataset_id:03d}_Hippocampus"
    link_cases(source, target, identifiers[:count], channels=1)
    meta = json.loads((source / "dataset.json").read_text())
    meta.update(numTraining=count, name=target.name)
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    return identifiers


def parse_train_losses(log_text: str) -> list[float]:
    return [float(line.split("train_loss")[1]) for line in log_text.splitlines() if "train_loss" in line]
