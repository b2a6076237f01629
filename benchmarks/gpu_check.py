"""One-shot GPU check: everything this project has only run on CPUs, in one run (< 8 min on one GPU), one report.

    benchmarks/gpu_check.sh                        # on a GPU machine; writes benchmarks/gpu_check.md
    benchmarks/gpu_check.sh --dry-run --out x.md   # same code paths on the CPU at tiny sizes (the test runs this)

Sections (a failing section is reported and the run goes on; exit 1 if any failed):
1. environment: GPU, torch, bf16 support, the precision ``MEDDINOV3_AMP=auto`` picks;
2. stock nnU-Net smoke: plan -> ``nnUNetv2_train ... -tr MedDINOv3Trainer_smoke -device cuda`` -> ``nnUNetv2_predict``
   on shared Hippocampus cases (synthetic cases when the shared folder is absent): losses finite, predictions
   written with the inputs' size;
3. ViT-B/16 + multi-scale decoder training step at 896² in bf16 at the batch size ``meddinov3-nnunet plan``'s
   default preset chooses for a 512² CT slice: s/step, achieved TFLOP/s from a FLOP count of one step, the GPU's
   measured bf16 matmul peak, their ratio (goal >= 50 %), and peak memory against the GPU's memory;
4. DDP pretraining smoke under torchrun: 2 ranks where there are two GPUs (each rank needs its own GPU; NCCL
   refuses two ranks on one), else 1 rank on the GPU; the dry run uses 2 CPU ranks (gloo).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDDINOV3_SHARED", REPO.parent / "shared"))
DEADLINE = [math.inf]  # time.monotonic() by which every section must be done (set by --time-limit)


def seconds_left(cap: float) -> float:
    """A subprocess timeout: ``cap``, or less when the run's time budget ends sooner."""
    left = DEADLINE[0] - time.monotonic()
    if left < 5:
        raise TimeoutError("the run's time budget (--time-limit) is spent; later sections were not run")
    return min(cap, left)


def timed_sections(sections, report: list[str]) -> bool:
    """Runs (title, function) pairs; each function returns Markdown lines. Returns True if all passed."""
    ok = True
    for title, function in sections:
        start = time.perf_counter()
        print(f"[gpu_check] {title} ...", flush=True)
        try:
            lines, status = function(), "passed"
        except Exception as error:  # a failed section is a finding of the check, reported with its traceback
            ok, status = False, "FAILED"
            lines = [f"{type(error).__name__}: {error}", "", "```", traceback.format_exc()[-3000:], "```"]
        report += [f"## {title} — {status} ({time.perf_counter() - start:.0f} s)", ""] + lines + [""]
        print(f"[gpu_check] {title}: {status}", flush=True)
    return ok


def environment_section(device: torch.device) -> list[str]:
    from meddinov3_nnunet.nnunet import precision

    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines += [f"- GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                  f"{props.major}.{props.minor}, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}",
                  f"- bf16 supported: {torch.cuda.is_bf16_supported()}"]
    lines.append(f"- {precision.resolve(device.type).describe()}")
    return lines


