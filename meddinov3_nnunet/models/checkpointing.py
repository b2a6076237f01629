"""Activation checkpointing of a built network: its memory-heavy modules recompute their forward in backward.

`apply_activation_checkpointing` wraps, found by type and attribute so that new decoders are covered:

* every encoder block (timm `EvaBlock`, DINOv3's batch-subset drop-path form included);
* every decoder `UpsampleStage` and every module with ``checkpointable = True``;
* nnU-Net conv-block stages (`StackedConvBlocks`) whose output is at one of the network's two highest resolutions
  (found by one fake-tensor forward: no compute, parameters untouched).

A wrapped module keeps its parameters, state dict keys and outputs (its class becomes a subclass whose forward runs
through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` while gradients are enabled; the RNG state is
replayed, so drop path draws the same samples). Inside a wrapped module nothing is wrapped again.

Switch for the trainers: their ``activation_checkpointing`` attribute, overridden by
``MEDDINOV3_ACTIVATION_CHECKPOINTING=1`` / ``0`` (`requested`).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from timm.models.eva import EvaBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .decoder import UpsampleStage

ENV_VAR = "MEDDINOV3_ACTIVATION_CHECKPOINTING"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def requested(default: bool) -> tuple[bool, str]:
    """(on?, why): ``MEDDINOV3_ACTIVATION_CHECKPOINTING`` when set, else ``default`` (the trainer attribute)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return bool(default), f"trainer attribute activation_checkpointing = {bool(default)}"
    if value not in _ON + _OFF:
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 (on) or 0 (off)")
    return value in _ON, f"{ENV_VAR}={value}"


_classes: dict[type, type] = {}
_recompute_context = None  # set by `recompute_under`


@contextlib.contextmanager
def recompute_under(factory):
    """Inside the block, checkpointed forwards recompute under ``factory()`` (a context manager): the memory meter's
    CUDA autocast rules, which ``checkpoint`` would not carry into backward as it carries autocast itself."""
    global _recompute_context
    previous, _recompute_context = _recompute_context, factory
    try:
        yield
    finally:
        _recompute_context = previous


def _contexts(factory):
    return contextlib.nullcontext(), (factory() if factory is not None else contextlib.nullcontext())


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "activation_checkpointed", False):
        return cls
    if cls not in _classes:
        base_forward = cls.forward

        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                return base_forward(self, *args, **kwargs)
            contexts = {} if _recompute_context is None else {  # torch.compile takes dispatch modes only
                "context_fn": functools.partial(_contexts, _recompute_context)}
            return checkpoint(functools.partial(base_forward, self), *args, use_reentrant=False, **contexts, **kwargs)

        _classes[cls] = type(cls.__name__, (cls,), {"forward": forward, "activation_checkpointed": True,
                                                    "__module__": cls.__module__, "__doc__": cls.__doc__})
    return _classes[cls]


def _probe_input(network: nn.Module, device: torch.device) -> torch.Tensor:
    """A small input the network takes: (1, C, [D,] 2p, 2p) with p the token patch (and the conv path's strides)."""
    patch = network.encoder.patch_size
    path = getattr(getattr(network, "decoder", None), "path", None)
    stride = path.total_stride if path is not None else ()
    size = 2 * max([patch, *stride[-2:]])
    if hasattr(network, "slice_input"):
        depth = 2 * (stride[0] if stride else 1)
        return torch.empty(1, network.slice_input.in_channels, depth, size, size, device=device)
    return torch.empty(1, network.channel_adapter.in_channels, size, size, device=device)


def _output_sizes(network: nn.Module, modules: list[nn.Module]) -> dict[nn.Module, int]:
    """Spatial size (pixels / voxels) of each module's output in one fake forward of a probe input (in the fake mode
    of the network's parameters if they are fake)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(network.parameters())
    mode = getattr(param, "fake_mode", None) or FakeTensorMode(allow_non_fake_inputs=True)
    sizes = {}

    def record(module, _args, output):
        sizes[module] = output.shape[2:].numel()

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        with mode, torch.enable_grad():
            network(_probe_input(network, param.device))
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def checkpoint_targets(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules `apply_activation_checkpointing` wraps, outermost only."""
    convs = [m for m in network.modules() if isinstance(m, StackedConvBlocks)]
    top = set()
    if convs:
        sizes = _output_sizes(network, convs)
        resolutions = sorted(set(sizes.values()), reverse=True)[:2]
        top = {m for m in convs if sizes.get(m) in resolutions}
    chosen, names = [], []
    for name, module in network.named_modules():
        if any(name.startswith(outer + ".") for outer in names):
            continue
        if (isinstance(module, (EvaBlock, UpsampleStage)) or getattr(module, "checkpointable", False) is True
                or module in top):
            chosen.append((name, module))
            names.append(name)
    return chosen


def apply_activation_checkpointing(network: nn.Module) -> list[str]:
    """Wraps `checkpoint_targets` in place; returns their names."""
    targets = checkpoint_targets(network)
    for _, module in targets:
        module.__class__ = _checkpointed_class(type(module))
    return [name for name, _ in targets]


def summary(names: list[str]) -> str:
    """'12 encoder blocks, decoder.stages.0, ...' for logs."""
    blocks = [n for n in names if n.startswith("encoder.blocks.")]
    rest = [n for n in names if not n.startswith("encoder.blocks.")]
    return ", ".join(([f"{len(blocks)} encoder blocks"] if blocks else []) + rest)
