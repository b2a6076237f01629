"""Encoder checkpoint formats: reading (one reader per format, as data), the strict check, loading, atomic saving.

This module is the one place where checkpoint files are decided. Four layouts are read (`FORMATS`, tried in order):

``meddinov3_nnunet``  this project's encoder file (written by pretraining's export and `save_encoder`):
                      ``{'format': 'meddinov3_nnunet.encoder', 'format_version': 1, 'arch': {...},
                      'state_dict': {timm layout + mask_token}, 'meta': {...}}``.
``meddinov3_teacher`` MedDINOv3's ``model.pth``: ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}``;
                      the backbone is kept, the heads are ignored.
``meta_dinov3``       Meta's flat ``dinov3_vit*16_pretrain_*.pth`` (official DINOv3 key names).
``timm``              a state dict of timm's ``vit_*_patch16_dinov3[_qkvb]`` (``reg_token``, ``gamma_1``, ...); it
                      stores no RoPE periods, so its head count follows the rule of `key_layouts`.

Everything is read with ``torch.load(..., map_location='cpu', weights_only=True)``: no checkpoint can run code, and
a file that holds code (a pickle global) is refused as such. Internally weights use the timm key layout of
`DINOv3Encoder` (key maps in `key_layouts`). `check_checkpoint` is the strict check of training (size, missing,
unexpected and wrongly shaped keys, non-finite values) without building real weights; `inspect-checkpoint` and
`doctor` run it too.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from ..atomic_io import atomic_path
from ..errors import InputError
from .encoder import DINOv3Encoder, count_parameters
from .key_layouts import (LayoutError, check_rope_periods, describe_arch, from_official_layout, infer_arch,
                          isclose_arch, matching_preset, strip_prefix, to_official_layout)
from .presets import FLAVOURS, EncoderArch

__all__ = ["CheckpointError", "SizeMismatchError", "EncoderCheckpoint", "FORMATS", "load_torch_file",
           "read_checkpoint", "checkpoint_from_object", "check_checkpoint", "load_into", "load_encoder",
           "atomic_save", "encoder_state", "save_encoder", "save_teacher_layout", "describe_arch", "isclose_arch",
           "strip_prefix", "to_official_layout", "matching_preset"]

log = logging.getLogger(__name__)

PROJECT_FORMAT = "meddinov3_nnunet.encoder"
PROJECT_FORMAT_VERSION = 1


class CheckpointError(InputError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


class SizeMismatchError(CheckpointError):
    """A checkpoint of another encoder size; ``checkpoint_preset`` names its size (e.g. 'vit_s16') or is None."""

    def __init__(self, message: str, checkpoint_preset: str | None):
        super().__init__(message)
        self.checkpoint_preset = checkpoint_preset


@dataclass
class EncoderCheckpoint:
    """An encoder read from disk: its detected format, architecture and timm-layout weights."""

    path: str
    format: str
    arch: EncoderArch
    state_dict: dict[str, torch.Tensor]
    ignored_keys: list[str] = field(default_factory=list)  # e.g. dino_head.* of a teacher checkpoint
    meta: dict = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.state_dict.values())


# ---------------------------------------------------------------------------------------------
# reading: one detector and one reader per format
# ---------------------------------------------------------------------------------------------
class _Read(NamedTuple):
    arch: EncoderArch
    state_dict: dict
    ignored: list
    meta: dict


def _official(state: dict, flavour: str, num_heads: int | None) -> tuple[dict, EncoderArch]:
    """Official DINOv3 backbone keys -> (timm-layout weights, arch); stored RoPE periods are checked."""
    state_dict, periods = from_official_layout(state)
    defaults = {"norm_eps": FLAVOURS[flavour]["norm_eps"], "rope_dtype": FLAVOURS[flavour]["rope_dtype"]}
    arch = infer_arch(state_dict, defaults, periods, num_heads)
    if periods is not None:
        check_rope_periods(periods, arch)
    return state_dict, arch


def _read_project(obj: dict, num_heads: int | None) -> _Read:
    if obj.get("format_version") != PROJECT_FORMAT_VERSION:
        raise CheckpointError(f"format_version {obj.get('format_version')} is not supported by this version of "
                              f"meddinov3-nnunet (reads {PROJECT_FORMAT_VERSION}); upgrade it")
    return _Read(EncoderArch.from_dict(obj["arch"]), dict(obj["state_dict"]), [], dict(obj.get("meta", {})))


def _read_teacher(obj: dict, num_heads: int | None) -> _Read:
    teacher = obj["teacher"]
    backbone = strip_prefix(teacher, "backbone")
    if not backbone:
        raise CheckpointError("the 'teacher' dict has no 'backbone.*' keys")
    state_dict, arch = _official(backbone, "meddinov3", num_heads)
    # Files exported by this project carry their exact architecture next to 'teacher'.
    hints = obj.get("meddinov3_nnunet")
    if isinstance(hints, dict) and hints.get("arch"):
        arch = EncoderArch.from_dict(hints["arch"])
    return _Read(arch, state_dict, sorted(k for k in teacher if not k.startswith("backbone.")), {})


def _read_meta(obj: dict, num_heads: int | None) -> _Read:
    state_dict, arch = _official(obj, "meta", num_heads)
    return _Read(arch, state_dict, [], {})


def _read_timm(obj: dict, num_heads: int | None) -> _Read:
    state_dict = {k: v for k, v in obj.items() if not k.startswith(("head.", "fc_norm.", "rope."))}
    arch = infer_arch(state_dict, {"norm_eps": FLAVOURS["meta"]["norm_eps"], "rope_dtype": "fp32"}, None, num_heads)
    return _Read(arch, state_dict, sorted(set(obj) - set(state_dict)), {})


def _tensors_only(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


class Format(NamedTuple):
    name: str
    detect: Callable[[object], bool]
    read: Callable[[dict, int | None], _Read]


FORMATS: tuple[Format, ...] = (
    Format("meddinov3_nnunet", lambda o: isinstance(o, dict) and o.get("format") == PROJECT_FORMAT, _read_project),
    Format("meddinov3_teacher", lambda o: isinstance(o, dict) and isinstance(o.get("teacher"), dict), _read_teacher),
    Format("meta_dinov3", lambda o: _tensors_only(o) and ("storage_tokens" in o or "rope_embed.periods" in o
                                                          or any(k.endswith("ls1.gamma") for k in o)), _read_meta),
    Format("timm", lambda o: _tensors_only(o) and "cls_token" in o and any(k.endswith("gamma_1") for k in o),
           _read_timm),
)

_REFUSED_GLOBAL = re.compile(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)


def load_torch_file(path: str | os.PathLike):
    """``torch.load`` of a tensors-only file on the CPU; any failure is one `CheckpointError` naming the file
    and what is wrong: not there, a folder, refused because it holds code, or damaged."""
    path = str(path)
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith((".pth", ".pt")))
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; pass the file itself"
                              + (f" (it holds {', '.join(inside[:3])})" if inside else ""))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file. Check the path (or the variable that points to it).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged/unsafe files
        message = str(err)
        refused = _REFUSED_GLOBAL.search(message)
        if refused:
            raise CheckpointError(
                f"{path}: refused: the file contains code (pickle global {refused.group(1)}), and loading it "
                f"could run that code; nothing was run. If you trust its source, re-save only the tensors "
                f"(torch.save(model.state_dict(), ...)).") from None
        reason = next((line for line in message.splitlines() if "Unsupported operand" in line), None) \
            or (message.splitlines()[0] if message else type(err).__name__)
        reason = reason.strip().split(". ")[0][:160]
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({reason}). The file is damaged or "
            f"not a checkpoint; download or export it again.") from None


def detect_format(obj) -> str:
    """Name of the first of `FORMATS` whose detector accepts a loaded checkpoint object."""
    for fmt in FORMATS:
        if fmt.detect(obj):
            return fmt.name
    raise CheckpointError("unknown checkpoint layout")


def read_checkpoint(path: str | os.PathLike, num_heads: int | None = None) -> EncoderCheckpoint:
    """Loads any supported encoder checkpoint into the timm layout, with its architecture inferred
    (``num_heads``: for a file that stores no RoPE periods and has no preset size, see `key_layouts`)."""
    path = str(path)
    return checkpoint_from_object(load_torch_file(path), path, num_heads)


def checkpoint_from_object(obj, path: str, num_heads: int | None = None) -> EncoderCheckpoint:
    """`read_checkpoint` of an object already loaded from ``path`` (so a caller that inspects it first reads
    the file once)."""
    for wrapper in ("model", "state_dict", "module"):  # common training-script wrappers
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 3 \
                and "format" not in obj:
            obj = obj[wrapper]
    fmt = next((f for f in FORMATS if f.detect(obj)), None)
    if fmt is None:
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a DINOv3/MedDINOv3 encoder checkpoint (first keys: {keys}). Supported: Meta's "
            f"dinov3_vit*16_pretrain_*.pth, MedDINOv3's model.pth, a timm vit_*_patch16_dinov3 state dict, or "
            f"a file written by `meddinov3-nnunet export`.")
    try:
        read = fmt.read(obj, num_heads)
    except (CheckpointError, LayoutError) as err:
        raise CheckpointError(f"{path} (detected format: {fmt.name}): {err}") from None
    return EncoderCheckpoint(path=path, format=fmt.name, arch=read.arch, state_dict=read.state_dict,
                             ignored_keys=read.ignored, meta=read.meta)


# ---------------------------------------------------------------------------------------------
# the strict check and loading into a model
# ---------------------------------------------------------------------------------------------
_BIAS_KEY = re.compile(r"attn\.(q|v)_bias$")


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    return f"  {title}: " + ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _checked_source(target: dict[str, torch.Tensor], target_arch: EncoderArch,
                    checkpoint: EncoderCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as ``target`` expects them, or one `CheckpointError` with everything wrong.

    Exceptions to exactness that change nothing numerically: q/v biases that are all zero may be dropped
    (Meta's distilled ViTs store zeros), missing biases load as zero, and a timm state dict may lack
    ``mask_token`` (timm drops it; the encoder keeps its zero init)."""
    if not isclose_arch(checkpoint.arch, target_arch):
        size = matching_preset(checkpoint.arch)
        raise SizeMismatchError(
            f"{checkpoint.path} holds another encoder size ({describe_arch(checkpoint.arch)}) than the model "
            f"({describe_arch(target_arch)}). Fix: use "
            + (f"a trainer/preset of size {size}" if size else "the trainer/preset of the checkpoint's size"), size)
    source = dict(checkpoint.state_dict)
    for key in [k for k in source if _BIAS_KEY.search(k) and k not in target]:
        if torch.count_nonzero(source[key]) == 0:
            del source[key]
    for key in [k for k in target if _BIAS_KEY.search(k) and k not in source]:
        source[key] = torch.zeros_like(target[key], device="cpu")
    if checkpoint.format == "timm" and "mask_token" not in source and "mask_token" in target:
        source["mask_token"] = torch.zeros_like(target["mask_token"], device="cpu")

    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
                         for k in set(source) & set(target) if source[k].shape != target[k].shape)
    non_finite = sorted(f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for k, v in source.items()
                        if v.is_floating_point() and not torch.isfinite(v).all())
    if missing or unexpected or wrong_shape or non_finite:
        fits = not (missing or unexpected or wrong_shape)
        lines = [f"{checkpoint.path} (detected format: {checkpoint.format}, {describe_arch(checkpoint.arch)}) "
                 + ("holds unusable weights:" if fits else f"does not fit the encoder ({describe_arch(target_arch)}):")]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrongly shaped keys", wrong_shape), ("non-finite values (NaN/inf) in", non_finite)):
            if items:
                lines.append(_listing(title, items))
        lines.append("  Fix: " + ("the file is damaged or its training diverged; use an earlier or a fresh copy"
                                  if fits else
                                  "pick the trainer/preset of the checkpoint's size, or pass the matching "
                                  "architecture"))
        raise CheckpointError("\n".join(lines))
    return source


