"""GPU memory of a training step per planning preset, trainer and batch (estimated by the memory meter, no GPU), and
the meter against a real CPU step at a small size; writes docs/gpu_memory.md.

    OMP_NUM_THREADS=2 python benchmarks/memory_table.py [--out docs/gpu_memory.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from meddinov3_nnunet.models.memory import (ALLOCATOR_MARGIN, CUDA_OVERHEAD_BYTES, GIB, SavedTensors,
                                            estimate_step_memory)
from meddinov3_nnunet.nnunet.planning import nnunet_loss, step_memory_of, trainer_class

COMPARISON = dict(batch=2, size=256, classes=16)
STATISTICS_BYTES = COMPARISON["batch"] * sum((COMPARISON["size"] >> k) ** 2 for k in range(4)) * 2 * 2

# preset -> (patch, classes, what): the default preset on CT (AMOS: 512² slices -> 896², 15 organs + background) and
# the cpu preset on Hippocampus (its plans' 56x40 patch at 2x -> 112x80, 2 structures + background)
PRESETS = {"default": ([896, 896], 16, "CT 512² upsampled to 896², 16 classes"),
           "cpu": ([112, 80], 3, "Hippocampus 56×40 at 2× → 112×80, 3 classes")}
TRAINERS = ["MedDINOv3Trainer", "MedDINOv3Trainer_S", "MedDINOv3Trainer_skip"]
BATCHES = [1, 8, 12, 16]
GPU_GIB = 80


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f}"


def table() -> list[str]:
    lines = ["| preset | patch | trainer | batch | eager: needs (peak, kept) GiB | checkpointed: needs (peak, kept) "
             f"GiB | fits {GPU_GIB} GiB |", "|---|---|---|---|---|---|---|"]
    for preset, (patch, classes, _) in PRESETS.items():
        for name in TRAINERS:
            trainer = trainer_class(name)
            for batch in BATCHES:
                eager, checkpointed = (step_memory_of(trainer, 1, classes, patch, batch, mode) for mode in (False, True))
                fits = ("eager" if eager.required <= GPU_GIB * GIB else
                        "checkpointed" if checkpointed.required <= GPU_GIB * GIB else "no")
                lines.append(f"| {preset} | {patch[0]}×{patch[1]} | `{name}` | {batch} | {gib(eager.required)} "
                             f"({gib(eager.peak)}, {gib(eager.saved)}) | {gib(checkpointed.required)} "
                             f"({gib(checkpointed.peak)}, {gib(checkpointed.saved)}) | {fits} |")
                print(lines[-1], flush=True)
    return lines


def fp16_rows() -> list[str]:
    """ViT-B at 896² under fp16 autocast, where the upsampling stages keep CUDA autocast's fp32 norm and GELU (as every
    precision did before they ran in bf16 under bf16)."""
    trainer = trainer_class("MedDINOv3Trainer")
    patch, classes, _ = PRESETS["default"]
    lines = ["| batch | bf16: needs (peak, kept) GiB | fp16, decoder norm in fp32: needs (peak, kept) GiB |",
             "|---|---|---|"]
    for batch in BATCHES:
        memory = [estimate_step_memory(lambda: trainer.build_plain_network(1, classes), (1, *patch), batch, dtype=dtype,
                                       loss=nnunet_loss(False)) for dtype in (torch.bfloat16, torch.float16)]
        lines.append(f"| {batch} | " + " | ".join(f"{gib(m.required)} ({gib(m.peak)}, {gib(m.saved)})" for m in memory)
                     + " |")
        print(lines[-1], flush=True)
    return lines


def measured_cpu_peak(step) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass  # the profiler's own first-use allocations stay out of the measured run
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_comparison(batch: int, size: int, classes: int) -> list[str]:
    """MedDINOv3Trainer's network (ViT-B, drop path 0.2) with nnU-Net's loss: meter vs a real CPU step."""
    from meddinov3_nnunet.models.checkpointing import apply_activation_checkpointing

    trainer = trainer_class("MedDINOv3Trainer")
    lines = ["| CPU step | kept for backward: meter / real (hooks on real tensors) | peak: meter / real (CPU "
             "allocator, profiler) | meter - real: kept, peak |", "|---|---|---|---|"]
    loss_fn = nnunet_loss(False)
    batch_bytes = batch * size * size * (4 + 2)  # the meter's peak includes its fp32 images and int16 targets
    for dtype, checkpointing in ((None, False), (None, True), (torch.bfloat16, False)):
        torch.manual_seed(0)
        network = trainer.build_plain_network(1, classes).train()
        if checkpointing:
            apply_activation_checkpointing(network)
        network.autocast_dtypes = {"cpu": dtype}
        data = torch.randn(batch, 1, size, size)
        target = torch.randint(0, classes, (batch, 1, size, size), dtype=torch.int16)

        def step(count=None):
            with SavedTensors(exclude=network) as saved:
                loss = loss_fn(network(data), target)
            loss.backward()
            network.zero_grad(set_to_none=True)
            if count is not None:
                count.append(saved.bytes)

        counted = []
        step(counted)  # warm-up (oneDNN, autocast) and the hook count
        peak = measured_cpu_peak(step) + sum(t.numel() * t.element_size() for t in network.parameters()) \
            + 8 * sum(p.numel() for p in network.parameters() if p.requires_grad)
        meter = estimate_step_memory(lambda: trainer.build_plain_network(1, classes), (1, size, size), batch,
                                     dtype=dtype, checkpointing=checkpointing, loss=loss_fn, use_cuda_rules=False)
        what = (f"{'bf16 (CPU autocast)' if dtype else 'fp32'}{', checkpointed' if checkpointing else ''}, batch "
                f"{batch} × {size}²")
        estimated_peak = meter.peak - batch_bytes
        lines.append(f"| {what} | {meter.saved:,} / {counted[0]:,} B | {estimated_peak:,} / {peak:,} B | "
                     f"{meter.saved - counted[0]:+,} B, {estimated_peak - peak:+,} B |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "gpu_memory.md"))
    args = parser.parse_args()
    start = time.time()
    rows, fp16, comparison = table(), fp16_rows(), cpu_comparison(**COMPARISON)
    presets = ";\n".join(f"`{name}`: {what}" for name, (_, _, what) in PRESETS.items())
    text = f"""# GPU memory of a training step (estimated)

