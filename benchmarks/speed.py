"""Training-step throughput and peak memory: MedDINOv3 (ViT-S/B + multi-scale decoder) vs nnU-Net's 2D U-Net.

    python benchmarks/speed.py                      # CPU, 224^2 and 512^2, batch 2, fp32 and bf16 rows
    python benchmarks/speed.py --device cuda --batch-size 16 --precisions bf16

One training step = forward + cross-entropy + backward + AdamW step, in fp32 or under bf16 autocast (the same
context for every model; bf16 on a CPU pays where it has native bf16, see MEDDINOV3_AMP in the README). Each row
runs in its own subprocess so that the CPU peak (max RSS) belongs to that row alone.
Prints a Markdown table; numbers are for the machine it runs on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time

ROWS = [("MedDINOv3 ViT-S/16 + decoder", "vit_s16"), ("MedDINOv3 ViT-B/16 + decoder", "vit_b16"),
        ("nnU-Net 2D U-Net (PlainConvUNet)", "unet")]


def nnunet_2d_unet(size: int, num_classes: int):
    """nnU-Net's default 2D architecture for a size x size patch: stages down to a 4-8 px map, 32..512 features."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    stages = 1
    while size // 2 ** stages >= 8 and stages < 7:
        stages += 1
    stages += 1
    return PlainConvUNet(1, stages, [min(32 * 2 ** i, 512) for i in range(stages)], nn.Conv2d, 3,
                         [1] + [2] * (stages - 1), 2, num_classes, 2, conv_bias=True, norm_op=nn.InstanceNorm2d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def measure(model_name: str, size: int, batch: int, steps: int, device: str, threads: int, precision: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    num_classes = 14
    if model_name == "unet":
        model = nnunet_2d_unet(size, num_classes)
    else:
        from meddinov3_nnunet import build_network

        model = build_network(model_name, in_channels=1, num_classes=num_classes)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, num_classes, (batch, size, size), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
            outputs = out if isinstance(out, (list, tuple)) else [out]
            loss = torch.nn.functional.cross_entropy(outputs[0].float(), y)
            loss = loss + sum(o.float().mean() * 0 for o in outputs[1:])  # keep deep-supervision heads in the graph
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak_mib = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds_per_step": seconds, "slices_per_second": batch / seconds, "peak_mib": peak_mib,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args._one[0], int(args._one[1]), args.batch_size, args.steps, args.device,
                                 args.threads, args._one[2])))
        return 0

    import platform

    import torch

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads ({platform.processor() or platform.machine()})"
    print(f"Training step (fwd + bwd + AdamW), batch {args.batch_size}, 1 input channel, 14 classes, {where}, "
          f"torch {torch.__version__}\n")
    print("| model | input | precision | parameters | s / step | slices / s | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for size, (label, name), precision in itertools.product(args.sizes, ROWS, args.precisions):
        command = [sys.executable, __file__, "--_one", name, str(size), precision, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--device", args.device, "--threads",
                   str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"| {label} | {size}² | {precision} | failed: {result.stderr.strip().splitlines()[-1]} | | | |")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        memory_kind = "GPU max allocated" if args.device == "cuda" else "max RSS"
        print(f"| {label} | {size}² | {precision} | {row['parameters'] / 1e6:.1f} M | "
              f"{row['seconds_per_step']:.2f} | {row['slices_per_second']:.2f} | {row['peak_mib']:.0f} "
              f"({memory_kind}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
