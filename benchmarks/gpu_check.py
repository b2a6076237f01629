"""One-shot GPU check: the CUDA and multi-rank paths this project wrote for GPUs, in one run (< 10 min on one H100),
one report in Markdown and JSON.

    benchmarks/gpu_check.sh                        # on a GPU machine: benchmarks/gpu_check.md and gpu_check.json
    benchmarks/gpu_check.sh --dry-run --out x.md   # every section on the CPU at toy sizes (x.md and x.json)

Sections (a failing section is reported with its traceback and the run goes on; exit 1 if any failed):
1. environment: GPUs, torch, native bf16 (`precision.cuda_bf16_native`), the precision ``MEDDINOV3_AMP=auto``
   picks. The caller's ``MEDDINOV3_*`` / ``DINOV3_*`` settings are dropped for the whole check
   (`without_user_settings`; their names are reported);
2. encoder weights: a random ViT-B written in this project's format and in MedDINOv3's ``model.pth`` layout, each
   loaded strictly through `MedDINOv3Trainer.load_encoder_weights` onto the GPU and through `load_encoder`; timed;
3. DDP fine-tuning: 2 ranks (torchrun) train the networks of MedDINOv3Trainer (2D), _hybrid and _hybrid_3d (ViT-B)
   wrapped as nnU-Net 2.8.1 wraps them (torch.compile for one 2D run, SyncBatchNorm, DDP without
   ``find_unused_parameters``; Dice+CE with ``ddp=True``) through the trainer's own ``train_step``; weights and
   gradients must agree across ranks. One GPU: gloo with both ranks on cuda:0 (NCCL refuses two ranks on one GPU);
   two or more: NCCL, one GPU per rank;
4. pretraining: ``meddinov3-nnunet pretrain`` under torchrun, 2 ranks, the stage-1 recipe (ViT-B, bf16 autocast,
   2 accumulation passes) for a few steps on synthetic CT; one GPU: gloo on cuda:0 (`pretrain_worker`), two: NCCL;
5. training step: MedDINOv3Trainer's network (ViT-B, random weights) at the default plan's 896² for 512² CT slices,
   at the batch ``meddinov3-nnunet plan`` picks for ``--gpu-memory`` (80 GiB) with the memory meter; nnU-Net's
   DC_and_CE_loss and the trainer's ``train_step``; eager, compiled as nnU-Net compiles (network and ``loss.dc``),
   and compiled with activation checkpointing: ms/step, measured peak memory next to the meter's estimate, the
   step's model FLOPs (FlopCounterMode), the GPU's measured bf16 matmul TFLOP/s and the model FLOP utilisation;
6. stock nnU-Net smoke: plan -> ``nnUNetv2_train ... -device cuda`` -> ``nnUNetv2_predict`` on shared Hippocampus
   cases (synthetic without them); with two or more GPUs also ``nnUNetv2_train ... -num_gpus 2``.

The sections share one time budget (``--time-limit``, 540 s on a GPU); what it cuts off is reported as failed.
``--skip`` leaves sections out (reported as skipped).

``--dry-run``: the same code on the CPU at toy sizes (tiny encoder, 32-64 px, gloo on CPU tensors, no
torch.compile: the report says so), the same report format; tests/nnunet/test_gpu_check.py runs it.

A report of a GPU run belongs in benchmarks/ (gpu_check.md, gpu_check.json). None is committed yet: no GPU was lent
to the sessions that wrote this check, so it has only run as ``--dry-run``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDDINOV3_SHARED", REPO.parent / "shared"))
DEADLINE = [math.inf]  # time.monotonic() by which every section must be done (set by --time-limit)
CLASSES = 14  # segmentation classes of the training step (a CT multi-organ task)
SECTIONS = ("weights", "ddp", "pretrain", "step", "smoke")
COMPILE_RESERVE_S = 180  # a compiled variant of the training step starts only with this much of the time budget left


def seconds_left(cap: float) -> float:
    """A subprocess timeout: ``cap``, or less when the run's time budget ends sooner."""
    left = DEADLINE[0] - time.monotonic()
    if left < 5:
        raise TimeoutError("the run's time budget (--time-limit) is spent; later sections were not run")
    return min(cap, left)


class SectionFailed(Exception):
    """A failed section that still reports what it measured (``lines``, ``data``)."""

    def __init__(self, message: str, lines: list[str], data: dict):
        super().__init__(message)
        self.lines, self.data = lines, data


def run_sections(sections, skipped: set[str]) -> list[dict]:
    """Runs (key, title, function) triples; a function returns (Markdown lines, JSON data). One result per section:
    key, title, status (passed / FAILED / skipped), seconds, error, data, lines."""
    results = []
    for key, title, function in sections:
        if key in skipped:
            results.append(dict(key=key, title=title, status="skipped", seconds=0.0, error=None, data={},
                                lines=["Not run (--skip)."]))
            continue
        start = time.perf_counter()
        print(f"[gpu_check] {title} ...", flush=True)
        error, data = None, {}
        try:
            lines, data = function()
            status = "passed"
        except Exception as failure:  # a failed section is a finding of the check, reported with its traceback
            status, error = "FAILED", f"{type(failure).__name__}: {failure}"
            if isinstance(failure, SectionFailed):  # its lines say what failed
                lines, data = failure.lines + ["", f"**{error}**"], failure.data
            else:
                lines = [error, "", "```", traceback.format_exc()[-3000:], "```"]
        results.append(dict(key=key, title=title, status=status, seconds=round(time.perf_counter() - start, 1),
                            error=error, data=data, lines=lines))
        print(f"[gpu_check] {title}: {status}", flush=True)
    return results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def child_environment() -> dict[str, str]:
    """The environment of the check's torchrun children: without the user's MEDDINOV3_* / DINOV3_* settings."""
    from meddinov3_nnunet.nnunet.environment import without_user_settings

    return {**without_user_settings(os.environ), "OMP_NUM_THREADS": "1"}