Generated by `benchmarks/memory_table.py` ({datetime.date.today()}, torch {torch.__version__}, on a CPU: no GPU was
used, these are **estimates**, not measurements). `meddinov3-nnunet plan` fits its batch sizes to `--gpu-memory`
(default 80 GiB) with the same meter.

The meter (`meddinov3_nnunet.models.memory`) runs one training step (forward in training mode, nnU-Net's Dice + CE
loss, backward) of the trainer's network as fake tensors under CUDA's bf16 autocast rules (matmuls and convolutions
bf16; LayerNorm, softmax and the other ops CUDA autocast runs in fp32 in fp32; fused attention keeping q, k, v,
output and the fp32 log-sum-exp as the flash / memory-efficient / cuDNN kernels do), AdamW:

* **kept**: what the forward and the loss keep for backward (autograd's saved tensors, each storage once);
* **peak**: the largest sum of live tensors over the step (a simulation of every storage's lifetime), with the fp32
  weights and AdamW's two moments (12 bytes per parameter) and the gradients (4) that backward allocates;
* **needs**: peak + {ALLOCATOR_MARGIN:.0%} (the caching allocator's fragmentation) + {CUDA_OVERHEAD_BYTES / GIB:g} GiB
  (CUDA context, cuBLAS / cuDNN workspaces): what `plan` compares with `--gpu-memory`;
* **checkpointed**: with `MEDDINOV3_ACTIVATION_CHECKPOINTING=1` (or `activation_checkpointing = True`): every
  encoder block and the decoder's upsampling stages (and conv-block stages at the two highest resolutions, as the
  image skip's) recompute their forward in backward.

Eager PyTorch; `torch.compile` (nnU-Net compiles on CUDA by default) fuses element-wise ops and usually keeps less.
Not included: DDP's gradient buckets (about 4 bytes per parameter more), other processes on the GPU. One input
channel;
{presets}.
Drop path 0.2 in DINOv3's batch-subset form runs each encoder branch on `max(int(0.8·B), 1)` images, so the encoder's
share grows slower than the batch.

{chr(10).join(rows)}

Under bf16 autocast the decoder's upsampling stages run their LayerNorm and GELU in bf16 (`UpsampleStage.forward`;
the kernels accumulate in fp32). CUDA autocast alone runs LayerNorm in fp32, and so the GELU after it, keeping fp32
maps at up to full resolution for backward; fp16 autocast (`MEDDINOV3_AMP=fp16`) still does, which shows what the
change saves (`MedDINOv3Trainer`, default preset, eager):

{chr(10).join(fp16)}

## The meter against a measured CPU step

The same meter (without the CUDA rules: CPU autocast's own) against a real step on this CPU, ViT-B
(`MedDINOv3Trainer`'s network, drop path 0.2), 16 classes, nnU-Net's loss. Real: the saved tensors counted by the
same hooks on real tensors, and the CPU allocator's peak of live bytes during forward + loss + backward as the
PyTorch profiler records every allocation and free (plus the weights and AdamW state, as the meter counts them; the
meter's own batch tensors left out).

{chr(10).join(comparison)}

tests/models/test_memory.py checks the fp32 agreement to the byte on a tiny network, with a walk of the autograd graph
as a third count. Where they differ: under CPU bf16 the meter counts the decoder LayerNorms' statistics (mean, rstd)
in bf16 where the CPU's mixed-dtype kernel keeps them in fp32, 2 bytes a pixel each: {STATISTICS_BYTES:,} B for the four
upsampling stages of this batch, the whole difference in what is kept (CUDA's kernel keeps them in fp32, and so does
the meter under its CUDA rules); and the allocator also sees what kernels allocate inside themselves and no tensor holds
(at 128², where the peak is at the end of backward, the patch embedding's convolution backward adds 20 MB, 1 %);
the 10 % margin in **needs** stands for such workspaces and the caching allocator's slack.

Written in {time.time() - start:.0f} s on {platform.machine()}.
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
