"""A/B of the whole segmentation network: official MedDINOv3 code vs this project's `build_network`.

    git --git-dir=/path/to/MedDINOv3.git archive HEAD nnUNet/nnunetv2/training/nnUNetTrainer/dinov3 | tar -x -C /tmp/md3
    python benchmarks/ab_official.py --official /tmp/md3 --rounds 4 --steps 3 --out ab_official.md

Official side: ``Primus_Multiscale`` + DINOv3 ``vit_base`` (MedDINOv3 flavour: 4 registers, no qkv bias, masked k
bias, LayerScale 1e-5) from a checkout of github.com/ricklisz/MedDINOv3, taps (2, 5, 8, 11), as its
``meddinov3_base_primus_multiscale_Trainer`` builds it (nothing of it is copied here; ``--official`` points at
a checkout). This project: ``build_network("vit_b16")``. The official random initialisation is loaded into both
(encoder through the project's checkpoint reader, decoder key by key); the eval-mode forward outputs must agree
within ``--tolerance`` before anything is timed (exit 1 otherwise).

Timing: one training step = forward + cross-entropy + backward + AdamW step, drop path 0.2 in both (the
trainers' value), interleaved over rounds (each round runs every variant for ``--steps`` steps after one
warm-up step per variant at the start); the table gives the median s/step with min-max over rounds and the
throughput ratio official / project. Precisions: fp32, and bf16 autocast around forward and loss (the same
context for both networks); the last row compares this project's default (``MEDDINOV3_AMP=auto``) with the
official code's default (fp32 without a GPU, fp16 autocast on CUDA as nnU-Net's trainer runs it).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn import functional as F

from meddinov3_nnunet.atomic_io import print_and_write

DINO_SUBDIR = Path("nnUNet/nnunetv2/training/nnUNetTrainer/dinov3")
TAPS = [2, 5, 8, 11]


def import_official(path: Path):
    """(vit_base, Primus_Multiscale) from a MedDINOv3 checkout (its root or its dinov3 folder)."""
    for root in (path / DINO_SUBDIR, path):
        if (root / "dinov3" / "models" / "primus.py").is_file():
            sys.path.insert(0, str(root))
            from dinov3.models.primus import Primus_Multiscale
            from dinov3.models.vision_transformer import vit_base
            return vit_base, Primus_Multiscale
    sys.exit(f"error: {path} is not a MedDINOv3 checkout (no {DINO_SUBDIR}/dinov3/models/primus.py); clone "
             f"github.com/ricklisz/MedDINOv3 and pass its folder")


def build_pair(official_path: Path, num_classes: int, drop_path_rate: float, seed: int):
    """Official and project networks with the same (official) random initialisation."""
    from meddinov3_nnunet.models.checkpoints import checkpoint_from_object, load_into
    from meddinov3_nnunet.models.network import build_network

    vit_base, Primus_Multiscale = import_official(official_path)
    torch.manual_seed(seed)
    encoder = vit_base(drop_path_rate=drop_path_rate, layerscale_init=1.0e-05, n_storage_tokens=4, qkv_bias=False,
                       mask_k_bias=True)
    encoder.init_weights()
    official = Primus_Multiscale(embed_dim=768, patch_embed_size=16, num_classes=num_classes, dino_encoder=encoder,
                                 interaction_indices=TAPS)
    ours = build_network("vit_b16", in_channels=1, num_classes=num_classes, tap_blocks=TAPS,
                         drop_path_rate=drop_path_rate)
    teacher = {"teacher": {f"backbone.{k}": v for k, v in encoder.state_dict().items()}}
    load_into(ours.encoder, checkpoint_from_object(teacher, "official random init"))
    decode = official.up_projection.decode
    decoder_state = {}
    for i, stage in enumerate(ours.decoder.stages):
        for j in (0, 1):
            decoder_state[f"stages.{i}.{j}.weight"] = decode[i][j].weight
            decoder_state[f"stages.{i}.{j}.bias"] = decode[i][j].bias
    decoder_state["head.weight"], decoder_state["head.bias"] = decode[-1].weight, decode[-1].bias
    ours.decoder.load_state_dict({k: v.detach().clone() for k, v in decoder_state.items()}, strict=True)
    return official, ours


def max_forward_difference(official, ours, x: torch.Tensor) -> float:
    official.eval(), ours.eval()
    with torch.no_grad():
        difference = (official(x) - ours(x)).abs().max().item()
    official.train(), ours.train()
    return difference


def make_step(model, x, y, dtype, device_type):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_device(args, device: torch.device) -> tuple[list[str], list[str]]:
    from meddinov3_nnunet.nnunet import precision

    official, ours = build_pair(args.official, args.classes, 0.2, args.seed)
    official, ours = official.to(device), ours.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 1, args.size, args.size, generator=generator).to(device)
    y = torch.randint(0, args.classes, (args.batch_size, args.size, args.size), generator=generator).to(device)
    difference = max_forward_difference(official, ours, x)
    print(f"{device}: max |official - project| forward difference (eval, fp32) = {difference:.2e}", flush=True)
    if difference > args.tolerance:
        sys.exit(f"error: the networks disagree by {difference:.2e} > {args.tolerance:.0e}; timings would compare "
                 f"different computations")
    project_default = precision.resolve(device.type)
    official_default = torch.float16 if device.type == "cuda" else None  # nnU-Net autocasts to fp16 on CUDA only
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    # each (network, dtype) is timed once; the "defaults" row reuses the equal-precision timings where it can
    keys = [(side, dtypes[name]) for name in args.precisions for side in ("official", "project")]
    keys += [key for key in (("official", official_default), ("project", project_default.dtype)) if key not in keys]
    variants = {(side, dtype): make_step(official if side == "official" else ours, x, y, dtype, device.type)
                for side, dtype in keys}
    times = {key: [] for key in variants}
    for step in variants.values():  # warm-up: allocations, kernel selection, optimizer state
        step()
    for round_index in range(args.rounds):
        order = list(variants.items())
        for key, step in order if round_index % 2 == 0 else order[::-1]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(device)
            times[key].append((time.perf_counter() - start) / args.steps)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    def cell(key):
        values = times[key]
        return statistics.median(values), f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    rows = []
    pairs = [(name, dtypes[name], dtypes[name]) for name in args.precisions]
    pairs.append((f"defaults: official {names[official_default]}, project {project_default.name} "
                  f"(MEDDINOV3_AMP=auto)", official_default, project_default.dtype))
    for label, official_dtype, project_dtype in pairs:
        (official_s, official_cell), (project_s, project_cell) = (cell(("official", official_dtype)),
                                                                  cell(("project", project_dtype)))
        rows.append(f"| {device.type} | {label} | {official_cell} | {project_cell} | {official_s / project_s:.2f}x |")
    return [f"{device}: max forward difference {difference:.1e} (eval, fp32, tolerance {args.tolerance:.0e})"], rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/ricklisz/MedDINOv3")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the Markdown table here (also printed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    notes, rows = [], []
    for device in args.devices:
        device_notes, device_rows = run_device(args, torch.device(device))
        notes += device_notes
        rows += device_rows
    where = ", ".join(torch.cuda.get_device_name() if d == "cuda" else
                      f"CPU {args.threads} threads ({platform.machine()})" for d in args.devices)
    lines = [f"Official Primus_Multiscale + DINOv3 vit_base vs this project's build_network (ViT-B/16, taps "
             f"{tuple(TAPS)}): training step (fwd + CE + bwd + AdamW), {args.size}², batch {args.batch_size}, "
             f"{args.classes} classes, drop path 0.2, {args.rounds} interleaved rounds x {args.steps} steps; {where}; "
             f"torch {torch.__version__}.", ""] + [f"- {note}" for note in notes] + [
        "", "| device | precision | official s/step (median, min-max) | this project s/step | throughput ratio |",
        "|---|---|---|---|---|"] + rows
    print_and_write("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
