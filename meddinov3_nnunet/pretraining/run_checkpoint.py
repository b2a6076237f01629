"""The pretraining run checkpoint: one home for its format, version, saving, loading and what is read out of it.

A run checkpoint (``checkpoint.pth``, ``checkpoint_stepNNNNNNN.pth``) is a dict of tensors and plain values:
``format`` / ``format_version``, ``step``, ``config`` (the resolved recipe), ``arch``, ``world_size``, ``corpus``
(path and totals), ``student`` / ``teacher`` (branch state dicts: ``backbone.*``, ``dino_head.*``,
``ibot_head.*``, and ``pixel_head.*`` when the run trains ``mim``), ``optimizer``, ``schedules``,
``data_position``, ``rng`` (one state per rank) and ``rank_fingerprints`` (per rank: sum and sum of squares of
every student/teacher tensor, equal iff in sync).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from meddinov3_nnunet.atomic_io import atomic_path
from meddinov3_nnunet.models.checkpoints import CheckpointError, atomic_save, load_torch_file, strip_prefix
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import EncoderArch

FORMAT = "meddinov3_nnunet.pretrain_run"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
HEADS = ("dino_head", "ibot_head")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def is_run_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def checked(obj, path: str | os.PathLike) -> dict:
    """``obj`` (loaded from ``path``) when it is a run checkpoint of the supported version; else a clear error."""
    if not is_run_checkpoint(obj):
        raise CheckpointError(f"{path}: not a pretraining run checkpoint (written by `meddinov3-nnunet pretrain`)")
    if obj.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: run checkpoint version {obj.get('format_version')} is not supported by this "
                              f"version of meddinov3-nnunet")
    return obj


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """A run checkpoint; when ``path`` is a run's damaged ``checkpoint.pth`` the error points to the newest intact
    ``checkpoint_stepN.pth`` kept beside it."""
    try:
        return checked(load_torch_file(str(path)), path)
    except CheckpointError as err:
        path = Path(path)
        if path.name != CHECKPOINT_NAME:
            raise
        intact = newest_intact_kept(path.parent)
        fix = (f" The newest intact kept copy is {intact} (step {_kept_step(intact)}): `cp {intact} {path}` and "
               f"resume from there." if intact else " No intact checkpoint_step*.pth is kept beside it.")
        raise CheckpointError(f"{err}{fix}") from None


_KEPT = re.compile(r"^checkpoint_step(\d+)\.pth$")


def _kept_step(path: Path) -> int:
    return int(_KEPT.match(path.name).group(1))


def newest_intact_kept(run_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint_stepN.pth`` of ``run_dir`` with the highest N that loads as a run checkpoint, or None."""
    kept = sorted((p for p in Path(run_dir).iterdir() if _KEPT.match(p.name)), key=_kept_step, reverse=True)
    for candidate in kept:
        try:
            checked(load_torch_file(str(candidate)), candidate)
            return candidate
        except CheckpointError:
            continue
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A run folder (its ``checkpoint.pth``) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no {CHECKPOINT_NAME} in this folder; pass a pretraining run folder or one "
                                  f"of its checkpoint_*.pth files")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def config_dict(path: str | os.PathLike) -> dict:
    return load_run_checkpoint(path)["config"]


# ---------------------------------------------------------------------------------------------
# branch extraction
# ---------------------------------------------------------------------------------------------
def official_head_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head's ``layers.N.*`` -> DINOv3's ``mlp.N.*`` (a single-layer head: ``layers.0.*`` -> ``mlp.*``)."""
    layer_ids = {k.split(".")[1] for k in state if k.startswith("layers.")}
    single = layer_ids == {"0"}
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            key = "mlp." + (key.split(".", 2)[2] if single else key[len("layers."):])
        out[key] = value
    return out


def backbone_state(checkpoint: dict, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The ``which`` branch's encoder weights (keys without ``backbone.``)."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    return strip_prefix(checkpoint[which], "backbone")


def head_states(checkpoint: dict, which: str = "teacher") -> dict[str, dict[str, torch.Tensor]]:
    """``{'dino_head': ..., 'ibot_head': ...}`` of the ``which`` branch, each in DINOv3's key names."""
    return {head: official_head_names(strip_prefix(checkpoint[which], head)) for head in HEADS}


def arch(checkpoint: dict) -> EncoderArch:
    return EncoderArch.from_dict(checkpoint["arch"])


def encoder(checkpoint: dict, which: str = "teacher") -> DINOv3Encoder:
    """A `DINOv3Encoder` holding the ``which`` branch's backbone."""
    out = DINOv3Encoder(arch(checkpoint))
    out.load_state_dict(backbone_state(checkpoint, which), strict=True)
    return out


# ---------------------------------------------------------------------------------------------
# RNG state and weight fingerprint
# ---------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """torch, Python, NumPy (and CUDA) generator states, in a form ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@torch.no_grad()
def fingerprint(*modules: torch.nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of every tensor of ``modules`` in float64: equal on all ranks iff in sync (up to an
    astronomically unlikely collision)."""
    tensors = [t for module in modules for t in module.state_dict().values()]
    return torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).cpu()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save(payload: dict, path: Path, keep_as: Path | None = None) -> None:
    """Writes ``payload`` (format and version added) atomically to ``path``, and a copy to ``keep_as``."""
    atomic_save({"format": FORMAT, "format_version": VERSION, **payload}, path)
    if keep_as is not None:
        with atomic_path(keep_as) as tmp:
            shutil.copyfile(path, tmp)


def kept_name(step: int) -> str:
    return f"checkpoint_step{step:07d}.pth"


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # atomic_io's ".NAME.RANDOM.tmp"


def remove_interrupted_writes(run_dir: str | os.PathLike) -> list[str]:
    """Deletes the temporaries of atomic writes that a killed run left in ``run_dir`` (``.checkpoint.pth.*.tmp``,
    ``.loss_curves.png.*.tmp``, ...; up to a full checkpoint each) and returns their names. Call it when a run
    starts, before anything writes there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = sorted(p.name for p in run_dir.iterdir() if p.is_file() and _TEMPORARY.match(p.name))
    for name in removed:
        (run_dir / name).unlink(missing_ok=True)
    return removed