def check_checkpoint(checkpoint: EncoderCheckpoint, arch: EncoderArch | None = None) -> None:
    """The strict check of `load_into` against ``arch`` (default: the checkpoint's own architecture), on the
    meta device: no weights are allocated, so it is cheap even for ViT-L."""
    arch = arch or checkpoint.arch
    with torch.device("meta"):
        target = DINOv3Encoder(arch).state_dict()
    _checked_source(target, arch, checkpoint)


def load_into(encoder: DINOv3Encoder, checkpoint: EncoderCheckpoint) -> None:
    """Strictly copies the checkpoint's weights into ``encoder``; anything that does not fit (another size;
    missing, unexpected or wrongly shaped keys; non-finite values) raises one `CheckpointError`."""
    encoder.load_state_dict(_checked_source(encoder.state_dict(), encoder.arch, checkpoint), strict=True)
    for name in ("norm_eps", "rope_dtype"):
        if getattr(checkpoint.arch, name) != getattr(encoder.arch, name):
            log.warning("%s: %s=%s in the checkpoint, %s in the encoder", checkpoint.path, name,
                        getattr(checkpoint.arch, name), getattr(encoder.arch, name))


def load_encoder(path: str | os.PathLike, drop_path_rate: float = 0.0, drop_path_mode: str = "batch_subset",
                 **overrides) -> DINOv3Encoder:
    """Encoder with the architecture inferred from the weights; ``overrides`` change arch fields
    (e.g. ``num_heads=3``, ``norm_eps=1e-6``)."""
    checkpoint = read_checkpoint(path, num_heads=overrides.get("num_heads"))
    arch = checkpoint.arch.replace(**overrides) if overrides else checkpoint.arch
    encoder = DINOv3Encoder(arch, drop_path_rate=drop_path_rate, drop_path_mode=drop_path_mode)
    load_into(encoder, checkpoint)
    log.info("loaded encoder %s (%s, %s, %d parameters)", path, checkpoint.format, describe_arch(arch),
             count_parameters(encoder))
    return encoder


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same folder and an atomic rename: never a half file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def encoder_state(encoder: DINOv3Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}


def save_encoder(encoder: DINOv3Encoder, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Writes this project's encoder format (`PROJECT_FORMAT`), atomically."""
    atomic_save({
        "format": PROJECT_FORMAT,
        "format_version": PROJECT_FORMAT_VERSION,
        "arch": encoder.arch.to_dict(),
        "state_dict": encoder_state(encoder),
        "meta": dict(meta or {}),
    }, path)


def save_teacher_layout(encoder: DINOv3Encoder, path: str | os.PathLike,
                        heads: dict[str, torch.Tensor] | None = None) -> None:
    """Writes MedDINOv3's ``{'teacher': {'backbone.*', ...}}`` layout (readable by the official code),
    plus this project's exact architecture under ``'meddinov3_nnunet'``. ``heads`` are extra teacher keys
    such as ``dino_head.*`` / ``ibot_head.*``."""
    backbone = to_official_layout(encoder_state(encoder), encoder.arch)
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher.update({k: v.detach().cpu().clone() for k, v in (heads or {}).items()})
    atomic_save({"teacher": teacher, "meddinov3_nnunet": {"arch": encoder.arch.to_dict()}}, path)