def torchrun(arguments: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``arguments`` (a script or ``-m module`` and its arguments) on 2 ranks under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rank_layout(device: torch.device) -> tuple[str, str]:
    """(backend, placement) of 2 ranks: NCCL with a GPU each where there are two, else gloo on one device."""
    if device.type == "cpu":
        return "gloo", "both ranks on the CPU"
    if torch.cuda.device_count() >= 2:
        return "nccl", "cuda:0 and cuda:1"
    return "gloo", "both ranks on cuda:0 (one GPU: NCCL refuses two ranks on one GPU)"


def trainer_standin(trainer: type, **attributes):
    """An object of ``trainer`` made without nnU-Net's ``__init__`` (no plans, dataset or folders), holding only
    the attributes its ``train_step`` / ``load_encoder_weights`` read, so that those methods run unchanged."""
    standin = object.__new__(trainer)
    standin.__dict__.update(attributes)
    return standin


def nnunet_loss(batch_dice: bool, ddp: bool, compiled: bool):
    """nnU-Net 2.8.1's ``_build_loss`` for label maps without deep supervision (the trainers turn it off)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compiled:
        loss.dc = torch.compile(loss.dc)
    return loss


def grad_scaler(device: torch.device):
    """The trainer's scaler: one only where its precision is fp16."""
    from meddinov3_nnunet.nnunet import precision

    return torch.amp.GradScaler(device.type) if precision.resolve(device.type).needs_grad_scaler else None


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """``os.environ[name]`` set to ``value`` inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


# -- 1: environment -------------------------------------------------------------------------------------------
def environment_section(device: torch.device, dropped: list[str]) -> tuple[list[str], dict]:
    import torch.distributed as dist

    from meddinov3_nnunet.nnunet import precision

    data = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.version.cuda, "gpus": [], "cuda_bf16_native": precision.cuda_bf16_native(),
            "nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available(),
            "precision": precision.resolve(device.type).describe(), "dropped_user_settings": dropped}
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
             f"backends: nccl {data['nccl']}, gloo {data['gloo']}"]
    for index in range(torch.cuda.device_count() if device.type == "cuda" else 0):
        props = torch.cuda.get_device_properties(index)
        data["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                             "capability": f"{props.major}.{props.minor}"})
        lines.append(f"- cuda:{index}: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, CUDA {torch.version.cuda}")
    lines += [f"- native bf16 (precision.cuda_bf16_native): {data['cuda_bf16_native']}",
              f"- {data['precision']}",
              f"- caller's settings dropped for this check: {', '.join(dropped) or 'none'}"]
    return lines, data


# -- 2: encoder weights ---------------------------------------------------------------------------------------
def weights_section(device: torch.device, workdir: Path, dry_run: bool) -> tuple[list[str], dict]:
    from meddinov3_nnunet import trainers
    from meddinov3_nnunet.models.checkpoints import load_encoder, save_encoder, save_teacher_layout
    from meddinov3_nnunet.models.encoder import build_encoder

    trainer = trainers.MedDINOv3Trainer_tiny if dry_run else trainers.MedDINOv3Trainer
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    encoder = build_encoder(trainer.encoder_arch())
    reference = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    rows, data, failures = [], {"trainer": trainer.__name__, "encoder": trainer.encoder_preset, "files": []}, []
    for layout, save in (("project (save_encoder)", save_encoder),
                         ("MedDINOv3 model.pth (save_teacher_layout)", save_teacher_layout)):
        path = workdir / f"{save.__name__}.pth"
        start = time.perf_counter()
        save(encoder, path)
        saved = time.perf_counter() - start
        network = trainer.build_plain_network(1, 2).to(device)
        messages = []
        standin = trainer_standin(trainer, network=network, configuration_name="2d_meddinov3",
                                  configuration_manager=SimpleNamespace(configuration={}),
                                  _fresh_encoder_marker=network.encoder.cls_token.detach().clone(),
                                  print_to_log_file=lambda *args, **kwargs: messages.append(" ".join(map(str, args))))
        with environment_variable(trainer.weights_env_var, str(path)):
            start = time.perf_counter()
            standin.load_encoder_weights()
            synchronize(device)
            through_trainer = time.perf_counter() - start
        loaded = network.encoder.state_dict()
        trainer_equal = loaded.keys() == reference.keys() and all(
            torch.equal(loaded[key].cpu(), value) for key, value in reference.items())
        start = time.perf_counter()
        direct = load_encoder(path).state_dict()
        through_load_encoder = time.perf_counter() - start
        direct_equal = direct.keys() == reference.keys() and all(
            torch.equal(direct[key], value) for key, value in reference.items())
        record = {"layout": layout, "megabytes": round(path.stat().st_size / 2 ** 20, 1), "save_s": round(saved, 2),
                  "trainer_load_s": round(through_trainer, 2), "load_encoder_s": round(through_load_encoder, 2),
                  "trainer_identical": bool(trainer_equal), "load_encoder_identical": bool(direct_equal),
                  "trainer_log": [m for m in messages if m.startswith("encoder:")]}
        data["files"].append(record)
        rows.append([layout, f"{record['megabytes']:.0f} MB", f"{saved:.2f}", f"{through_trainer:.2f}",
                     f"{through_load_encoder:.2f}", trainer_equal, direct_equal])
        if not (trainer_equal and direct_equal):
            failures.append(layout)
        del network, standin
        free_memory(device)
    lines = [f"A random {trainer.encoder_preset} encoder ({sum(v.numel() for v in reference.values()):,} numbers) "
             f"saved, then loaded with the strict check by {trainer.__name__}.load_encoder_weights onto "
             f"{device.type} (via {trainer.weights_env_var}) and by load_encoder.", ""]
    lines += table(["layout", "file", "save s", "trainer load s", "load_encoder s", "identical (trainer)",
                    "identical (load_encoder)"], rows)
    lines += [""] + [f"- trainer log: {m}" for record in data["files"] for m in record["trainer_log"]]
    if failures:
        raise SectionFailed(f"loaded weights differ from the saved ones: {failures}", lines, data)
    return lines, data


# -- 3: DDP fine-tuning ---------------------------------------------------------------------------------------
def ddp_families(dry_run: bool) -> list[tuple]:
    """(name, trainer class, input shape per rank, batch_dice as nnU-Net's plans set it, compiled)."""
    from meddinov3_nnunet import trainers

    def sized(trainer: type) -> type:
        return type(f"{trainer.__name__}_tiny", (trainer,), {"encoder_preset": "vit_tiny16"}) if dry_run else trainer

    # dry run: depth 24, so that no level of the 3D pyramid has depth 2, where torch 2.14.1's CPU bf16 Conv3d weight
    # gradient (oneDNN) returns garbage (up to NaN) that has nothing to do with DDP
    size, size_3d, depth = (32, 32, 24) if dry_run else (224, 128, 16)
    families = [("2d", sized(trainers.MedDINOv3Trainer), (2, 1, size, size), True, False),
                ("2d hybrid", sized(trainers.MedDINOv3Trainer_hybrid), (2, 1, size, size), True, False),
                ("3d hybrid", sized(trainers.MedDINOv3Trainer_hybrid_3d), (1, 1, depth, size_3d, size_3d), False,
                 False)]
    if not dry_run:
        families.append(("2d compiled", trainers.MedDINOv3Trainer, (2, 1, size, size), True, True))
    return families


def ddp_family_steps(family: tuple, device: torch.device, rank: int, steps: int) -> dict:
    """``steps`` training steps of one family under DDP as nnU-Net's ``initialize`` wraps it, through the trainer's
    ``train_step``; returns losses, timings and whether weights and gradients agree across the ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from meddinov3_nnunet.nnunet.finetune import build_optimizer

    name, trainer, shape, batch_dice, compiled = family
    torch.manual_seed(0)  # the same start on every rank, as nnU-Net's ranks build the same network
    plain = trainer.build_network_architecture(None, None, shape[1], CLASSES, False).to(device)
    network = torch.compile(plain) if compiled else plain
    optimizer = build_optimizer(plain, trainer.recipe)  # the trainer's configure_optimizers
    network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    # nnU-Net: device_ids=[local_rank], its rank's GPU; with one GPU both ranks share cuda:0
    network = DDP(network, device_ids=[device.index] if device.type == "cuda" else None)
    standin = trainer_standin(trainer, device=device, network=network, optimizer=optimizer,
                              loss=nnunet_loss(batch_dice, ddp=True, compiled=compiled),
                              grad_scaler=grad_scaler(device))
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
    losses, seconds = [], []
    for _ in range(steps):
        batch = {"data": torch.randn(shape, generator=generator),
                 "target": torch.randint(0, CLASSES, (shape[0], 1, *shape[2:]), generator=generator).to(torch.int16)}
        start = time.perf_counter()
        losses.append(float(standin.train_step(batch)["loss"]))  # the step reads its loss: synchronised
        seconds.append(time.perf_counter() - start)
    digest = hashlib.sha256()
    for parameter in plain.parameters():
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
        if parameter.grad is not None:
            digest.update(parameter.grad.float().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return {"name": name, "trainer": trainer.__name__, "input_per_rank": list(shape), "compiled": compiled,
            "batch_dice": batch_dice, "steps": steps, "losses": losses,
            "first_step_s": round(seconds[0], 2), "ms_per_step": round(1000 * statistics.median(seconds[1:]), 1),
            "in_sync": len(set(digests)) == 1}


def ddp_worker(result_dir: Path, dry_run: bool) -> int:
    """One rank of the DDP section (started by torchrun): every family, results in ``result_dir/rank<r>.json``."""
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    backend = rank_layout(device)[0]
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=60 if dry_run else 300))
    outcomes = []
    try:
        for family in ddp_families(dry_run):
            try:
                outcomes.append(ddp_family_steps(family, device, rank, steps=3))
            except Exception as error:  # DDP raises on both ranks alike (it checks at the start of each forward)
                outcomes.append({"name": family[0], "error": f"{type(error).__name__}: {str(error)[:1500]}"})
            free_memory(device)
    finally:
        (result_dir / f"rank{rank}.json").write_text(json.dumps({"backend": backend, "device": str(device),
                                                                  "families": outcomes}, indent=1))
        dist.destroy_process_group()
    return 0 if all("error" not in outcome for outcome in outcomes) else 1


def ddp_section(device: torch.device, workdir: Path, dry_run: bool) -> tuple[list[str], dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    backend, placement = rank_layout(device)
    result = torchrun([str(Path(__file__)), "_worker", "ddp", str(workdir)] + (["--dry-run"] if dry_run else []),
                      child_environment(), seconds_left(420))
    ranks = [json.loads(path.read_text()) for path in sorted(workdir.glob("rank*.json"))]
    data = {"backend": backend, "placement": placement, "ranks": len(ranks), "returncode": result.returncode,
            "families": ranks[0]["families"] if ranks else []}
    rows, bad = [], []
    for index, family in enumerate(data["families"]):
        others = [rank["families"][index] for rank in ranks[1:] if index < len(rank["families"])]
        error = family.get("error") or next((o["error"] for o in others if "error" in o), None)
        finite = error is None and all(math.isfinite(v) for f in [family, *others] for v in f["losses"])
        ok = error is None and finite and family["in_sync"] and len(others) == len(ranks) - 1 == 1
        if not ok:
            bad.append(family["name"])
        rows.append([family["name"], family.get("trainer", ""), family.get("input_per_rank", ""),
                     family.get("compiled", ""), family.get("steps", ""), family.get("first_step_s", ""),
                     family.get("ms_per_step", ""), finite, family.get("in_sync", False),
                     "ok" if ok else (error or "FAILED")[:300]])
    lines = [f"2 ranks (torchrun), {backend}, {placement}; each network built by its trainer's "
             f"build_network_architecture, {'torch.compile (2d compiled only), ' if not dry_run else ''}"
             f"SyncBatchNorm, DDP(device_ids=[its device]) without find_unused_parameters, nnU-Net's Dice+CE with "
             f"ddp=True, the trainer's train_step; each rank its own random batch.", ""]
    lines += table(["network", "trainer", "input per rank", "compiled", "steps", "first step s", "ms / step",
                    "losses finite", "weights + grads equal on both ranks", "outcome"], rows)
    if dry_run:
        lines += ["", "- 2d compiled: not run in the dry run (torch.compile takes minutes on the CPU)"]
    if result.returncode != 0 or bad or len(ranks) != 2:
        lines += ["", "```", (result.stdout + result.stderr)[-2500:], "```"]
        raise SectionFailed(f"DDP fine-tuning failed for {bad or 'the launch'} (torchrun exit {result.returncode})",
                            lines, data)
    return lines, data


# -- 4: pretraining -------------------------------------------------------------------------------------------
TINY_PRETRAINING = ["crops.global_size=32", "crops.local_size=16", "crops.local_number=2", "optim.batch_size=8",
                    "optim.iterations=4", "optim.lr.warmup_iterations=2", "optim.teacher_temp.warmup_iterations=2",
                    "optim.freeze_last_layer_iterations=1", "dino.head_prototypes=64", "dino.head_hidden_dim=32",
                    "dino.head_bottleneck_dim=16", "ibot.head_prototypes=48", "ibot.head_hidden_dim=32",
                    "ibot.head_bottleneck_dim=16", "data.num_workers=0", "data.chunk_volumes=2"]
# the stage-1 recipe (ViT-B, 224/96 crops, 65,536 prototypes) at a global batch of 16 for 6 steps
GPU_PRETRAINING = ["optim.batch_size=16", "optim.iterations=6", "optim.lr.warmup_iterations=2",
                   "optim.teacher_temp.warmup_iterations=2", "optim.freeze_last_layer_iterations=1",
                   "data.num_workers=2", "data.chunk_volumes=2"]
COMMON_PRETRAINING = ["train.precision=bf16", "train.grad_accum_steps=2", "train.log_every=2"]


def pretrain_worker(cli_arguments: list[str]) -> int:
    """One rank of `meddinov3-nnunet pretrain` with both ranks on one device: the gloo group is made first and
    LOCAL_RANK set to 0, so that `DistContext.from_env` (which would start NCCL with one GPU per rank) finds the
    group and puts every rank on cuda:0 (or the CPU)."""
    import torch.distributed as dist

    from meddinov3_nnunet.cli import main

    dist.init_process_group("gloo")
    os.environ["LOCAL_RANK"] = "0"
    try:
        return main(cli_arguments)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain_section(device: torch.device, workdir: Path, dry_run: bool) -> tuple[list[str], dict]:
    import numpy as np

    from meddinov3_nnunet.demo import write_nifti
    from meddinov3_nnunet.pretraining.progress import read_metrics
    from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint

    backend, placement = rank_layout(device)
    rng = np.random.default_rng(0)
    (workdir / "ct").mkdir(parents=True)
    shape = (4, 40, 48) if dry_run else (8, 256, 256)
    for index in range(4):
        volume = np.full(shape, -1000.0)
        body = tuple(slice(s // 5, s - s // 5) for s in shape[1:])
        volume[(slice(None), *body)] = 40 + 30 * rng.standard_normal((shape[0], *(b.stop - b.start for b in body)))
        write_nifti(volume.astype(np.float32), workdir / "ct" / f"case{index}.nii.gz")
    config = "tiny_cpu" if dry_run else "stage1_pretrain"
    overrides = (TINY_PRETRAINING if dry_run else GPU_PRETRAINING) + COMMON_PRETRAINING
    cli = ["pretrain", "--config", config, *sum((["--set", value] for value in overrides), []), "--data",
           f"ct={workdir / 'ct'}", "-o", str(workdir / "run"), "--corpus-workers", "1", "--device", device.type,
           "--no-progress"]
    launch = ["-m", "meddinov3_nnunet.cli", *cli] if backend == "nccl" else [str(Path(__file__)), "_worker",
                                                                            "pretrain", *cli]
    start = time.perf_counter()
    result = torchrun(launch, child_environment(), seconds_left(300))
    seconds = time.perf_counter() - start
    data = {"config": config, "overrides": overrides, "backend": backend, "placement": placement,
            "returncode": result.returncode, "seconds": round(seconds, 1)}
    lines = [f"- `torchrun --nproc_per_node 2 ... pretrain --config {config}` with {' '.join(overrides)}",
             f"- 2 ranks, {backend}, {placement}; autocast: "
             f"{'bf16 on cuda' if device.type == 'cuda' else 'none (the CPU runs pretraining in fp32)'}"]
    if result.returncode != 0:
        raise SectionFailed(f"torchrun pretraining failed (exit {result.returncode})",
                            lines + ["", "```", (result.stdout + result.stderr)[-2500:], "```"], data)
    checkpoint = load_run_checkpoint(workdir / "run" / "checkpoint.pth")
    fingerprints = checkpoint.get("rank_fingerprints") or []
    in_sync = len(fingerprints) == 2 and all(torch.equal(fingerprints[0], other) for other in fingerprints[1:])
    metrics = read_metrics(workdir / "run" / "metrics.jsonl")
    last = metrics[-1] if metrics else {}
    finite = "total" in last and all(math.isfinite(v) for v in last.values() if isinstance(v, (int, float)))
    data.update(step=checkpoint["step"], world_size=checkpoint["world_size"], in_sync=in_sync, last_step=last)
    lines += [f"- finished step {checkpoint['step']} with world size {checkpoint['world_size']} in {seconds:.0f} s "
              f"(start-up and corpus indexing included); weights identical on both ranks: {in_sync}",
              f"- last step: total loss {last.get('total', float('nan')):.4f}, {last.get('step_seconds', 0):.2f} s "
              f"per step, {last.get('images_per_s', 0):.1f} images/s (values "
              + ("finite)" if finite else "NOT FINITE OR MISSING)")]
    if not (in_sync and finite and checkpoint["world_size"] == 2):
        raise SectionFailed("pretraining ranks out of sync, losses not finite or not 2 ranks", lines, data)
    return lines, data


# -- 5: stock nnU-Net smoke -----------------------------------------------------------------------------------
def nnunet_smoke_section(device: torch.device, workdir: Path, dry_run: bool) -> tuple[list[str], dict]:
    from meddinov3_nnunet.demo import link_real_dataset, make_synthetic_dataset
    from meddinov3_nnunet.nnunet.environment import (dataset_id, nnunet_tool, plan_and_preprocess_command,
                                                     plugin_environment, without_user_settings)

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
    train = [nnunet_tool("nnUNetv2_train"), dataset, configuration, "0", "-tr", trainer, "-device", device.type]
    steps = [
        ("nnU-Net planning", plan_and_preprocess_command(dataset, ["2d"])),
        ("ViT-aware planning", [sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", dataset, "--preset",
                                "cpu", "-np", "2"]),
        ("train", train),
        ("predict", [nnunet_tool("nnUNetv2_predict"), "-i", str(test_images), "-o", str(predictions), "-d", dataset,
                     "-c", configuration, "-f", "0", "-tr", trainer, "-device", device.type, "-npp", "0", "-nps",
                     "0"]),  # 2 cases: one process, no worker start-ups
    ]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2:
        steps.append(("train on 2 GPUs (-num_gpus 2, fold 1)", train[:3] + ["1"] + train[4:] + ["-num_gpus", "2"]))
    lines = [f"Data: {name} ({'shared' if hippocampus.is_dir() else 'SYNTHETIC'}), {cases - 2} training cases, "
             f"2 held out; trainer {trainer}{' with a 1 x 2 budget (dry run)' if dry_run else ''}.", ""]
    outputs, rows, data = {}, [], {"dataset": name, "shared": hippocampus.is_dir(), "trainer": trainer, "steps": {}}
    for title, command in steps:
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds_left(300))
        outputs[title] = result.stdout + result.stderr
        if result.returncode != 0:
            raise SectionFailed(f"{title} failed ({' '.join(command)})", lines + table(["step", "seconds"], rows)
                                + ["", "```", outputs[title][-2500:], "```"], data)
        data["steps"][title] = round(time.perf_counter() - start, 1)
        rows.append([title, f"{data['steps'][title]:.1f}"])
    lines += table(["step", "seconds"], rows) + [""]
    trainings = [title for title in outputs if title.startswith("train")]
    for title in trainings:
        losses = [float(line.split("train_loss")[1]) for line in outputs[title].splitlines() if "train_loss" in line]
        data[f"{title} losses"] = losses
        if not losses or not all(math.isfinite(loss) for loss in losses):
            raise SectionFailed(f"{title}: training losses missing or not finite: {losses}", lines, data)
        lines.append(f"- {title}: train losses per epoch: {', '.join(f'{loss:.4f}' for loss in losses)} (finite)")
    precision_lines = sorted({line.strip() for line in outputs["train"].splitlines() if "precision on" in line})
    import SimpleITK as sitk

    written = sorted(predictions.glob("*.nii.gz"))
    if len(written) != 2:
        raise SectionFailed(f"expected 2 predictions in {predictions}, found {len(written)}", lines, data)
    for prediction in written:
        image = sitk.ReadImage(str(test_images / prediction.name.replace(".nii.gz", "_0000.nii.gz")))
        if sitk.ReadImage(str(prediction)).GetSize() != image.GetSize():
            raise SectionFailed(f"{prediction.name} does not have the input's size", lines, data)
    if gpus < 2:
        lines.append(f"- nnUNetv2_train -num_gpus 2: not run ({gpus} GPU{'s' if gpus != 1 else ''} here; "
                     f"nnU-Net's DDP needs 2 CUDA devices)")
    return lines + ["- 2 predictions written with the inputs' size"] + [f"- {line}" for line in precision_lines], data


# -- 6: the training step at 896² -----------------------------------------------------------------------------
def planned_step(dry_run: bool, gpu_memory: float):
    """(trainer class, token-budget plan, fitted plan) that ``meddinov3-nnunet plan`` (default preset,
    ``--gpu-memory``) makes for a CT dataset of 512² slices (nnU-Net 2d: patch 512², batch 12, batch Dice); the
    fitted plan's ``memory`` holds the meter's estimates. Dry run: the tiny trainer, 32² slices to 64², batch <= 4."""
    from meddinov3_nnunet import trainers
    from meddinov3_nnunet.nnunet.planning import derive_vit_plan, fit_to_gpu
    from meddinov3_nnunet.plans import load_preset

    settings = load_preset("default")
    name, side, target, batch = (("MedDINOv3Trainer_tiny", 32, 64, 4) if dry_run else
                                 ("MedDINOv3Trainer", 512, settings["target_size"], 12))
    source = {"patch_size": [side, side], "median_image_size_in_voxels": [side, side], "spacing": [0.8, 0.8],
              "batch_size": batch}
    vit = derive_vit_plan(source, target, settings["max_scale"], settings["tokens_per_batch"],
                          settings["min_batch_size"])
    return getattr(trainers, name), vit, fit_to_gpu(vit, name, gpu_memory, 1, CLASSES, settings["min_batch_size"],
                                                     explicit_batch=False, batch_dice=True)


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


def step_flops(trainer: type, patch: list[int], batch_size: int, device: torch.device) -> int:
    """Model FLOPs of one training step (forward, loss, backward) at ``batch_size``: counted at batch 1, eager."""
    from torch.utils.flop_counter import FlopCounterMode

    network = trainer.build_network_architecture(None, None, 1, CLASSES, False).to(device).train()
    loss = nnunet_loss(batch_dice=True, ddp=False, compiled=False)
    data = torch.randn(1, 1, *patch, device=device)
    target = torch.randint(0, CLASSES, (1, 1, *patch), device=device, dtype=torch.int16)
    with FlopCounterMode(display=False) as counter:
        loss(network(data), target).backward()
    del network
    free_memory(device)
    return counter.get_total_flops() * batch_size


def measure_step(trainer: type, patch: list[int], batch_size: int, device: torch.device, compiled: bool,
                 checkpointing: bool, steps: int) -> dict:
    """The trainer's ``train_step`` on its network (random weights, AdamW groups of the trainer), built as
    ``build_network_architecture`` builds it (checkpointing through its switch) and compiled as nnU-Net compiles:
    first-step seconds, median ms/step, measured peak memory (CUDA) of the timed steps."""
    from meddinov3_nnunet.models.checkpointing import ENV_VAR
    from meddinov3_nnunet.nnunet.finetune import build_optimizer

    free_memory(device)  # what an earlier variant (an out-of-memory one too) left in the allocator's cache
    torch.manual_seed(0)
    with environment_variable(ENV_VAR, "1" if checkpointing else "0"):
        network = trainer.build_network_architecture(None, None, 1, CLASSES, False).to(device)
    optimizer = build_optimizer(network, trainer.recipe)
    standin = trainer_standin(trainer, device=device, network=torch.compile(network) if compiled else network,
                              loss=nnunet_loss(batch_dice=True, ddp=False, compiled=compiled), optimizer=optimizer,
                              grad_scaler=grad_scaler(device))
    batch = {"data": torch.randn(batch_size, 1, *patch, device=device),
             "target": torch.randint(0, CLASSES, (batch_size, 1, *patch), device=device, dtype=torch.int16)}
    try:
        start = time.perf_counter()
        standin.train_step(batch)  # compiles, when compiled
        first = time.perf_counter() - start
        standin.train_step(batch)
        free_memory(device)  # the peak of the timed steps only
        seconds, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(float(standin.train_step(batch)["loss"]))  # reads the loss: synchronised, as nnU-Net
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        del standin, network, optimizer, batch
        free_memory(device)
        if compiled:
            torch._dynamo.reset()
    return {"first_step_s": round(first, 1), "ms_per_step": 1000 * statistics.median(seconds),
            "ms_min": 1000 * min(seconds), "ms_max": 1000 * max(seconds), "peak_bytes": peak, "losses": losses}


def train_step_section(device: torch.device, dry_run: bool, steps: int, gpu_memory: float) -> tuple[list[str], dict]:
    from meddinov3_nnunet.models.memory import GIB

    trainer, token_plan, plan = planned_step(dry_run, gpu_memory)
    fit, patch, batch = plan.memory, plan.patch_size, plan.batch_size
    peak_tflops = matmul_peak_tflops(device, 256 if dry_run else 8192, 5 if dry_run else 50)
    flops = step_flops(trainer, patch, batch, device)
    variants = [("eager", False, False, fit.memory), ("compiled", True, False, fit.memory),
                ("compiled + activation checkpointing", True, True, fit.checkpointed or fit.memory)]
    if dry_run:  # compiling takes minutes on the CPU: checkpointing runs eager
        variants = [variants[0], ("eager + activation checkpointing", False, True, variants[2][3])]
    rows, records, failures = [], [], []
    for name, compiled, checkpointing, estimate in variants:
        record = {"variant": name, "compiled": compiled, "checkpointing": checkpointing, "batch": batch,
                  "estimate_peak_bytes": estimate.peak, "estimate_required_bytes": estimate.required,
                  "estimate_checkpointing": estimate.checkpointing}
        if compiled and DEADLINE[0] - time.monotonic() < COMPILE_RESERVE_S:
            record["error"] = f"not run: under {COMPILE_RESERVE_S} s of the time budget (--time-limit) left to compile"
        else:
            try:
                record.update(measure_step(trainer, patch, batch, device, compiled, checkpointing, steps))
            except Exception as error:  # an out-of-memory at the planned batch is a finding: reported per row
                record["error"] = f"{type(error).__name__}: {str(error)[:600]}"
                record["traceback"] = traceback.format_exc()[-2500:]
        records.append(record)
        if "error" in record or not all(math.isfinite(v) for v in record["losses"]):
            failures.append(name)
            rows.append([name, batch, record.get("error", "losses not finite"), "", "", "", "", "", ""])
            continue
        seconds = record["ms_per_step"] / 1000
        record["achieved_tflops"] = flops / seconds / 1e12
        record["mfu"] = record["achieved_tflops"] / peak_tflops
        peak = record["peak_bytes"]
        rows.append([name, batch, f"{record['ms_per_step']:.0f} ({record['ms_min']:.0f}-{record['ms_max']:.0f})",
                     f"{record['first_step_s']:.1f}",
                     f"{peak / GIB:.2f}" if peak is not None else "n/a (CPU)",
                     f"{estimate.peak / GIB:.2f} / {estimate.required / GIB:.2f}"
                     + (" (ckpt)" if estimate.checkpointing else ""),
                     f"{record['achieved_tflops']:.3g}", f"{record['mfu']:.0%}",
                     f"{record['losses'][-1]:.4f}"])
    total = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    data = {"trainer": trainer.__name__, "patch": patch, "batch": batch, "token_budget_batch": token_plan.batch_size,
            "gpu_memory_budget_gib": gpu_memory, "plan_note": fit.note, "gpu_memory_gib": total,
            "step_gflop": round(flops / 1e9, 1), "bf16_matmul_tflops": round(peak_tflops, 1), "variants": records}
    lines = [f"{trainer.__name__}'s network ({trainer.encoder_preset}, random weights), {patch[0]}x{patch[1]} "
             f"(`plan`'s default preset for 512² CT slices{' (dry run: 32² slices to 64²)' if dry_run else ''}), "
             f"batch {batch} (token budget {token_plan.batch_size}; memory meter for --gpu-memory {gpu_memory:g} GiB"
             f"{': ' + fit.note if fit.note else ''}), {CLASSES} classes, nnU-Net's DC_and_CE_loss (batch Dice), "
             f"the trainer's train_step and AdamW groups, {steps} timed steps after 2 warm-up steps (the first "
             f"compiles).",
             "",
             f"- model FLOPs per step (FlopCounterMode, forward + loss + backward, counted at batch 1 x {batch}; "
             f"checkpointing's recompute not counted): {flops / 1e9:,.1f} GFLOP"
             + ("; the CPU's attention kernel is not counted" if device.type == "cpu" else ""),
             f"- measured bf16 matmul peak ({'256' if dry_run else '8192'}²): {peak_tflops:.3g} TFLOP/s; "
             f"MFU = model FLOPs / step time / that peak",
             f"- GPU memory: {f'{total:.0f} GiB' if total else 'n/a (CPU)'}; meter: peak / needed with the "
             f"allocator margin and CUDA overhead (it models an eager step; compiled kernels keep less)", ""]
    lines += table(["variant", "batch", "ms / step (median, min-max)", "first step s", "peak GiB measured",
                    "meter GiB peak / needed", "TFLOP/s", "MFU", "last loss"], rows) + [""]
    if dry_run:
        lines.append("- compiled variants: not run in the dry run (torch.compile takes minutes on the CPU)")
    for record in records:
        if "traceback" in record:
            lines += ["", f"{record['variant']}:", "```", record["traceback"], "```"]
    if failures:
        raise SectionFailed(f"training step failed: {failures}", lines, data)
    return lines, data


# -- report ---------------------------------------------------------------------------------------------------
def write_report(out: Path, results: list[dict], dry_run: bool, total: float) -> bool:
    """``out`` (Markdown) and ``out`` with ``.json``; True if no section failed."""
    from meddinov3_nnunet.atomic_io import write_text_atomic

    ok = all(result["status"] != "FAILED" for result in results)
    skipped = [result["key"] for result in results if result["status"] == "skipped"]
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    command = f"benchmarks/gpu_check.sh{' --dry-run' if dry_run else ''}"
    lines = [f"# GPU check{' (DRY RUN on the CPU: toy sizes, numbers mean nothing)' if dry_run else ''}", "",
             f"Run {stamp} with `{command}`; JSON beside this file ({out.with_suffix('.json').name}).", ""]
    for result in results:
        lines += [f"## {result['title']} — {result['status']} ({result['seconds']:.0f} s)", "", *result["lines"], ""]
    lines.append(f"Total {total:.0f} s; {'no section failed' if ok else 'SOME FAILED'}"
                 f"{'; skipped: ' + ', '.join(skipped) if skipped else ''}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "\n".join(lines) + "\n")
    document = {"report": "gpu_check", "format_version": 2, "dry_run": dry_run, "date": stamp, "command": command,
                "total_seconds": round(total, 1), "passed": ok,
                "sections": [{k: v for k, v in result.items() if k != "lines"} for result in results]}
    write_text_atomic(out.with_suffix(".json"), json.dumps(document, indent=1, default=str) + "\n")
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["_worker", "ddp"]:  # one rank, started by torchrun
        return ddp_worker(Path(argv[2]), "--dry-run" in argv[3:])
    if argv[:2] == ["_worker", "pretrain"]:
        return pretrain_worker(argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, same code paths")
    parser.add_argument("--out", type=Path, help="Markdown report, JSON beside it (default benchmarks/gpu_check.md; "
                                                 "dry run: a temporary folder)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant at 896²")
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="GiB budget of `plan`'s batch pick for the 896² step (default 80)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for all sections (default 540: the report is written within 10 minutes; dry "
                             "run 1200 for slow shared CPUs); a section that runs out is reported as failed")
    args = parser.parse_args(argv)
    DEADLINE[0] = time.monotonic() + (args.time_limit or (1200 if args.dry_run else 540))
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    from meddinov3_nnunet.nnunet.environment import USER_SETTING_PREFIXES

    from meddinov3_nnunet.autoregister import MARKER

    dropped = sorted(key for key in os.environ if key.startswith(USER_SETTING_PREFIXES) and key != MARKER)
    for key in dropped:  # the check runs the plugin's defaults, in this process and in every child
        del os.environ[key]
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.md" if args.dry_run
                       else REPO / "benchmarks" / "gpu_check.md")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        size = "tiny encoder" if args.dry_run else "ViT-B"
        sections = [
            ("environment", "Environment", lambda: environment_section(device, dropped)),
            ("weights", f"Encoder weights ({size}): save, strict load through the trainer",
             lambda: weights_section(device, work / "weights", args.dry_run)),
            ("ddp", f"DDP fine-tuning, 2 ranks ({size}: 2D, 2D hybrid, 3D hybrid)",
             lambda: ddp_section(device, work / "ddp", args.dry_run)),
            ("pretrain", f"Pretraining, 2 ranks (torchrun, bf16{', dry run: fp32 on the CPU' if args.dry_run else ''})",
             lambda: pretrain_section(device, work / "pretrain", args.dry_run)),
            ("step", "Training step at the planned batch (dry run: tiny encoder at 64²)" if args.dry_run else
             "ViT-B training step at 896², planned batch: eager, compiled, compiled + checkpointing",
             lambda: train_step_section(device, args.dry_run, 3 if args.dry_run else args.steps, args.gpu_memory)),
            ("smoke", "Stock nnU-Net smoke: train + predict",
             lambda: nnunet_smoke_section(device, work / "nnunet", args.dry_run)),
        ]
        results = run_sections(sections, set(args.skip))
    ok = write_report(out, results, args.dry_run, time.perf_counter() - started)
    print(f"[gpu_check] report: {out} and {out.with_suffix('.json')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
