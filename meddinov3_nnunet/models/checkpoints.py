"""Encoder checkpoint formats: detection, key remapping, strict loading, atomic saving.

This module is the one place where checkpoint layouts are decided. Four layouts are read:

``meta_dinov3``       Meta's flat ``dinov3_vit*16_pretrain_*.pth`` (official DINOv3 key names).
``meddinov3_teacher`` MedDINOv3's ``model.pth``: ``{'teacher': {'backbone.*', 'dino_head.*', 'ibot_head.*'}}``;
                      the backbone is kept, the heads are ignored.
``timm``              a state dict of timm's ``vit_*_patch16_dinov3[_qkvb]`` (``reg_token``, ``gamma_1``, ...).
``meddinov3_nnunet``  this project's encoder file (written by pretraining's export and `save_encoder`):
                      ``{'format': 'meddinov3_nnunet.encoder', 'format_version': 1, 'arch': {...},
                      'state_dict': {timm layout + mask_token}, 'meta': {...}}``.

Everything is read with ``torch.load(..., map_location='cpu', weights_only=True)``: no checkpoint can run code.
Internally weights always use the timm key layout of `DINOv3Encoder`; `from_official_layout` and
`to_official_layout` are the pure key maps between it and DINOv3's official names.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..atomic_io import atomic_path
from ..errors import InputError
from .encoder import DINOv3Encoder, count_parameters
from .presets import FLAVOURS, EncoderArch

log = logging.getLogger(__name__)

PROJECT_FORMAT = "meddinov3_nnunet.encoder"
PROJECT_FORMAT_VERSION = 1
KNOWN_FORMATS = ("meta_dinov3", "meddinov3_teacher", "timm", "meddinov3_nnunet")


class CheckpointError(InputError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


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
# pure key maps
# ---------------------------------------------------------------------------------------------
_UNSUPPORTED_KEY_PATTERNS = {
    r"\.mlp\.w(12|1|2|3)\.": "SwiGLU MLP blocks (DINOv3 ViT-S+/H+/7B) are not supported; use ViT-S/B/L weights",
    r"^local_cls_norm\.|^cls_norm\.": "untied CLS/patch norms (DINOv3 ViT-7B) are not supported",
    r"^pos_embed$": "a learned absolute position embedding: this is not a DINOv3 (RoPE) checkpoint",
}


def from_official_layout(official: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """DINOv3 official backbone keys -> timm layout. Returns (state_dict, stored RoPE periods or None).

    The k part of ``qkv.bias`` is dropped: DINOv3 masks it to zero with ``bias_mask``, and a bias shared by
    all keys cancels in the softmax anyway, so timm's q/v-only bias is exact.
    """
    out: dict[str, torch.Tensor] = {}
    periods = None
    for key, value in official.items():
        if key == "rope_embed.periods":
            periods = value
            continue
        if key.endswith(".bias_mask"):
            continue
        if key.endswith("attn.qkv.bias"):
            q, _k, v = value.chunk(3, dim=0)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        key = key.replace("storage_tokens", "reg_token").replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
        out[key] = value
    return out, periods


def to_official_layout(state_dict: dict[str, torch.Tensor], arch: EncoderArch) -> dict[str, torch.Tensor]:
    """timm layout -> DINOv3 official backbone keys (inverse of `from_official_layout`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            v = state_dict[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v])
            mask = torch.ones(3 * value.numel(), dtype=value.dtype)
            mask[value.numel(): 2 * value.numel()] = 0
            out[key.replace("q_bias", "qkv.bias_mask")] = mask
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
    out["rope_embed.periods"] = rope_periods(arch)
    return out


def rope_periods(arch: EncoderArch) -> torch.Tensor:
    """DINOv3's RoPE periods ``base ** (2 i / (head_dim / 2))`` in the arch's dtype."""
    head_dim = arch.embed_dim // arch.num_heads
    exponents = 2.0 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    periods = arch.rope_base ** exponents
    return periods.to(torch.bfloat16 if arch.rope_dtype == "bf16" else torch.float32)


def infer_arch(state_dict: dict[str, torch.Tensor], defaults: dict, periods: torch.Tensor | None = None) -> EncoderArch:
    """Architecture from timm-layout weights. Heads come from the stored RoPE periods (head_dim = 4 x
    len(periods)) when there are any, else head dim 64; norm eps and RoPE dtype come from ``defaults``."""
    for pattern, reason in _UNSUPPORTED_KEY_PATTERNS.items():
        if any(re.search(pattern, k) for k in state_dict):
            raise CheckpointError(reason)
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.gamma_1")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"not a DINOv3 ViT encoder: keys {missing} are missing")
    embed_dim = state_dict["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    proj = state_dict["patch_embed.proj.weight"]
    values = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_register_tokens=state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0,
        patch_size=proj.shape[-1],
        in_chans=proj.shape[1],
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.q_bias" in state_dict,
        num_heads=embed_dim // 64,
    )
    values.update(defaults)
    if periods is not None:
        values["num_heads"] = embed_dim // (4 * periods.numel())
        values["rope_dtype"] = "bf16" if periods.dtype == torch.bfloat16 else "fp32"
    return EncoderArch(**values)


