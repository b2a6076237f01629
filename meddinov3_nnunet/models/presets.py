"""Encoder architectures as data: the named presets and the two weight flavours.

A DINOv3 ViT/16 is fully described by `EncoderArch`. Two *flavours* differ only in details that
matter for loading released weights:

* ``meta``      Meta's released DINOv3 ViTs: qkv bias (its k part masked to zero), LayerNorm eps 1e-5,
                RoPE periods in float32.
* ``meddinov3`` MedDINOv3's CT-3M ViT-B/16: no qkv bias, LayerNorm eps 1e-6, RoPE periods stored in
                bfloat16 (so the rotary angles are computed in bfloat16, as in the original).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FLAVOURS: dict[str, dict] = {
    "meta": dict(qkv_bias=True, norm_eps=1e-5, rope_dtype="fp32"),
    "meddinov3": dict(qkv_bias=False, norm_eps=1e-6, rope_dtype="bf16"),
}

# name -> (embed_dim, depth, num_heads). Heads follow DINOv3 (head dim 64), the tiny one mirrors the
# parity fixtures (head dim 32) so that tests run in seconds.
SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny16": (96, 4, 3),
    "vit_s16": (384, 12, 6),
    "vit_b16": (768, 12, 12),
    "vit_l16": (1024, 24, 16),
}


@dataclass(frozen=True)
class EncoderArch:
    """Everything needed to build a DINOv3 ViT; stored verbatim in this project's checkpoints."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_register_tokens: int = 4
    patch_size: int = 16
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    rope_base: float = 100.0
    rope_dtype: str = "bf16"  # "fp32" or "bf16": dtype the rotary angles are computed in
    layerscale_init: float = 1e-5

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"head dim {self.embed_dim // self.num_heads} must be a multiple of 4 for axial RoPE")
        if self.rope_dtype not in ("fp32", "bf16"):
            raise ValueError(f"rope_dtype must be 'fp32' or 'bf16', got {self.rope_dtype!r}")

    def replace(self, **changes) -> "EncoderArch":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown encoder architecture field(s) {sorted(unknown)}; "
                            f"valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderArch":
        return cls().replace(**values)


def preset(name: str, flavour: str = "meddinov3", **overrides) -> EncoderArch:
    """`preset("vit_b16")` -> ViT-B/16 in the MedDINOv3 flavour; overrides change single fields."""
    if name not in SIZES:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(SIZES)}")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {sorted(FLAVOURS)}")
    dim, depth, heads = SIZES[name]
    return EncoderArch(embed_dim=dim, depth=depth, num_heads=heads, **FLAVOURS[flavour]).replace(**overrides)


def default_tap_blocks(depth: int) -> tuple[int, ...]:
    """Blocks whose patch tokens the multi-scale decoder aggregates: the last block of each quarter.

    12 blocks -> (2, 5, 8, 11) as in the paper; 24 blocks -> (5, 11, 17, 23); 4 blocks -> (0, 1, 2, 3).
    """
    if depth % 4:
        raise ValueError(f"default tap blocks need a depth divisible by 4, got {depth}; pass tap_blocks explicitly")
    quarter = depth // 4
    return tuple(quarter * (i + 1) - 1 for i in range(4))
