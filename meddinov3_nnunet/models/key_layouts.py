"""Pure functions on encoder weights: DINOv3's official key layout <-> timm's, the architecture a state dict
implies, RoPE periods, and one-line descriptions of a size. No file access (that is `checkpoints.py`).

Head count rule: the weights fix every shape except the number of attention heads. It is read from the stored
RoPE periods (head_dim = 4 x len(periods)) when the file has them; a file without them (a timm state dict) gets
the heads of the named preset of its size (`presets.SIZES`: dim and depth); any other size needs ``num_heads``
from the caller (a `LayoutError` says so), never a guess.
"""
from __future__ import annotations

import math
import re

import torch

from .presets import SIZES, EncoderArch


class LayoutError(ValueError):
    """Weights whose layout cannot be mapped; `checkpoints.py` adds the file name and format."""


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


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` whose key starts with ``prefix`` + '.', with that part removed
    (``backbone.blocks.0...`` -> ``blocks.0...`` for ``prefix='backbone'``)."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def rope_periods(arch: EncoderArch) -> torch.Tensor:
    """DINOv3's RoPE periods ``base ** (2 i / (head_dim / 2))`` in the arch's dtype."""
    head_dim = arch.embed_dim // arch.num_heads
    exponents = 2.0 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    periods = arch.rope_base ** exponents
    return periods.to(torch.bfloat16 if arch.rope_dtype == "bf16" else torch.float32)


def check_rope_periods(periods: torch.Tensor, arch: EncoderArch) -> None:
    expected = rope_periods(arch).float()
    if periods.numel() != expected.numel() or not torch.allclose(periods.float(), expected, rtol=1e-2):
        raise LayoutError(
            f"stored RoPE periods {periods.float().tolist()[:4]}... do not match base {arch.rope_base} with "
            f"{arch.num_heads} heads; this RoPE variant (min/max periods) is not supported")


def matching_preset(arch: EncoderArch) -> str | None:
    """Name of the preset of this size (embed dim and depth), e.g. ``'vit_s16'``, or None."""
    return next((name for name, (dim, depth, _) in SIZES.items()
                 if arch.embed_dim == dim and arch.depth == depth), None)


def infer_arch(state_dict: dict[str, torch.Tensor], defaults: dict, periods: torch.Tensor | None = None,
               num_heads: int | None = None) -> EncoderArch:
    """Architecture from timm-layout weights; heads by the module's rule (``num_heads`` wins when given);
    norm eps and RoPE dtype come from ``defaults``."""
    for pattern, reason in _UNSUPPORTED_KEY_PATTERNS.items():
        if any(re.search(pattern, k) for k in state_dict):
            raise LayoutError(reason)
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.gamma_1")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise LayoutError(f"not a DINOv3 ViT encoder: keys {missing} are missing")
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
    )
    values.update(defaults)
    if periods is not None:
        values["num_heads"] = embed_dim // (4 * periods.numel())
        values["rope_dtype"] = "bf16" if periods.dtype == torch.bfloat16 else "fp32"
    if num_heads is not None:
        values["num_heads"] = num_heads
    elif periods is None:
        size = next((heads for dim, d, heads in SIZES.values() if dim == embed_dim and d == depth), None)
        if size is None:
            raise LayoutError(
                f"the file stores no RoPE periods and its size (dim {embed_dim}, depth {depth}) is no named preset "
                f"({', '.join(SIZES)}), so its number of attention heads cannot be read from the weights; pass it: "
                f"load_encoder(path, num_heads=N) or `inspect-checkpoint --num-heads N`")
        values["num_heads"] = size
    return EncoderArch(**values)


def isclose_arch(a: EncoderArch, b: EncoderArch) -> bool:
    """Same shapes (ignores norm eps / RoPE dtype, which do not change any tensor shape)."""
    fields = ("embed_dim", "depth", "num_heads", "num_register_tokens", "patch_size", "in_chans")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and math.isclose(a.mlp_ratio, b.mlp_ratio)


def describe_arch(arch: EncoderArch) -> str:
    """One line naming the encoder's shape (and its preset, if it has one), for messages."""
    name = matching_preset(arch)
    return (f"{name + ': ' if name else ''}dim {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, "
            f"registers {arch.num_register_tokens}, qkv bias {arch.qkv_bias}")