# -- 2: stock nnU-Net smoke -----------------------------------------------------------------------------------
def nnunet_smoke_section(device: torch.device, workdir: Path, dry_run: bool) -> list[str]:
    from meddinov3_nnunet.demo import link_real_dataset, make_synthetic_dataset
    from meddinov3_nnunet.nnunet.environment import dataset_id, nnunet_tool, plugin_environment, without_user_settings

    raw, preprocessed, results = (workdir / name for name in ("raw", "preprocessed", "results"))
    for folder in (raw, preprocessed, results):
        folder.mkdir(parents=True, exist_ok=True)
    hippocampus = SHARED / "datasets" / "Dataset004_Hippocampus"
    cases = 7 if dry_run else 12
    if hippocampus.is_dir():
        name, test_images, _ = link_real_dataset(hippocampus, raw, cases, test_cases=2)
    else:
        name, test_images, _ = make_synthetic_dataset(raw, cases, test_cases=2)
    budget = {"MEDDINOV3_NUM_EPOCHS": "1", "MEDDINOV3_ITERS_PER_EPOCH": "2", "MEDDINOV3_VAL_ITERS": "1"} \
        if dry_run else {}
    # without the user's MEDDINOV3_* / DINOV3_* (a MEDDINOV3_WEIGHTS for ViT-B would reach the tiny smoke trainer)
    env = plugin_environment({**without_user_settings(os.environ), "nnUNet_raw": str(raw),
                              "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results),
                              "nnUNet_extTrainer": "", **budget}, few_workers=True)
    dataset = str(dataset_id(name))
    trainer, configuration = "MedDINOv3Trainer_smoke", "2d_meddinov3"
    predictions = workdir / "predictions"
    steps = [
        ("nnU-Net planning", [nnunet_tool("nnUNetv2_plan_and_preprocess"), "-d", dataset, "-c", "2d", "-np", "2"]),
        ("ViT-aware planning", [sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", dataset, "--preset",
                                "cpu", "-np", "2"]),
        ("train", [nnunet_tool("nnUNetv2_train"), dataset, configuration, "0", "-tr", trainer, "-device",
                   device.type]),
        ("predict", [nnunet_tool("nnUNetv2_predict"), "-i", str(test_images), "-o", str(predictions), "-d", dataset,
                     "-c", configuration, "-f", "0", "-tr", trainer, "-device", device.type]),
    ]
    lines = [f"Data: {name} ({'shared' if hippocampus.is_dir() else 'SYNTHETIC'}), {cases - 2} training cases, "
             f"2 held out; trainer {trainer}{' with a 1 x 2 budget (dry run)' if dry_run else ''}.", "",
             "| step | seconds |", "|---|---|"]
    outputs = {}
    for title, command in steps:
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds_left(300))
        outputs[title] = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"{title} failed ({' '.join(command)}):\n{outputs[title][-2500:]}")
        lines.append(f"| {title} | {time.perf_counter() - start:.1f} |")
    losses = [float(line.split("train_loss")[1]) for line in outputs["train"].splitlines() if "train_loss" in line]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"training losses missing or not finite: {losses}")
    precision_lines = sorted({line.strip() for line in outputs["train"].splitlines() if "precision on" in line})
    import SimpleITK as sitk

    written = sorted(predictions.glob("*.nii.gz"))
    if len(written) != 2:
        raise RuntimeError(f"expected 2 predictions in {predictions}, found {len(written)}")
    for prediction in written:
        image = sitk.ReadImage(str(test_images / prediction.name.replace(".nii.gz", "_0000.nii.gz")))
        if sitk.ReadImage(str(prediction)).GetSize() != image.GetSize():
            raise RuntimeError(f"{prediction.name} does not have the input's size")
    return lines + ["", f"- train losses per epoch: {', '.join(f'{loss:.4f}' for loss in losses)} (finite)",
                    "- 2 predictions written with the inputs' size"] + [f"- {line}" for line in precision_lines]


# -- 3: ViT-B training step at 896² ---------------------------------------------------------------------------
def planned_batch_size(size: int) -> int:
    """The batch ``meddinov3-nnunet plan`` (default preset) gives a CT dataset of 512² slices (nnU-Net 2d: patch
    512², batch 12) at ``size``² after upsampling."""
    from meddinov3_nnunet.nnunet.planning import derive_vit_plan
    from meddinov3_nnunet.plans import load_preset

    settings = load_preset("default")
    source = {"patch_size": [512, 512], "median_image_size_in_voxels": [512, 512], "spacing": [0.8, 0.8],
              "batch_size": 12}
    return derive_vit_plan(source, size, settings["max_scale"], settings["tokens_per_batch"],
                           settings["min_batch_size"]).batch_size


