"""GPU memory of one training step, estimated without a GPU.

The network is built on the meta device and run as fake CPU tensors (`torch._subclasses.FakeTensorMode`: shapes,
dtypes and storages, no data, no compute), so a ViT-B step at 896² costs about a second on any machine:

* **saved** — the bytes the forward (and the loss) keep for backward: every tensor autograd saves, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` and deduplicated by storage; parameters and buffers are not counted
  (they are in ``weights``), their autocast copies are;
* **peak** — the largest sum of live storages over forward, loss and backward (a dispatch mode follows every
  storage from its creation until its last reference goes), on top of the weights and AdamW state; gradients are
  allocated during backward and are inside it;
* **weights / gradients / optimizer** — fp32: 4 + 4 + 8 bytes per trainable parameter (AdamW's two moments).

CUDA's dtypes: fake CUDA tensors cannot run backward without a GPU, so the step runs under CPU autocast plus
`cuda_rules`: `CudaAutocastRules` casts the inputs of the ops that CUDA autocast runs in fp32 (LayerNorm, GroupNorm,
softmax, exp, sum, upsampling, ...) to fp32 as CUDA autocast does (matmuls and convolutions are bf16/fp16 on both),
and `CudaStatistics` keeps normalisation statistics in fp32 as CUDA's kernels do. Attention: the CPU's fused SDPA
kernel keeps what CUDA's flash / memory-efficient / cuDNN kernels keep (q, k, v, output, fp32 log-sum-exp), not the
N x N attention matrix. tests/models/test_memory.py checks the rules against real CUDA autocast on fake CUDA tensors
(forward only) and the counts against real CPU tensors and the CPU allocator's measured peak.

Not included: the CUDA context and cuBLAS/cuDNN workspaces, the caching allocator's fragmentation (see
`required_bytes`), DDP's gradient buckets, and ``torch.compile``, whose fused kernels usually keep less.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30
# `required_bytes`: CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack beyond `peak`
CUDA_OVERHEAD_BYTES = 1 * GIB
ALLOCATOR_MARGIN = 0.10

# ops CUDA autocast runs in fp32 (its "fp32" cast policy) that CPU autocast leaves in the lower precision
# (names as the torch functions, nn.functional functions and Tensor methods call them)
CUDA_FP32_OPS = frozenset({
    "layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "cosh", "tan", "acos", "asin", "erfinv", "pow", "__pow__", "__rpow__", "sum",
    "prod", "cumsum", "cumprod", "norm", "dist", "cdist", "pdist", "renorm", "logsumexp", "softplus",
    "cosine_similarity", "interpolate", "upsample", "upsample_bilinear", "upsample_nearest",
})
# ops CUDA autocast runs in the lower precision that CPU autocast does not
CUDA_LOWER_OPS = frozenset({"addmv", "addr", "mv", "chain_matmul", "multi_dot"})
# ops autocast runs in the widest input type; CPU autocast under fp16 refuses bf16 inputs there (the MedDINOv3 flavour's
# bf16 RoPE angles), CUDA's promotes them as PyTorch's type promotion does
PROMOTE_OPS = frozenset({"cat", "concat", "concatenate", "stack", "index_put", "index_put_", "scatter_add", "addcdiv",
                         "addcmul", "atan2", "cross", "dot", "vdot", "tensordot", "bilinear", "grid_sampler"})


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class CudaAutocastRules(TorchFunctionMode):
    """While CPU autocast is on: the inputs of `CUDA_FP32_OPS` cast to fp32 and of `CUDA_LOWER_OPS` to the autocast
    dtype, so that CPU autocast gives the dtypes CUDA autocast gives. Above autograd, as autocast itself: the casts
    are recorded and their outputs saved as on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            name = getattr(func, "__name__", None)
            dtype = (torch.float32 if name in CUDA_FP32_OPS else
                     torch.get_autocast_dtype("cpu") if name in CUDA_LOWER_OPS else None)
            if dtype is not None:
                args, kwargs = _cast_floats(args, dtype), {k: _cast_floats(v, dtype) for k, v in kwargs.items()}
            elif name in PROMOTE_OPS and torch.get_autocast_dtype("cpu") == torch.float16:
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


# kernels that return fp32 statistics for bf16/fp16 inputs on CUDA (their accumulate type) where the CPU's meta
# kernels return the input dtype
_STATISTICS_OPS = ("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit", "native_group_norm",
                   "cudnn_batch_norm")


