"""Per-step training cost (forward + backward + AdamW) of the 2D and 3D MedDINOv3 designs at Hippocampus patch
sizes, fp32 on the CPU, to size a benchmark. Random encoder (speed does not depend on the weights). Reports CPU
seconds of this process (`time.process_time`), which a busy shared machine distorts far less than wall time;
with one thread it is the single-core wall time of an idle machine.

    OMP_NUM_THREADS=1 python benchmarks/speed_designs.py [--steps 3] [--threads 1] [--encoder vit_s16]
"""
from __future__ import annotations

import argparse
import time

import torch

import meddinov3_nnunet.trainers as trainers

# (trainer, input shape (batch first), what) — batches of the committed CPU benchmark: 32 for 2D, 2 for 3D
ROWS = [
    ("MedDINOv3Trainer_S_scratch", (32, 1, 64, 48), "2d (56x40 -> 64x48), batch 32"),
    ("MedDINOv3Trainer_S_scratch", (32, 1, 112, 80), "2d_meddinov3 (2x in-plane, 35 tokens), batch 32"),
    ("MedDINOv3Trainer_S_patch8_scratch", (32, 1, 56, 40), "2d patch 8 (35 tokens), batch 32"),
    ("MedDINOv3Trainer_S_proj_scratch", (32, 1, 64, 48), "2d projected decoder, batch 32"),
    ("MedDINOv3Trainer_S_25d_scratch", (2, 1, 40, 64, 48), "3d_fullres 2.5D, batch 2 (80 slices)"),
    ("MedDINOv3Trainer_S_slicemix_scratch", (2, 1, 40, 64, 48), "3d_fullres slice mixing, batch 2"),
    ("MedDINOv3Trainer_S_3d_scratch", (2, 1, 40, 64, 48), "3d_fullres 2.5D + mixing, batch 2"),
    ("MedDINOv3Trainer_S_3d_scratch", (2, 1, 40, 112, 80), "3d_meddinov3 2.5D + mixing, batch 2"),
    ("MedDINOv3Trainer_S_skip_scratch", (32, 1, 64, 48), "2d image skip, batch 32"),
    ("MedDINOv3Trainer_S_hybrid_scratch", (32, 1, 64, 48), "2d hybrid (conv pyramid + U-Net decoder), batch 32"),
    ("MedDINOv3Trainer_S_hybrid_novit_scratch", (32, 1, 64, 48), "2d hybrid without the ViT (ablation), batch 32"),
    ("MedDINOv3Trainer_S_hybrid_3d_scratch", (2, 1, 40, 64, 48), "3d_fullres hybrid, batch 2"),
    ("MedDINOv3Trainer_S_hybrid_3d_novit_scratch", (2, 1, 40, 64, 48), "3d_fullres hybrid without the ViT, batch 2"),
    ("nnU-Net 2d", (32, 1, 56, 40), "nnU-Net's 2d U-Net (Hippocampus plans), batch 32"),
    ("nnU-Net 3d_fullres", (2, 1, 40, 56, 40), "nnU-Net's 3d_fullres U-Net (Hippocampus plans), batch 2"),
]


def nnunet_unet(ndim: int) -> torch.nn.Module:
    """nnU-Net's PlainConvUNet as its Hippocampus plans describe it (4 stages, widths 32-256, 3x3(x3) kernels), top
    output only (its deep-supervision heads cost little)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if ndim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    return PlainConvUNet(1, 4, [32, 64, 128, 256], conv, 3, [1, 2, 2, 2], 2, 3, 2, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)


def step_time(trainer: str, shape: tuple[int, ...], steps: int) -> float:
    if trainer.startswith("nnU-Net"):
        network = nnunet_unet(len(shape) - 2)
    else:
        network = getattr(trainers, trainer).build_plain_network(1, 3)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.randn(shape)
    target = torch.randint(0, 3, (shape[0], *shape[2:]))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.process_time()
        loss = torch.nn.functional.cross_entropy(network(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - start)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (0-based) or 'all'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    print(f"| trainer | input | CPU s/step ({args.threads} thread(s), mean of {args.steps}) |\n|---|---|---|")
    for trainer, shape, what in rows:
        print(f"| `{trainer}` | {what} | {step_time(trainer, shape, args.steps):.2f} |", flush=True)


if __name__ == "__main__":
    main()