def matmul_peak_tflops(device: torch.device, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_section(device: torch.device, dry_run: bool, steps: int) -> list[str]:
    import resource

    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from meddinov3_nnunet.models.network import build_network

    encoder, size = ("vit_tiny16", 64) if dry_run else ("vit_b16", 896)
    batch = 2 if dry_run else planned_batch_size(size)
    classes = 14
    torch.manual_seed(0)
    network = build_network(encoder, in_channels=1, num_classes=classes, drop_path_rate=0.2).to(device).train()
    network.autocast_dtypes = {device.type: torch.bfloat16}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, classes, (batch, size, size), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(network(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        return loss

    with FlopCounterMode(display=False) as counter:
        loss = step()  # also the warm-up
    flops = counter.get_total_flops()
    step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds)
    achieved = flops / per_step / 1e12
    peak = matmul_peak_tflops(device, 256 if dry_run else 8192, 5 if dry_run else 50)
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) / 2 ** 30
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        memory = f"{used:.1f} GiB max allocated of {total:.0f} GiB ({used / total:.0%})"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB max RSS (CPU)"
    ratio = achieved / peak
    return [f"{encoder} + multi-scale decoder, {size}², batch {batch}"
            f"{' (dry run: tiny sizes)' if dry_run else ' (the default preset plan for 512² CT slices)'}, "
            f"{classes} classes, bf16 autocast, AdamW, {steps} timed steps after 2 warm-up steps.", "",
            "| s / step (median, min-max) | FLOP / step | achieved TFLOP/s | bf16 matmul peak TFLOP/s | ratio "
            "(goal >= 50 %) | peak memory |", "|---|---|---|---|---|---|",
            f"| {per_step:.3f} ({min(seconds):.3f}-{max(seconds):.3f}) | {flops / 1e9:,.1f} G | {achieved:.1f} | "
            f"{peak:.1f} | {ratio:.0%} | {memory} |", "",
            f"- last loss {loss.item():.4f} ({'finite' if math.isfinite(loss.item()) else 'NOT FINITE'})"]


# -- 4: DDP pretraining smoke ---------------------------------------------------------------------------------
TINY_PRETRAINING = ["crops.global_size=32", "crops.local_size=16", "crops.local_number=2", "optim.batch_size=4",
                    "optim.iterations=4", "optim.lr.warmup_iterations=2", "optim.teacher_temp.warmup_iterations=2",
                    "optim.freeze_last_layer_iterations=1", "dino.head_prototypes=64", "dino.head_hidden_dim=32",
                    "dino.head_bottleneck_dim=16", "ibot.head_prototypes=48", "ibot.head_hidden_dim=32",
                    "ibot.head_bottleneck_dim=16", "data.num_workers=0", "data.chunk_volumes=2"]


def ddp_section(device: torch.device, workdir: Path) -> list[str]:
    import numpy as np

    from meddinov3_nnunet.demo import write_nifti

    ranks = 2 if device.type == "cpu" or torch.cuda.device_count() >= 2 else 1
    rng = np.random.default_rng(0)
    (workdir / "ct").mkdir(parents=True)
    for index in range(4):
        volume = np.full((4, 40, 48), -1000.0)
        volume[:, 8:32, 8:40] = 40 + 30 * rng.standard_normal((4, 24, 32))
        write_nifti(volume.astype(np.float32), workdir / "ct" / f"case{index}.nii.gz")
    overrides = sum((["--set", value] for value in TINY_PRETRAINING), [])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m",
               "meddinov3_nnunet.cli", "pretrain", "--config", "tiny_cpu", *overrides, "--data",
               f"ct={workdir / 'ct'}", "-o", str(workdir / "run"), "--corpus-workers", "1", "--device", device.type,
               "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds_left(240),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"torchrun pretraining failed:\n{(result.stdout + result.stderr)[-2500:]}")
    from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint

    checkpoint = load_run_checkpoint(workdir / "run" / "checkpoint.pth")
    fingerprints = checkpoint.get("rank_fingerprints") or []
    in_sync = all(torch.equal(fingerprints[0], other) for other in fingerprints[1:])
    if not in_sync:
        raise RuntimeError("the ranks' weights differ after training")
    why = "" if ranks == 2 else " (one GPU: each rank needs its own GPU, so 1 rank; run on 2 GPUs for the 2-rank check)"
    return [f"- torchrun, {ranks} rank(s) on {device.type}{why}, backend "
            f"{'nccl' if device.type == 'cuda' and ranks > 1 else 'gloo' if ranks > 1 else 'none (1 process)'}",
            f"- finished step {checkpoint['step']} with world size {checkpoint['world_size']}; weights identical "
            f"on all ranks: {in_sync}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code paths")
    parser.add_argument("--out", type=Path, help="report file (default benchmarks/gpu_check.md; dry run: a temp file)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps at 896²")
    parser.add_argument("--skip", nargs="*", default=[], choices=["smoke", "step", "ddp"])
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for all sections (default 450: the report is written within 8 minutes; dry "
                             "run 1200 for slow shared CPUs); a section that runs out is reported as failed")
    args = parser.parse_args(argv)
    DEADLINE[0] = time.monotonic() + (args.time_limit or (1200 if args.dry_run else 450))
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.md" if args.dry_run
                       else REPO / "benchmarks" / "gpu_check.md")
    started = time.perf_counter()
    report = [f"# GPU check{' (DRY RUN on the CPU: tiny sizes, numbers mean nothing)' if args.dry_run else ''}",
              "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `benchmarks/gpu_check.sh"
              f"{' --dry-run' if args.dry_run else ''}`.", ""]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        sections = [("Environment", lambda: environment_section(device))]
        if "smoke" not in args.skip:
            sections.append(("Stock nnU-Net smoke: train + predict",
                             lambda: nnunet_smoke_section(device, Path(tmp) / "nnunet", args.dry_run)))
        if "step" not in args.skip:
            sections.append(("ViT-B training step at 896² (bf16)" if not args.dry_run else
                             "Training step (dry run: tiny encoder at 64²)",
                             lambda: train_step_section(device, args.dry_run, 3 if args.dry_run else args.steps)))
        if "ddp" not in args.skip:
            sections.append(("DDP pretraining smoke (torchrun)", lambda: ddp_section(device, Path(tmp) / "ddp")))
        ok = timed_sections(sections, report)
    report.append(f"Total {time.perf_counter() - started:.0f} s; {'all sections passed' if ok else 'SOME FAILED'}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    from meddinov3_nnunet.atomic_io import write_text_atomic

    write_text_atomic(out, "\n".join(report) + "\n")
    print(f"[gpu_check] report: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