class CudaStatistics(TorchDispatchMode):
    """The normalisation statistics (mean, inverse std) that CUDA kernels keep in fp32 also in fp32 here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in _STATISTICS_OPS and isinstance(out, tuple):
            out = (out[0],) + tuple(t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16,
                                                                                              torch.float16) else t
                                    for t in out[1:])
        return out


@contextlib.contextmanager
def cuda_rules():
    """`CudaAutocastRules` and `CudaStatistics`: the dtypes CUDA autocast and CUDA kernels give, on the CPU."""
    with CudaAutocastRules(), CudaStatistics():
        yield


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of ``tensor``'s storage (views share it), for real and fake tensors alike."""
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """``with SavedTensors(exclude=network) as saved:`` counts the storages autograd saves for backward inside the
    block (``saved.bytes``, ``saved.tensors``), each storage once, leaving out those of ``exclude``'s parameters and
    buffers. Saving is unchanged (the pack hook returns the tensor)."""

    def __init__(self, exclude: nn.Module | None = None):
        self.excluded = set() if exclude is None else {storage_key(t) for t in (*exclude.parameters(),
                                                                                 *exclude.buffers())}
        self.storages: dict[int, int] = {}
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        key = storage_key(tensor)
        if key not in self.excluded:
            self.storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class LiveStorages(TorchDispatchMode):
    """Follows every storage the ops inside the block allocate (views and in-place results of storages from before
    the block, such as parameters, are not counted); ``live`` is the bytes of those still referenced anywhere
    (Python or autograd), ``peak`` its maximum, checked after every op."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}  # storage key -> bytes, live ones only
        self.refs: dict[int, int] = {}  # storage key -> live tensor objects seen on it
        self.live = self.peak = 0

    def _released(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = storage_key(tensor)
            if key not in self.sizes:
                if key in inputs:
                    continue  # a view or in-place result of a storage from before the block
                self.sizes[key] = tensor.untyped_storage().nbytes()
                self.live += self.sizes[key]
            self.refs[key] = self.refs.get(key, 0) + 1
            weakref.finalize(tensor, self._released, key).atexit = False
        self.peak = max(self.peak, self.live)
        return out


@dataclass(frozen=True)
class StepMemory:
    """Estimated GPU memory of one training step (bytes); see the module docstring."""

    batch_size: int
    sample_shape: tuple[int, ...]  # (C, H, W) or (C, D, H, W)
    dtype: str  # autocast dtype of the step: bf16, fp16 or fp32
    checkpointing: bool
    parameters: int  # trainable
    weights: int
    gradients: int
    optimizer: int
    saved: int
    peak: int

    @property
    def required(self) -> int:
        """What a GPU needs: ``peak`` plus the allocator margin and the CUDA overhead."""
        return required_bytes(self.peak)

    def describe(self) -> str:
        return (f"batch {self.batch_size} x {list(self.sample_shape)}, {self.dtype}"
                f"{', activation checkpointing' if self.checkpointing else ''}: peak {self.peak / GIB:.1f} GiB "
                f"(activations kept for backward {self.saved / GIB:.1f} GiB, weights + gradients + AdamW "
                f"{(self.weights + self.gradients + self.optimizer) / GIB:.1f} GiB), needs about "
                f"{self.required / GIB:.1f} GiB")


def required_bytes(peak: int) -> int:
    return int(peak * (1 + ALLOCATOR_MARGIN)) + CUDA_OVERHEAD_BYTES


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32", torch.float32: "fp32"}


def fake_module(module: nn.Module, mode) -> nn.Module:
    """``module`` (built on the meta device) with fake CPU parameters and buffers of ``mode``, in place."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    for child in module.modules():
        for name, param in list(child._parameters.items()):
            if param is not None:
                child._parameters[name] = nn.Parameter(FakeTensor(mode, param.data.to("meta"), cpu),
                                                       param.requires_grad)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[name] = FakeTensor(mode, buffer.to("meta"), cpu)
    return module


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice on the logits, what nnU-Net's loss keeps for backward (fp32 softmax maps)."""
    ce = nn.functional.cross_entropy(logits, target[:, 0].long())
    probabilities = logits.softmax(1)
    one_hot = torch.zeros_like(probabilities).scatter_(1, target.long(), 1)
    dims = tuple(range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    dice = (2 * intersection + 1e-5) / (probabilities.sum(dims) + one_hot.sum(dims) + 1e-5)
    return ce - dice[:, 1:].mean()


def estimate_step_memory(build: Callable[[], nn.Module], sample_shape, batch_size: int,
                         dtype: torch.dtype | None = torch.bfloat16, checkpointing: bool = False,
                         loss: Callable | None = None, use_cuda_rules: bool = True) -> StepMemory:
    """One training step (forward in train mode, loss, backward) of ``build()``'s network on a
    (``batch_size``, *``sample_shape``) batch and its (``batch_size``, 1, *spatial) int16 target, under ``dtype``
    autocast (None: fp32) with CUDA's rules (`cuda_rules`, unless ``use_cuda_rules`` is off), as fake tensors.
    ``build`` runs on the meta device; ``checkpointing``: `apply_activation_checkpointing` first.
    ``loss(logits, target)``: default `default_loss`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .checkpointing import apply_activation_checkpointing, recompute_under

    with torch.device("meta"):
        network = build()
    network.train()
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_module(network, mode)
    if checkpointing:
        apply_activation_checkpointing(network)
    network.autocast_dtypes = {"cpu": dtype}  # MedDINOv3Net's own autocast; other networks follow the context below
    rules = cuda_rules if use_cuda_rules and dtype is not None else contextlib.nullcontext
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with mode, rules(), recompute_under(rules), LiveStorages() as live:
        data = torch.empty((batch_size, *sample_shape))
        target = torch.zeros((batch_size, 1, *sample_shape[1:]), dtype=torch.int16)
        with SavedTensors(exclude=network) as saved, autocast:
            value = (loss or default_loss)(network(data).float(), target)
        value.backward()
        del value
    return StepMemory(batch_size, tuple(sample_shape), DTYPE_NAMES[dtype], checkpointing, parameters, weights,
                      4 * parameters, 8 * parameters, saved.bytes, weights + 8 * parameters + live.peak)
