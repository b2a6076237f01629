"""nnU-Net's environment as the `demo`, `benchmark` and `plan` verbs meet it: the path variables, dataset ids and
names, the console scripts, and a subprocess runner that keeps each tool's output in a log file.

Standard library only (nnU-Net itself runs in the subprocesses), so the verbs import it cheaply.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

from meddinov3_nnunet.errors import InputError, UserError

PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_\S+$")


class CommandFailedError(UserError, RuntimeError):
    """An external command (an nnU-Net tool, a sub-command) exited with an error; the message names its log."""


def required_path(name: str) -> Path:
    """The folder in nnU-Net's path variable ``name``; an `InputError` that says how to set it when unset."""
    value = os.environ.get(name)
    if not value:
        raise InputError(f"environment variable {name} is not set: nnU-Net needs {', '.join(PATH_VARIABLES)} "
                         f"(see nnU-Net's documentation/setting_up_paths.md)")
    return Path(value)


def dataset_id(name: str) -> int:
    """``'Dataset004_Hippocampus'`` -> 4."""
    match = _DATASET_NAME.match(name)
    if not match:
        raise InputError(f"{name!r} is not an nnU-Net dataset name: it must look like Dataset004_Hippocampus "
                         f"(three digits, then a name)")
    return int(match.group(1))


def find_dataset_name(dataset: str | int) -> str:
    """'4', 4 or 'Dataset004_Hippocampus' -> 'Dataset004_Hippocampus', looked up in nnUNet_preprocessed, then
    nnUNet_raw."""
    text = str(dataset)
    if text.startswith("Dataset"):
        dataset_id(text)  # checks the form
        return text
    if not text.isdigit():
        raise InputError(f"dataset {text!r} is neither an integer id nor a name like Dataset004_Hippocampus")
    prefix = f"Dataset{int(text):03d}_"
    for base in (required_path("nnUNet_preprocessed"), Path(os.environ.get("nnUNet_raw") or "/nonexistent")):
        if base.is_dir():
            matches = sorted(p.name for p in base.iterdir() if p.name.startswith(prefix))
            if matches:
                return matches[0]
    raise InputError(f"no dataset with id {int(text)} in nnUNet_preprocessed ({os.environ.get('nnUNet_preprocessed')}) "
                     f"or nnUNet_raw ({os.environ.get('nnUNet_raw')}); check the id")


def nnunet_tool(name: str) -> str:
    """The console script ``name`` (e.g. ``nnUNetv2_train``) of this Python environment, else the one on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def plan_and_preprocess_command(dataset: str, configurations: list[str], processes: int = 2) -> list[str]:
    """nnU-Net's planning and preprocessing of ``configurations`` with ``processes`` workers for both the
    fingerprint and the preprocessing: nnU-Net's own fingerprint default (8 spawned workers, each a fresh interpreter
    importing torch) costs more than the work on a few cases or a small CPU."""
    return [nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", *configurations,
            "-np", str(processes), "-npfp", str(processes)]


USER_SETTING_PREFIXES = ("MEDDINOV3_", "DINOV3_")
WEIGHTS_VARIABLES = ("MEDDINOV3_WEIGHTS", "DINOV3_WEIGHTS")  # the trainers' `weights_env_var`s


def without_user_settings(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without the user's settings of this plugin (``MEDDINOV3_*``, ``DINOV3_*``: encoder weights, budgets,
    precision, seed, ...), for the child runs of a tool that picks its own trainer and budget (demo, GPU check):
    e.g. a ``MEDDINOV3_WEIGHTS`` naming a ViT-B file must not reach a tiny trainer. The tool adds what it sets."""
    return {key: value for key, value in base.items() if not key.startswith(USER_SETTING_PREFIXES)}


def plugin_environment(base: Mapping[str, str], few_workers: bool) -> dict[str, str]:
    """``base`` with this plugin's trainer folder added to ``nnUNet_extTrainer`` (other folders kept) and, with
    ``few_workers``, at most two nnU-Net augmentation/export workers unless ``base`` sets them: nnU-Net's own
    defaults (12 and 8 processes) oversubscribe a small CPU machine."""
    import meddinov3_nnunet

    env = dict(base)
    folders = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if meddinov3_nnunet.ext_trainer_dir() not in folders:
        folders.append(meddinov3_nnunet.ext_trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(folders)
    if few_workers:
        workers = str(min(2, os.cpu_count() or 1))
        env.setdefault("nnUNet_n_proc_DA", workers)
        env.setdefault("nnUNet_def_n_proc", workers)
    return env


def run_logged(command: list[str], env: Mapping[str, str], log_file: Path, echo: Iterable[str] = (),
               check: bool = True) -> int:
    """Runs ``command``, appending its output (stdout and stderr) to ``log_file``; lines that contain one of
    the ``echo`` strings are also printed. Returns the exit code; with ``check`` a non-zero one raises
    `CommandFailedError` naming the log."""
    echo = tuple(echo)
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as handle:
        if not echo:
            returncode = subprocess.run(command, env=dict(env), stdout=handle, stderr=subprocess.STDOUT).returncode
        else:
            process = subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
            for line in process.stdout:
                handle.write(line)
                if any(key in line for key in echo):
                    print("   " + line.rstrip(), flush=True)
            returncode = process.wait()
    if check and returncode != 0:
        raise command_failed(command, returncode, log_file)
    return returncode


def command_failed(command: list[str], returncode: int, log_file: Path) -> CommandFailedError:
    return CommandFailedError(f"{' '.join(map(str, command))} failed (exit {returncode}); see {log_file}")
