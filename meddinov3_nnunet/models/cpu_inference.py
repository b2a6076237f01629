"""Faster bf16 inference on CPUs: linear layers through weights packed once for oneDNN.

Under CPU bf16 autocast every ``F.linear`` casts its fp32 weight to bf16 and oneDNN reorders it into its blocked
layout again, on every call. At nnU-Net's prediction shapes (batch 1, a few dozen tokens) that is most of a ViT
forward. `packed_linear` does the cast and the reorder once per weight version and reuses them while gradients are
off (nnU-Net's validation and prediction). The bf16 rounding of the weights is autocast's own, so the logits stay
within bf16 rounding of the autocast path (equal in practice: see tests/models/test_cpu_inference.py); any other case
(grad mode, fp32, CUDA, ``torch.compile`` tracing, a build without oneDNN) is plain ``F.linear``.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

_MKLDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_packed: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # owner -> (key, weight, bias)


def packs_linears(x: torch.Tensor) -> bool:
    """Whether `packed_linear` takes the packed path for input ``x`` here and now."""
    return (_MKLDNN and x.device.type == "cpu" and not torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling())


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: nn.Module,
                  sources: tuple[torch.Tensor | None, ...] | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on the packed path with the bf16 weight packed once per version of
    ``sources`` (default: weight and bias; pass the parameters when ``weight``/``bias`` are derived from them),
    cached on ``owner`` (one packed linear per owner module)."""
    if not packs_linears(x):
        return F.linear(x, weight, bias)
    sources = (weight, bias) if sources is None else sources
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.shape) for t in sources)
    entry = _packed.get(owner)
    if entry is None or entry[0] != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), None)
        entry = _packed[owner] = (key, packed, None if bias is None else bias.detach().to(torch.bfloat16))
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), entry[1], entry[2], "none", [], "")


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose forward is `packed_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self)


def use_packed_linears(module: nn.Module) -> nn.Module:
    """Turns every plain ``nn.Linear`` inside ``module`` into a `PackedLinear` in place (parameters, hooks and
    state-dict keys unchanged)."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = PackedLinear
    return module