def _check_rope_periods(periods: torch.Tensor, arch: EncoderArch, path: str) -> None:
    expected = rope_periods(arch).float()
    if periods.numel() != expected.numel() or not torch.allclose(periods.float(), expected, rtol=1e-2):
        raise CheckpointError(
            f"{path}: stored RoPE periods {periods.float().tolist()[:4]}... do not match base "
            f"{arch.rope_base} with {arch.num_heads} heads; this RoPE variant (min/max periods) is not supported")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_torch_file(path: str):
    """``torch.load`` of a tensors-only file on the CPU; any failure is one `CheckpointError` naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file. Check the path (or the variable that points to it).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged/unsafe files
        message = str(err)
        if "Unsupported global" in message or "This file can still be loaded" in message:
            raise CheckpointError(
                f"{path}: refused, it contains Python objects beyond tensors and loading it could run code. "
                f"Re-save only the state dict (torch.save(model.state_dict(), ...)).") from None
        reason = next((line for line in message.splitlines() if "Unsupported operand" in line), None) \
            or (message.splitlines()[0] if message else type(err).__name__)
        reason = reason.strip().split(". ")[0][:160]
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({reason}). The file is damaged or "
            f"not a checkpoint; download or export it again.") from None


def detect_format(obj) -> str:
    """Name of the layout of a loaded checkpoint object (see the module docstring)."""
    if isinstance(obj, dict) and obj.get("format") == PROJECT_FORMAT:
        return "meddinov3_nnunet"
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        return "meddinov3_teacher"
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if "storage_tokens" in obj or "rope_embed.periods" in obj or any(k.endswith("ls1.gamma") for k in obj):
            return "meta_dinov3"
        if "cls_token" in obj and any(k.endswith("gamma_1") for k in obj):
            return "timm"
    raise CheckpointError("unknown checkpoint layout")


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` whose key starts with ``prefix`` + '.', with that part removed
    (``backbone.blocks.0...`` -> ``blocks.0...`` for ``prefix='backbone'``)."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def read_checkpoint(path: str | os.PathLike) -> EncoderCheckpoint:
    """Loads any supported encoder checkpoint into the timm layout, with its architecture inferred."""
    path = str(path)
    return checkpoint_from_object(load_torch_file(path), path)


def checkpoint_from_object(obj, path: str) -> EncoderCheckpoint:
    """`read_checkpoint` of an object already loaded from ``path`` (so a caller that inspects it first reads
    the file once)."""
    for wrapper in ("model", "state_dict", "module"):  # common training-script wrappers
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 3 \
                and "format" not in obj:
            obj = obj[wrapper]
    try:
        fmt = detect_format(obj)
    except CheckpointError:
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a DINOv3/MedDINOv3 encoder checkpoint (first keys: {keys}). Supported: Meta's "
            f"dinov3_vit*16_pretrain_*.pth, MedDINOv3's model.pth, a timm vit_*_patch16_dinov3 state dict, or "
            f"a file written by `meddinov3-nnunet export`.") from None

    ignored: list[str] = []
    meta: dict = {}
    try:
        if fmt == "meddinov3_nnunet":
            if obj.get("format_version") != PROJECT_FORMAT_VERSION:
                raise CheckpointError(f"format_version {obj.get('format_version')} is not supported by this "
                                      f"version of meddinov3-nnunet (reads {PROJECT_FORMAT_VERSION}); upgrade it")
            arch = EncoderArch.from_dict(obj["arch"])
            state_dict = dict(obj["state_dict"])
            meta = dict(obj.get("meta", {}))
        elif fmt == "meddinov3_teacher":
            teacher = obj["teacher"]
            backbone = strip_prefix(teacher, "backbone")
            ignored = sorted(k for k in teacher if not k.startswith("backbone."))
            if not backbone:
                raise CheckpointError("the 'teacher' dict has no 'backbone.*' keys")
            state_dict, periods = from_official_layout(backbone)
            # Files exported by this project carry their exact architecture next to 'teacher'.
            hints = obj.get("meddinov3_nnunet", {}).get("arch") if isinstance(obj.get("meddinov3_nnunet"), dict) else None
            if hints:
                arch = EncoderArch.from_dict(hints)
            else:
                arch = infer_arch(state_dict, {"norm_eps": FLAVOURS["meddinov3"]["norm_eps"],
                                               "rope_dtype": FLAVOURS["meddinov3"]["rope_dtype"]}, periods)
            if periods is not None:
                _check_rope_periods(periods, arch, path)
        elif fmt == "meta_dinov3":
            state_dict, periods = from_official_layout(obj)
            arch = infer_arch(state_dict, {"norm_eps": FLAVOURS["meta"]["norm_eps"],
                                           "rope_dtype": FLAVOURS["meta"]["rope_dtype"]}, periods)
            if periods is not None:
                _check_rope_periods(periods, arch, path)
        else:  # timm
            state_dict = {k: v for k, v in obj.items() if not k.startswith(("head.", "fc_norm.", "rope."))}
            ignored = sorted(set(obj) - set(state_dict))
            arch = infer_arch(state_dict, {"norm_eps": FLAVOURS["meta"]["norm_eps"], "rope_dtype": "fp32"})
    except CheckpointError as err:
        if str(err).startswith(path):
            raise
        raise CheckpointError(f"{path} (detected format: {fmt}): {err}") from None
    return EncoderCheckpoint(path=path, format=fmt, arch=arch, state_dict=state_dict, ignored_keys=ignored, meta=meta)


# ---------------------------------------------------------------------------------------------
# loading into a model
# ---------------------------------------------------------------------------------------------
_BIAS_KEY = re.compile(r"attn\.(q|v)_bias$")


def load_into(encoder: DINOv3Encoder, checkpoint: EncoderCheckpoint) -> None:
    """Strictly copies the checkpoint's weights into ``encoder``.

    Exceptions to exactness that change nothing numerically: q/v biases that are all zero may be dropped
    (Meta's distilled ViTs store zeros), missing biases load as zero, and a timm state dict may lack
    ``mask_token`` (timm drops it; the encoder keeps its zero init). Anything else that differs (missing,
    unexpected or wrongly shaped keys) raises one `CheckpointError` listing all of it.
    """
    target = encoder.state_dict()
    source = dict(checkpoint.state_dict)
    for key in [k for k in source if _BIAS_KEY.search(k) and k not in target]:
        if torch.count_nonzero(source[key]) == 0:
            del source[key]
    for key in [k for k in target if _BIAS_KEY.search(k) and k not in source]:
        source[key] = torch.zeros_like(target[key])
    if checkpoint.format == "timm" and "mask_token" not in source:
        source["mask_token"] = target["mask_token"]

    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    wrong_shape = sorted(f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
                         for k in set(source) & set(target) if source[k].shape != target[k].shape)
    if missing or unexpected or wrong_shape:
        lines = [f"{checkpoint.path} (detected format: {checkpoint.format}, {describe_arch(checkpoint.arch)}) "
                 f"does not fit the encoder ({describe_arch(encoder.arch)}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrongly shaped keys", wrong_shape)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        lines.append("  Fix: pick the trainer/preset of the checkpoint's size, or pass the matching architecture.")
        raise CheckpointError("\n".join(lines))
    encoder.load_state_dict(source, strict=True)
    for name in ("norm_eps", "rope_dtype"):
        if getattr(checkpoint.arch, name) != getattr(encoder.arch, name):
            log.warning("%s: %s=%s in the checkpoint, %s in the encoder", checkpoint.path, name,
                        getattr(checkpoint.arch, name), getattr(encoder.arch, name))
    encoder.source = {"path": checkpoint.path, "format": checkpoint.format}


def describe_arch(arch: EncoderArch) -> str:
    """One line naming the encoder's shape, for error messages."""
    return (f"dim {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, "
            f"registers {arch.num_register_tokens}, qkv bias {arch.qkv_bias}")


def load_encoder(path: str | os.PathLike, drop_path_rate: float = 0.0, drop_path_mode: str = "batch_subset",
                 **overrides) -> DINOv3Encoder:
    """Encoder with the architecture inferred from the weights; ``overrides`` change arch fields
    (e.g. ``num_heads=3``, ``norm_eps=1e-6``)."""
    checkpoint = read_checkpoint(path)
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


def isclose_arch(a: EncoderArch, b: EncoderArch) -> bool:
    """Same shapes (ignores norm eps / RoPE dtype, which do not change any tensor shape)."""
    fields = ("embed_dim", "depth", "num_heads", "num_register_tokens", "patch_size", "in_chans")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and math.isclose(a.mlp_ratio, b.mlp_ratio)
