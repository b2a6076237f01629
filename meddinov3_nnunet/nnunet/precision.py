"""Mixed precision for fine-tuning, validation and prediction: ``MEDDINOV3_AMP=auto|bf16|fp16|off``.

``auto`` (the default): bf16 autocast on a CUDA GPU that computes it natively (compute capability 8.0+: A100, H100,
RTX 30xx on), fp16 autocast + loss scaling on older GPUs (V100, T4: torch emulates bf16 there, slowly); on the CPU
bf16 where the processor computes it natively (AVX512-BF16 or AMX, which oneDNN uses for matmuls and convolutions at
about twice the fp32 rate), fp32 elsewhere (emulated bf16 is slower than fp32). ``bf16`` / ``fp16`` force a dtype
(bf16 also where it is emulated; fp16 always with a gradient scaler), ``off`` runs fp32.

Nothing here changes process-wide state: the chosen dtypes are handed to the network, which opens its own
``torch.autocast`` context around each forward (see `MedDINOv3Net.autocast_dtypes`), so the same setting holds in
the trainer's steps, in nnU-Net's validation and in ``nnUNetv2_predict`` (which rebuilds the network through the
trainer class), whatever autocast nnU-Net itself opens around the call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from meddinov3_nnunet.errors import InputError

ENV_VAR = "MEDDINOV3_AMP"
MODES = ("auto", "bf16", "fp16", "off")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(InputError):
    """An unknown MEDDINOV3_AMP value, or a dtype the device cannot run."""


@dataclass(frozen=True)
class Precision:
    """What one device type runs: autocast dtype (None: fp32), whether gradients need a scaler, and why."""

    device_type: str
    dtype: torch.dtype | None
    reason: str

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype is torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        what = "fp32 (no autocast)" if self.dtype is None else f"{self.name} autocast"
        scaler = " with gradient scaling" if self.needs_grad_scaler else ""
        return f"precision on {self.device_type}: {what}{scaler} ({self.reason})"


def requested_mode(value: str | None = None) -> str:
    """The mode from ``value`` or the environment variable (default ``auto``), validated."""
    mode = (value if value is not None else os.environ.get(ENV_VAR, "auto")).strip().lower() or "auto"
    if mode not in MODES:
        raise PrecisionError(f"{ENV_VAR}={mode!r} is not a precision mode; use one of {', '.join(MODES)} "
                             f"(auto: bf16 where the device has it natively, else fp16 on GPUs, fp32 on CPUs)")
    return mode


def cpu_bf16_flags() -> list[str]:
    """The CPU features that make bf16 fast (empty if none): torch's own checks, then /proc/cpuinfo."""
    found = []
    checks = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported"))
    for flag, check in checks:
        function = getattr(torch.cpu, check, None)
        if function is not None and function():
            found.append(flag)
    if not found:
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
        found = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    if found and not torch.backends.mkldnn.is_available():
        return []
    return found


def cuda_bf16_native() -> bool:
    """Whether the current GPU computes bf16 natively. ``torch.cuda.is_bf16_supported()`` alone also counts the
    emulation torch offers on V100 / T4, which runs far slower than fp16 there."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no including_emulation argument
        return bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= 8


def resolve(device_type: str, mode: str | None = None) -> Precision:
    """The precision for ``device_type`` ('cuda', 'cpu', 'mps', ...) under ``mode`` (default: the env variable)."""
    mode = requested_mode(mode)
    source = f"{ENV_VAR}={mode}"
    if mode == "off":
        return Precision(device_type, None, source)
    if device_type not in ("cuda", "cpu"):
        if mode != "auto":
            raise PrecisionError(f"{source}: autocast is only supported on cuda and cpu devices, not "
                                 f"{device_type!r}; unset {ENV_VAR} or set it to off")
        return Precision(device_type, None, f"{source}: no autocast on {device_type}")
    if device_type == "cuda":
        native = cuda_bf16_native()
        if mode == "auto":
            return (Precision("cuda", torch.bfloat16, f"{source}: the GPU has native bf16") if native else
                    Precision("cuda", torch.float16, f"{source}: the GPU has no native bf16, fp16 with loss scaling"))
        if mode == "bf16" and not native:
            if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
                raise PrecisionError(f"{source}: this GPU does not support bf16; set {ENV_VAR}=fp16 or auto")
            return Precision("cuda", torch.bfloat16, f"{source}: emulated on this GPU, slower than fp16 (auto)")
        return Precision("cuda", DTYPES[mode], source)
    if mode == "auto":
        flags = cpu_bf16_flags()
        if flags:
            return Precision("cpu", torch.bfloat16, f"{source}: the CPU has native bf16 ({', '.join(flags)})")
        return Precision("cpu", None, f"{source}: the CPU has no native bf16 (avx512_bf16 / amx), fp32 is faster")
    return Precision("cpu", DTYPES[mode], source)


def autocast_dtypes(mode: str | None = None) -> dict[str, torch.dtype | None]:
    """Per device type the autocast dtype for the network (None: fp32); cuda only where a GPU is present."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device_type: resolve(device_type, mode).dtype for device_type in device_types}
