"""The pretraining loop: one DINOv3 stage (1: DINO + iBOT + KoLeo; 2-3: + Gram anchoring) on one or many ranks.

Launch one process per GPU with ``torchrun`` (DDP; NCCL on GPU, gloo on CPU) or run it plainly for one
process. Everything that can be wrong with the inputs is checked before the first step (`PretrainingRun.prepare`):
the recipe, the corpus, ``--init`` and Gram-teacher checkpoints (their encoder must match ``model.arch``) and,
for ``--resume``, that the saved run used the same recipe.

Run folder: ``config.yaml`` (the resolved recipe), ``checkpoint.pth`` (latest; student, teacher, optimiser,
step, RNG states, config), ``checkpoint_stepNNNNNNN.pth`` (kept every ``train.keep_every`` steps),
``metrics.jsonl`` (one line per step) and ``loss_curves.png``.

A step never waits for the device: its logged scalars (losses, gradient norms) stay on the device and are read
for ``train.log_every`` steps at once (one all-reduce, one host transfer), where a non-finite value stops the run
naming its step; a checkpoint, a probe and the end of the run always read them first, so nothing is saved after
a bad step. Work only rank 0 does (probe, checkpoint write) runs in `DistContext.run_on_main`.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from lightly.models.utils import update_momentum

from meddinov3_nnunet.errors import DivergedError, InputError
from meddinov3_nnunet.models.checkpoints import load_into
from meddinov3_nnunet.models.encoder import DINOv3Encoder

from . import augment, run_checkpoint
from .config import ConfigError, PretrainConfig, differences, dump_yaml, encoder_arch, from_dict
from .corpus import Corpus, CorpusError, settings_from_config
from .distributed import DistContext
from .model import build_branch, check_fits, initialise_branch, param_groups, read_starting_point, trained_modules
from .objective import PretrainingObjective, to_student_grid
from .progress import MetricsLog, plot_metrics
from .run_checkpoint import CHECKPOINT_NAME, load_run_checkpoint
from .schedules import apply_schedules, schedules_at
from .stream import ShardPlan, SliceStream

log = logging.getLogger(__name__)
# DDP without a buffer broadcast per forward (the only buffer, RoPE's periods, is a constant); torch 2.14 renamed
# broadcast_buffers to forward_sync_buffers and warns on the old name
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class ResumeError(InputError):
    """A ``--resume`` that would not continue the same run."""


class NonFiniteLossError(DivergedError):
    """A NaN/inf loss or gradient; the run stops, the last good checkpoint is kept."""


class PretrainingRun:
    """One stage of pretraining into ``output_dir``: `check` (inputs), `prepare` (+ corpus), `build`, `run`."""

    def __init__(self, config: PretrainConfig, corpus_path: str | os.PathLike, output_dir: str | os.PathLike,
                 resume: bool = False, device: str | None = None, progress: bool = True,
                 context: DistContext | None = None, checkpoint: dict | None = None):
        """``checkpoint``: the run checkpoint of a ``resume`` when the caller has already read it (read once);
        None: `check` reads it."""
        self.config = config
        self.corpus_path = str(corpus_path)
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.progress = progress
        self.ctx = context or DistContext.from_env(device)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        # progress: check() -> prepare() -> build(); each sets its flag and what it found
        self.checked = self.prepared = self.built = False
        self.arch = None
        self.rank_batch = 0
        self.saved: dict | None = checkpoint  # the run checkpoint being resumed, until build() has taken it in
        self.init_point = None
        self.gram_point = None
        self.corpus: Corpus | None = None
        self.init_notes: list[str] = []
        self.start_step = 0
        self.student = self.teacher = self.model = self.gram_teacher = None  # set by build()
        self.optimizer = self.objective = self.loader = None
        self._stat_names: list[str] | None = None  # the logged scalars of a step, in `_train_step`'s order

    # -- checks ---------------------------------------------------------------------------------
    def check(self) -> "PretrainingRun":
        """Everything but the corpus: recipe, resume, --init and Gram-teacher checkpoints (cheap; run it before
        building a corpus)."""
        cfg = self.config
        cfg.validate()
        self.arch = encoder_arch(cfg)
        if cfg.optim.batch_size % self.ctx.world_size:
            raise ConfigError(f"config value optim.batch_size: {cfg.optim.batch_size} is not divisible by the "
                              f"{self.ctx.world_size} ranks; change it or the number of processes")
        self.rank_batch = cfg.optim.batch_size // self.ctx.world_size
        if self.rank_batch % cfg.train.grad_accum_steps:
            raise ConfigError(f"config value train.grad_accum_steps: {cfg.train.grad_accum_steps} does not divide the "
                              f"{self.rank_batch} images per rank (optim.batch_size {cfg.optim.batch_size} over "
                              f"{self.ctx.world_size} ranks)")
        if self.resume:
            if self.saved is None and not self.checkpoint_path.is_file():
                raise ResumeError(f"--resume: {self.checkpoint_path} does not exist; nothing to resume in "
                                  f"{self.output_dir}. Start the run without --resume.")
            if self.saved is None:
                self.saved = load_run_checkpoint(self.checkpoint_path)
            # through the schema: keys added since the checkpoint was written compare at their defaults
            changed = differences(from_dict(self.saved["config"], origin=str(self.checkpoint_path)).to_dict(),
                                  cfg.to_dict())
            if changed:
                raise ResumeError(
                    f"--resume: the config differs from the one {self.checkpoint_path} was trained with:\n  "
                    + "\n  ".join(changed[:20]) + "\nResume without --config/--set (the saved config is used), or "
                    "start a new run (e.g. --init " + str(self.checkpoint_path) + " with the new config).")
            if self.saved["world_size"] != self.ctx.world_size:
                raise ResumeError(f"--resume: {self.checkpoint_path} was written by {self.saved['world_size']} "
                                  f"rank(s), this launch has {self.ctx.world_size}; per-rank batches and data shards "
                                  f"would change. Relaunch with {self.saved['world_size']} processes.")
            self.corpus_path = self.saved["corpus"]["path"]
        elif self.checkpoint_path.exists():
            raise ResumeError(f"{self.output_dir} already holds a run ({self.checkpoint_path}); pass --resume to "
                              f"continue it, or choose another --output.")
        if cfg.model.init and not self.resume:
            self.init_point = read_starting_point(cfg.model.init)
            check_fits(self.init_point, self.arch, "--init (model.init)",
                       f"Use a {cfg.model.arch} checkpoint or set model.arch to the checkpoint's size.")
        if cfg.gram.enabled:
            if not cfg.gram.teacher:
                raise ConfigError("gram.enabled needs a Gram teacher: pass --gram-teacher PATH (an earlier run "
                                  "checkpoint such as RUN/checkpoint_step0040000.pth, or an encoder checkpoint)")
            self.gram_point = read_starting_point(cfg.gram.teacher)
            check_fits(self.gram_point, self.arch, "the Gram teacher (gram.teacher)",
                       f"Use a {cfg.model.arch} checkpoint.")
        self.checked = True
        return self

    def prepare(self) -> "PretrainingRun":
        """`check`, then the corpus: its settings, and enough volumes for every data shard."""
        if not self.checked:
            self.check()
        cfg = self.config
        self.corpus = Corpus.load(self.corpus_path, settings_from_config(cfg))
        if self.saved is not None:
            saved_totals = self.saved["corpus"]["slices"], self.saved["corpus"]["volumes"]
            if saved_totals != (self.corpus.num_slices, len(self.corpus)):
                raise ResumeError(f"--resume: the corpus {self.corpus_path} changed since the run started "
                                  f"({saved_totals[1]} volumes / {saved_totals[0]} slices then, {len(self.corpus)} / "
                                  f"{self.corpus.num_slices} now); resume needs the same corpus")
        workers = cfg.data.num_workers
        try:
            ShardPlan(self.corpus.counts, 0, self.ctx.world_size * max(1, workers), cfg.data.chunk_volumes, cfg.train.seed)
        except ValueError as err:
            raise CorpusError(f"{self.corpus_path}: {err}") from None
        self.prepared = True
        return self

    # -- construction ---------------------------------------------------------------------------
    def build(self) -> None:
        """Networks, optimiser and data loader (restored from the checkpoint on a resume)."""
        if not self.prepared:
            self.prepare()
        cfg, ctx = self.config, self.ctx
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.student = build_branch(cfg)
        if self.init_point is not None:
            self.init_notes = initialise_branch(self.student, self.init_point, cfg.model.init_heads)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.gram_teacher = None
        if self.gram_point is not None:
            self.gram_teacher = DINOv3Encoder(self.arch)
            load_into(self.gram_teacher, self.gram_point.checkpoint)
            self.gram_teacher.requires_grad_(False).eval().to(ctx.device)
        self.student.to(ctx.device).train()
        self.teacher.to(ctx.device).eval()
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.optim.layerwise_decay,
                                                        cfg.optim.patch_embed_lr_mult),
                                           betas=tuple(cfg.optim.adamw_betas))
        if self.saved is not None:
            self.student.load_state_dict(self.saved["student"])
            self.teacher.load_state_dict(self.saved["teacher"])
            self.optimizer.load_state_dict(self.saved["optimizer"])
            self.start_step = int(self.saved["step"])
            if self.gram_teacher is not None and "gram_teacher" in self.saved:  # refreshed during the run
                self.gram_teacher.load_state_dict(self.saved["gram_teacher"])
        self.model = self.student
        if ctx.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                **_NO_BUFFER_SYNC)
        self.objective = PretrainingObjective(cfg, gram_enabled=self.gram_teacher is not None)
        self.loader = torch.utils.data.DataLoader(
            SliceStream(self.corpus, self.rank_batch, augment.MultiCrop(cfg.crops),
                        _Collate(self.arch.patch_size, cfg.ibot, cfg.train.grad_accum_steps), seed=cfg.train.seed,
                        rank=ctx.rank, world_size=ctx.world_size, num_workers=cfg.data.num_workers,
                        chunk_volumes=cfg.data.chunk_volumes, start_step=self.start_step,
                        transform_for_step=(augment.MixedResolutionCrops(cfg.crops, cfg.train.seed).for_step
                                            if cfg.crops.mixed_global_sizes else None)),
            batch_size=None, num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
            pin_memory=ctx.device.type == "cuda", worker_init_fn=_worker_init,
            generator=torch.Generator(),  # keeps the global RNG (drop path) untouched by loader start-up
            prefetch_factor=2 if cfg.data.num_workers > 0 else None)
        # per-rank randomness (drop path) after the shared initialisation, restored exactly on resume
        if self.saved is not None:
            run_checkpoint.set_rng_state(self.saved["rng"][ctx.rank], ctx.device)
            self.saved = None  # the loaded weights and optimiser state now live in the modules; free the copy
        else:
            torch.manual_seed(cfg.train.seed * 1000 + ctx.rank + 1)
        self.built = True

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.ctx.device.type == "cuda" and self.config.train.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _step(self, batch: dict, values: dict) -> tuple[torch.Tensor, dict]:
        device = self.ctx.device
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True)
        masks = batch["masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices"].to(device, non_blocking=True)
        with self._autocast():
            teacher = self.teacher.teacher_forward(global_crops, mask_indices)
            student = self.model(global_crops, local_crops, masks, mask_indices)
            gram_targets = None
            if self.gram_teacher is not None:
                with torch.no_grad():
                    gram_crops = batch["gram_crops"].to(device, non_blocking=True)
                    features = self.gram_teacher.forward_features(
                        gram_crops.expand(-1, self.arch.in_chans, -1, -1))["x_norm_patchtokens"]
                gram_targets = self._to_student_grid(features, global_crops.shape[-1])
        return self.objective(student, teacher, masks, mask_indices, values["teacher_temp"], gram_targets,
                              images=global_crops)

    def _train_step(self, passes: list[dict], values: dict) -> torch.Tensor:
        """The gradients of one optimiser step from the rank's batch cut into ``train.grad_accum_steps`` passes
        (`augment.split_batch`): each pass's loss divided by their number and back-propagated (DDP all-reduces
        after the last), then DINOv3's clipping per module. Returns the logged scalars (each loss part averaged
        over the passes, then the gradient norms before clipping) as one tensor on the device, in
        ``self._stat_names`` order; nothing here waits for the device."""
        self.optimizer.zero_grad(set_to_none=True)
        summed = None
        for index, micro in enumerate(passes):
            accumulate = self.model is not self.student and index < len(passes) - 1
            with self.model.no_sync() if accumulate else nullcontext():
                total, parts = self._step(micro, values)
                (total / len(passes) if len(passes) > 1 else total).backward()
            stacked = torch.stack(list(parts.values()))
            summed = stacked if summed is None else summed + stacked
        clipped = trained_modules(self.student)  # DINOv3 clips each module's gradient on its own
        norms = [torch.nn.utils.clip_grad_norm_(getattr(self.student, name).parameters(), self.config.optim.clip_grad)
                 for name in clipped]
        if self._stat_names is None:
            self._stat_names = [*parts, *(f"grad_norm_{name}" for name in clipped)]
        return torch.cat([summed / len(passes), torch.stack(norms).float()])

    def _to_student_grid(self, features: torch.Tensor, student_size: int) -> torch.Tensor:
        return to_student_grid(features, student_size // self.arch.patch_size, self.config.gram)

    # -- checkpoints ------------------------------------------------------------------------------
    def probe_teacher(self, step: int, probes: MetricsLog | None) -> None:
        """`meddinov3-nnunet probe` on the EMA teacher's backbone after ``step`` steps, on rank 0 while the others
        wait in `DistContext.run_on_main` (a probe may outlast NCCL's collective timeout): one line in
        probe.jsonl, and the loss plot redrawn with it. Uses no global RNG, so a resumed run stays exact."""
        def probe() -> None:
            from meddinov3_nnunet.probing.linear_probe import encoder_featuriser, load_dataset, run_probe, split_cases

            evaluation = self.config.evaluation
            if getattr(self, "_probe_data", None) is None:
                data = load_dataset(evaluation.probe_data, evaluation.probe_max_cases)
                self._probe_data = (data, *split_cases(list(data.cases)))
            data, train_cases, test_cases = self._probe_data
            row = run_probe(f"teacher, step {step}", encoder_featuriser(self.teacher.backbone, evaluation.probe_size),
                            data, train_cases, test_cases, evaluation.probe_train_pixels)
            probes.write({"step": step - 1, "probe_dice_mean": row["dice_mean"], "probe_dice": row["dice"],
                          "probe_pixel_accuracy": row["pixel_accuracy"], "probe_seconds": row["seconds"]})
            log.info("probe after step %d: mean Dice %.3f (%s)", step, row["dice_mean"],
                     ", ".join(f"{k} {v:.3f}" for k, v in row["dice"].items()))
            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curves.png",
                         title=f"{self.config.name}: {self.output_dir.name}")

        self.ctx.run_on_main(probe, f"probing the teacher after step {step}")

    def save_checkpoint(self, step: int) -> Path | None:
        """Atomic ``checkpoint.pth`` after ``step`` completed steps (+ a kept copy every ``keep_every``)."""
        ctx = self.ctx
        states = ctx.gather(run_checkpoint.rng_state(ctx.device))
        fingerprints = ctx.gather(run_checkpoint.fingerprint(self.student, self.teacher))
        if any(not torch.equal(f, fingerprints[0]) for f in fingerprints):
            raise RuntimeError(f"ranks hold different weights at step {step} (DDP out of sync); not saving")

        def write() -> None:  # rank 0, while the others wait in run_on_main (slow storage may take minutes)
            payload = {
                "step": step, "config": self.config.to_dict(), "arch": self.arch.to_dict(),
                "world_size": ctx.world_size,
                "corpus": {"path": os.path.abspath(self.corpus_path), "volumes": len(self.corpus),
                           "slices": self.corpus.num_slices},
                "student": run_checkpoint.cpu_state(self.student),
                "teacher": run_checkpoint.cpu_state(self.teacher),
                "optimizer": self.optimizer.state_dict(),
                "schedules": schedules_at(self.config.optim, max(step - 1, 0)),
                "data_position": {"next_step": step, "samples_per_rank": step * self.rank_batch},
                "rng": states,
                **({"gram_teacher": run_checkpoint.cpu_state(self.gram_teacher)} if self.gram_teacher is not None
                   else {}),
                "rank_fingerprints": fingerprints,
            }
            keep = step % self.config.train.keep_every == 0
            run_checkpoint.save(payload, self.checkpoint_path,
                                self.output_dir / run_checkpoint.kept_name(step) if keep else None)

        ctx.run_on_main(write, f"writing the checkpoint of step {step}")
        return self.checkpoint_path if ctx.is_main else None

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None = None, time_limit_minutes: float | None = None) -> dict:
        if not self.built:
            self.build()
        cfg, ctx = self.config, self.ctx
        total_steps = cfg.optim.iterations
        stop = min(total_steps, stop_at_step) if stop_at_step is not None else total_steps
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name in run_checkpoint.remove_interrupted_writes(self.output_dir):
                log.info("removed %s, left by an interrupted write of an earlier start", name)
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
        ctx.barrier()
        metrics = MetricsLog(self.output_dir / "metrics.jsonl", self.start_step) if ctx.is_main else None
        probes = (MetricsLog(self.output_dir / "probe.jsonl", self.start_step)
                  if ctx.is_main and cfg.evaluation.probe_every else None)
        bar = None
        if ctx.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=self.start_step, desc=f"pretrain {cfg.name}", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        for note in self.init_notes:
            log.info("init: %s", note)
        started = time.time()
        step = self.start_step
        last_saved = self.start_step if self.resume else None
        status = "completed"
        iterator = iter(self.loader)
        pending: list[tuple[int, dict, torch.Tensor, int]] = []  # steps whose scalars are still on the device
        window_started = time.time()
        try:
            while step < stop:
                batch = next(iterator)
                values = schedules_at(cfg.optim, step)
                apply_schedules(self.optimizer, values)
                stats = self._train_step(augment.split_batch(batch, self.rank_batch, cfg.train.grad_accum_steps),
                                         values)
                self.optimizer.step()
                update_momentum(self.student, self.teacher, values["momentum"])
                pending.append((step, values, stats, int(batch["mask_indices"].numel())))
                step += 1
                checkpoint_due = step % cfg.train.checkpoint_every == 0 or step == stop
                probe_due = bool(cfg.evaluation.probe_every) and step % cfg.evaluation.probe_every == 0
                timed_out = False
                if len(pending) >= cfg.train.log_every or checkpoint_due or probe_due:
                    now = time.time()
                    late = time_limit_minutes is not None and (now - started) / 60 >= time_limit_minutes
                    timed_out = self._read_scalars(pending, now - window_started, late, metrics, bar, last_saved)
                    pending, window_started = [], now
                if self.gram_teacher is not None and gram_refresh_due(cfg.gram, step):
                    self.refresh_gram_teacher()
                if checkpoint_due or timed_out:
                    self.save_checkpoint(step)
                    last_saved = step
                    if ctx.is_main:
                        plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curves.png",
                                     title=f"{cfg.name}: {self.output_dir.name}")
                if probe_due:
                    self.probe_teacher(step, probes)
                if timed_out:
                    status = "time_limit"
                    break
            if step < total_steps and status == "completed":
                status = "stopped"
            if last_saved != step:  # e.g. stop_at_step == start
                self.save_checkpoint(step)
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            if probes is not None:
                probes.close()
            del iterator
        elapsed = time.time() - started
        done = step - self.start_step
        return {"status": status, "step": step, "total_steps": total_steps, "steps_this_run": done,
                "seconds": round(elapsed, 1),
                "images_per_s": round(done * cfg.optim.batch_size / elapsed, 2) if elapsed > 0 and done else 0.0,
                "checkpoint": str(self.checkpoint_path), "output_dir": str(self.output_dir)}

    def _read_scalars(self, pending: list, seconds: float, late: bool, metrics: MetricsLog | None, bar,
                      last_saved: int | None) -> bool:
        """Reads the logged scalars of the ``pending`` steps: averaged over the ranks in one all-reduce (with each
        rank's time-limit flag) and moved to the host in one transfer. Writes their metrics lines in order and
        stops at the first step with a non-finite loss or gradient norm on any rank (`NonFiniteLossError`).
        Returns whether some rank reached the time limit."""
        ctx, cfg = self.ctx, self.config
        rows = torch.stack([stats for _, _, stats, _ in pending]).double()
        flag = torch.ones(1, dtype=torch.float64, device=rows.device) * float(late)
        *flat, late_ranks = ctx.sum(torch.cat([rows.flatten(), flag])).tolist()  # the one host sync
        width, seconds_per_step = len(self._stat_names), seconds / len(pending)
        record = None
        for row, (index, values, _, masked) in enumerate(pending):
            stats = {name: v / ctx.world_size for name, v in zip(self._stat_names, flat[row * width:(row + 1) * width])}
            parts = {k: v for k, v in stats.items() if not k.startswith("grad_norm_")}
            norms = {k: v for k, v in stats.items() if k.startswith("grad_norm_")}
            if not all(math.isfinite(v) for v in parts.values()):
                raise NonFiniteLossError(self._nan_message(index, parts, last_saved, "loss"))
            if not all(math.isfinite(v) for v in norms.values()):
                raise NonFiniteLossError(self._nan_message(index, stats, last_saved, "gradient"))
            record = {"step": index, **parts, **values, **norms,
                      "gram_weight": cfg.gram.loss_weight if self.gram_teacher is not None else 0.0,
                      "masked_tokens": masked, "images_per_s": cfg.optim.batch_size / max(seconds_per_step, 1e-9),
                      "step_seconds": seconds_per_step}
            if metrics is not None:
                metrics.write(record)
        if bar is not None:
            bar.update(len(pending))
            bar.set_postfix(loss=f"{record['total']:.3f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{record['images_per_s']:.0f}", refresh=False)
        return late_ranks > 0

    def _nan_message(self, step: int, values: dict, last_saved: int | None, what: str) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        kept = (f"the last good checkpoint {self.checkpoint_path} (after step {last_saved}) is kept"
                if last_saved is not None else "no checkpoint had been written yet")
        return (f"non-finite {what} at step {step} ({shown}); the run stopped and {kept}. Lower optim.lr.peak or "
                f"check the data, then resume with --resume.")


    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """DINOv3's ``update_gram``: the Gram teacher becomes a copy of the EMA teacher's backbone."""
        self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
        log.info("Gram teacher refreshed from the EMA teacher")


def gram_refresh_due(gram, step: int) -> bool:
    """Whether the Gram teacher is refreshed after ``step`` completed steps (DINOv3 train.py: step >= first,
    step a multiple of refresh_every, fewer than refresh_max refreshes so far)."""
    if gram.refresh_every <= 0 or step < max(gram.refresh_first, 1) or step % gram.refresh_every:
        return False
    done = len([s for s in range(max(gram.refresh_first, 1), step) if s % gram.refresh_every == 0])
    return gram.refresh_max is None or done < gram.refresh_max


class _Collate:
    """Picklable collate for the loader workers."""

    def __init__(self, patch_size: int, ibot, micro_batches: int = 1):
        self.patch_size, self.ibot, self.micro_batches = patch_size, ibot, micro_batches

    def __call__(self, samples, rng):
        return augment.collate(samples, self.patch_size, self.ibot, rng, self.micro_batches)


def _worker_init(_worker_id: int) -> None:
    """Loader workers decode and crop; leave the cores to the model (torch and SimpleITK one thread each)."""
    import SimpleITK as sitk

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def config_from_checkpoint(path: str | os.PathLike) -> PretrainConfig:
    return from_dict(run_checkpoint.config_dict(path), origin=str(path))
