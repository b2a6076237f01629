"""ViT-aware nnU-Net planning: derive a ViT/16 configuration from nnU-Net's own ``2d`` plan.

The new configuration (default ``2d_meddinov3``) inherits everything from ``2d`` (preprocessor, normalisation,
resampling: stock nnU-Net names only) and changes four things:

* in-plane spacing divided by ``scale = clip(target_size / max(median slice size), 1, max_scale)``: MedDINOv3
  upsamples CT slices to 896 px (56 x 56 tokens) because a 16 px token is coarse for small organs;
* patch size scaled likewise and rounded up to multiples of 16;
* batch size ``clip(tokens_per_batch // tokens_per_patch, min_batch_size, batch size of 2d)``, then, with a GPU
  budget (``--gpu-memory``, the ``default`` preset's 80 GiB), the largest batch up to that whose training step fits it
  by the memory meter (`meddinov3_nnunet.models.memory`: the trainer's network, CUDA autocast, AdamW; `fit_batch_size`);
* a ``meddinov3`` entry recording how it was made and, optionally, the encoder weights to fine-tune from.

Then nnU-Net's own preprocessing runs for that configuration.

When the plans also have ``3d_fullres``, a 3D counterpart (``3d_meddinov3``, for the 3D trainers) is derived from it
with the same in-plane ``scale``: axis 0 (the axis nnU-Net's ``2d`` slices) keeps its spacing and patch length,
the in-plane patch is scaled and rounded up to multiples of 16, the batch size follows the same token budget
(tokens of all slices of a patch) clipped to ``[min_batch_size, batch size of 3d_fullres]``, then fitted to the GPU
budget like the 2D one. A configuration whose single patch does not fit the budget is refused (`PlanningError`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from meddinov3_nnunet.atomic_io import write_text_atomic
from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.plans import load_preset

from .environment import dataset_id, find_dataset_name, required_path

PLANS_KEY = "meddinov3"
GPU_TRAINER, GPU_TRAINER_3D = "MedDINOv3Trainer", "MedDINOv3Trainer_3d"  # whose training step `plan` fits by default


class PlanningError(InputError):
    """Bad input to `plan`; the message says what to fix."""


if TYPE_CHECKING:  # importing the meter loads torch
    from meddinov3_nnunet.models.memory import StepMemory


def round_up_to_patch(size, patch: int = 16) -> list[int]:
    """Each size rounded up to a multiple of the ViT patch (at least one patch): [56.0, 40] -> [64, 48]. Used by
    the planning here and by the trainers, which round a stock plan's patch size the same way."""
    return [max(patch, math.ceil(s / patch) * patch) for s in size]


@dataclass(frozen=True)
class VitPlan:
    configuration_name: str
    spacing: list[float]
    patch_size: list[int]
    median_image_size_in_voxels: list[float]
    batch_size: int
    scale: float
    volumetric: "VitPlan | None" = None  # the 3D counterpart, when the plans have 3d_fullres
    memory: "MemoryFit | None" = None  # the GPU memory of a training step at batch_size, with a GPU budget

    @property
    def tokens_per_patch(self) -> int:
        return math.prod(self.patch_size) // 256


def derive_vit_plan(source: dict, target_size: int, max_scale: float, tokens_per_batch: int,
                    min_batch_size: int = 2, batch_size: int | None = None,
                    configuration_name: str = "2d_meddinov3") -> VitPlan:
    """Pure arithmetic of the derived configuration from a resolved 2D source configuration dict."""
    if target_size < 16 or max_scale < 1 or tokens_per_batch < 1:
        raise PlanningError(f"need target_size >= 16, max_scale >= 1, tokens_per_batch >= 1 (got {target_size}, "
                            f"{max_scale}, {tokens_per_batch})")
    if len(source["patch_size"]) != 2:
        raise PlanningError(f"the source configuration has a {len(source['patch_size'])}D patch size "
                            f"{source['patch_size']}; derive from a 2D configuration (2d)")
    median = [float(m) for m in source["median_image_size_in_voxels"]]
    scale = min(max(target_size / max(median), 1.0), max_scale)
    patch = round_up_to_patch([p * scale for p in source["patch_size"]])
    tokens = math.prod(patch) // 256
    if batch_size is None:
        batch_size = min(max(tokens_per_batch // tokens, min_batch_size), int(source["batch_size"]))
    if batch_size < 1:
        raise PlanningError(f"batch size must be >= 1, got {batch_size}")
    return VitPlan(configuration_name=configuration_name,
                   spacing=[round(s / scale, 6) for s in source["spacing"]],
                   patch_size=patch,
                   median_image_size_in_voxels=[round(m * scale, 2) for m in median],
                   batch_size=int(batch_size), scale=round(scale, 6))


def derive_volumetric_plan(source: dict, scale: float, tokens_per_batch: int, min_batch_size: int = 2,
                           batch_size: int | None = None, configuration_name: str = "3d_meddinov3") -> VitPlan:
    """The 3D configuration from a resolved 3D source dict (``3d_fullres``) and the 2D plan's in-plane scale."""
    if len(source["patch_size"]) != 3:
        raise PlanningError(f"the 3D source configuration has a {len(source['patch_size'])}D patch size "
                            f"{source['patch_size']}; derive from 3d_fullres")
    patch = [int(source["patch_size"][0])] + round_up_to_patch([p * scale for p in source["patch_size"][1:]])
    tokens = math.prod(patch) // 256
    if batch_size is None:
        batch_size = min(max(tokens_per_batch // tokens, min_batch_size), int(source["batch_size"]))
    spacing = [float(source["spacing"][0])] + [round(s / scale, 6) for s in source["spacing"][1:]]
    median = [float(m) for m in source["median_image_size_in_voxels"]]
    return VitPlan(configuration_name=configuration_name, spacing=spacing, patch_size=patch,
                   median_image_size_in_voxels=[median[0]] + [round(m * scale, 2) for m in median[1:]],
                   batch_size=int(batch_size), scale=round(scale, 6))


@dataclass(frozen=True)
class MemoryFit:
    """A batch size checked against a GPU budget: the step's estimate at that batch and how the batch was chosen."""

    trainer: str
    budget_gib: float
    memory: "StepMemory"  # at the planned batch size
    checkpointing_reason: str
    note: str = ""  # why the batch is below the token budget's, or that an explicit one does not fit
    checkpointed: "StepMemory | None" = None  # the same batch with activation checkpointing, when it is off

    def describe(self) -> str:
        from meddinov3_nnunet.models.memory import GIB

        m = self.memory
        text = (f"GPU memory per training step ({self.trainer}, {m.dtype} autocast, "
                f"{'activation checkpointing' if m.checkpointing else 'no activation checkpointing'}): about "
                f"{m.required / GIB:.1f} GiB of {self.budget_gib:g} (peak {m.peak / GIB:.1f} GiB; kept for backward "
                f"{m.saved / GIB:.1f}, weights + gradients + AdamW {(m.weights + m.gradients + m.optimizer) / GIB:.1f})")
        if self.checkpointed is not None:
            text += (f"; with MEDDINOV3_ACTIVATION_CHECKPOINTING=1 about {self.checkpointed.required / GIB:.1f} GiB")
        return text + (f"; {self.note}" if self.note else "")


def fit_batch_size(estimate: Callable[[int], "StepMemory"], upper: int, budget_bytes: int,
                   min_batch_size: int = 2) -> tuple[int, str]:
    """(the largest batch size in ``[1, upper]`` whose step needs at most ``budget_bytes``, a note when that is below
    ``upper``); ``estimate(batch).required`` is the need, non-decreasing in the batch. (0, note) when batch 1 does not
    fit."""
    from meddinov3_nnunet.models.memory import GIB

    known: dict[int, int] = {}

    def need(batch: int) -> int:
        if batch not in known:
            known[batch] = estimate(batch).required
        return known[batch]

    if need(upper) <= budget_bytes:
        return upper, ""
    if need(1) > budget_bytes:
        return 0, f"one patch needs about {need(1) / GIB:.1f} GiB"
    low, high = 1, upper  # low fits, high does not
    for step in range(64):
        if high - low <= 1:
            break
        if step % 2:  # bisection every other step bounds the search
            guess = (low + high) // 2
        else:  # secant: memory is close to linear in the batch
            slope = (need(high) - need(low)) / (high - low)
            guess = low + int((budget_bytes - need(low)) / slope)
        guess = min(max(guess, low + 1), high - 1)
        if need(guess) <= budget_bytes:
            low = guess
        else:
            high = guess
    note = (f"batch {low} instead of the token budget's {upper} (which needs about {need(upper) / GIB:.1f} GiB)")
    if low < min_batch_size:
        note += f"; below the minimum {min_batch_size}: batch {min_batch_size} needs {need(min_batch_size) / GIB:.1f} GiB"
    return low, note


def trainer_class(name: str) -> type:
    """A trainer class of this plugin by name."""
    from meddinov3_nnunet import trainers

    found = getattr(trainers, name, None)
    if found is None or name not in trainers.TRAINER_NAMES:
        raise PlanningError(f"unknown trainer {name!r}; e.g. {GPU_TRAINER}, {GPU_TRAINER_3D}, MedDINOv3Trainer_S")
    return found


def nnunet_loss(batch_dice: bool) -> Callable:
    """nnU-Net's loss of a trainer without deep supervision (Dice + CE, memory-efficient soft Dice)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def step_memory_of(trainer: type, in_channels: int, num_classes: int, patch_size, batch_size: int,
                   checkpointing: bool, configuration_manager=None, batch_dice: bool = False) -> "StepMemory":
    """The memory meter's estimate of one training step of ``trainer``'s network (nnU-Net's loss, the autocast dtype
    ``MEDDINOV3_AMP`` gives a GPU: bf16 unless ``fp16`` / ``off``)."""
    import torch

    from meddinov3_nnunet.models.memory import estimate_step_memory
    from meddinov3_nnunet.nnunet.precision import requested_mode

    dtype = {"off": None, "fp16": torch.float16}.get(requested_mode(), torch.bfloat16)
    extra = (configuration_manager,) if "configuration_manager" in inspect.signature(
        trainer.build_plain_network).parameters else ()
    return estimate_step_memory(lambda: trainer.build_plain_network(in_channels, num_classes, *extra),
                                (in_channels, *patch_size), batch_size, dtype=dtype, checkpointing=checkpointing,
                                loss=nnunet_loss(batch_dice))


def fit_to_gpu(vit: VitPlan, trainer_name: str, budget_gib: float, in_channels: int, num_classes: int,
               min_batch_size: int, explicit_batch: bool, configuration_manager=None,
               batch_dice: bool = False, volumetric: bool = False) -> VitPlan:
    """``vit`` with the largest batch up to its own whose step fits ``budget_gib`` (an explicit batch is kept, with a
    note when it does not fit); `PlanningError` when one patch does not fit."""
    from meddinov3_nnunet.models.checkpointing import requested
    from meddinov3_nnunet.models.memory import GIB

    trainer = trainer_class(trainer_name)
    checkpointing, reason = requested(getattr(trainer, "activation_checkpointing", False))

    @functools.lru_cache(maxsize=None)
    def estimate(batch, with_checkpointing=checkpointing):
        return step_memory_of(trainer, in_channels, num_classes, vit.patch_size, batch, with_checkpointing,
                              configuration_manager, batch_dice)

    budget = int(budget_gib * GIB)
    if explicit_batch:
        batch, note = vit.batch_size, ""
        if estimate(batch).required > budget:
            note = f"WARNING: batch {batch} (--batch-size) needs more than the --gpu-memory budget"
    else:
        batch, note = fit_batch_size(estimate, vit.batch_size, budget, min_batch_size)
    if batch == 0:
        hint = "" if checkpointing else (f", turn on activation checkpointing (MEDDINOV3_ACTIVATION_CHECKPOINTING=1: "
                                          f"about {estimate(1, True).required / GIB:.1f} GiB)")
        raise PlanningError(
            f"{vit.configuration_name}: {note} of GPU memory per training step with {trainer_name} (patch "
            f"{vit.patch_size}), more than --gpu-memory {budget_gib:g}. Lower --target-size or --max-scale{hint}"
            + (", leave the 3D configuration out with --no-3d" if volumetric else "")
            + ", or give the GPU's memory with --gpu-memory")
    fit = MemoryFit(trainer_name, budget_gib, estimate(batch), reason, note,
                    None if checkpointing else estimate(batch, True))
    return dataclasses.replace(vit, batch_size=batch, memory=fit)


def plan(dataset: str | int, preset: str = "default", plans_name: str = "nnUNetPlans",
         target_size: int | None = None, max_scale: float | None = None, batch_size: int | None = None,
         configuration_name: str | None = None, weights: str | None = None, preprocess: bool = True,
         num_processes: int = 2, volumetric: bool = True, gpu_memory: float | None = None,
         trainer: str = GPU_TRAINER, trainer_3d: str = GPU_TRAINER_3D) -> tuple[str, VitPlan]:
    """Adds the ViT configuration to ``nnUNet_preprocessed/<dataset>/<plans_name>.json`` and preprocesses it;
    with ``volumetric`` and a ``3d_fullres`` in the plans also ``3d_meddinov3`` (in ``plan.volumetric``).
    ``gpu_memory`` (GiB; None: the preset's, 0: none): each batch size is fitted to that budget for a training step
    of ``trainer`` / ``trainer_3d`` (`fit_to_gpu`). Returns (dataset name, plan)."""
    settings = load_preset(preset)
    budget = settings.get("gpu_memory") if gpu_memory is None else gpu_memory
    if budget is not None and budget < 0:
        raise PlanningError(f"--gpu-memory must be >= 0 GiB (0: no GPU budget), got {budget:g}")
    dataset_name = find_dataset_name(dataset)
    plans_file = required_path("nnUNet_preprocessed") / dataset_name / f"{plans_name}.json"
    if not plans_file.is_file():
        raise PlanningError(f"{plans_file} does not exist: run nnU-Net's planning first, e.g. "
                            f"`nnUNetv2_plan_and_preprocess -d {dataset} -c 2d`")
    plans = json.loads(plans_file.read_text())
    source_name = settings["source_configuration"]
    if source_name not in plans["configurations"]:
        raise PlanningError(f"{plans_file} has no {source_name!r} configuration to derive from")
    if weights is not None:
        from meddinov3_nnunet.models.checkpoints import read_checkpoint

        weights = str(Path(weights).resolve())
        read_checkpoint(weights)  # unreadable or foreign files fail here, before any work

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    def fitted(vit: VitPlan, trainer_name: str, is_3d: bool) -> VitPlan:
        """``vit`` fitted to the budget (its entry in ``plans`` already written), the entry's batch size updated."""
        if not budget:
            return vit
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        dataset_json = json.loads((plans_file.parent / "dataset.json").read_text())
        manager = PlansManager(plans)
        configuration = manager.get_configuration(vit.configuration_name)
        vit = fit_to_gpu(vit, trainer_name, budget, determine_num_input_channels(manager, configuration, dataset_json),
                         manager.get_label_manager(dataset_json).num_segmentation_heads, settings["min_batch_size"],
                         batch_size is not None, configuration, configuration.batch_dice, is_3d)
        entry = plans["configurations"][vit.configuration_name]
        entry["batch_size"] = vit.batch_size
        entry[PLANS_KEY]["gpu_memory"] = {"budget_gib": budget, "trainer": trainer_name,
                                          "estimated_gib": round(vit.memory.memory.required / 2 ** 30, 1)}
        return vit

    source = PlansManager(plans).get_configuration(source_name).configuration
    vit = derive_vit_plan(source, target_size or settings["target_size"], max_scale or settings["max_scale"],
                          settings["tokens_per_batch"], settings["min_batch_size"], batch_size,
                          configuration_name or settings["configuration_name"])
    entry = {"preset": preset, "target_size": target_size or settings["target_size"], "scale": vit.scale,
             "source_configuration": source_name}
    if weights:
        entry["encoder_weights"] = weights
    plans["configurations"][vit.configuration_name] = {
        "inherits_from": source_name,
        "data_identifier": f"{plans_name}_{vit.configuration_name}",
        "spacing": vit.spacing,
        "patch_size": vit.patch_size,
        "median_image_size_in_voxels": vit.median_image_size_in_voxels,
        "batch_size": vit.batch_size,
        PLANS_KEY: dict(entry),
    }
    vit = fitted(vit, trainer, False)
    names = [vit.configuration_name]
    if volumetric and "3d_fullres" in plans["configurations"]:
        source_3d = PlansManager(plans).get_configuration("3d_fullres").configuration
        vit3d = derive_volumetric_plan(source_3d, vit.scale, settings["tokens_per_batch"], settings["min_batch_size"],
                                       batch_size, "3d_" + vit.configuration_name.removeprefix("2d_"))
        plans["configurations"][vit3d.configuration_name] = {
            "inherits_from": "3d_fullres",
            "data_identifier": f"{plans_name}_{vit3d.configuration_name}",
            "spacing": vit3d.spacing,
            "patch_size": vit3d.patch_size,
            "median_image_size_in_voxels": vit3d.median_image_size_in_voxels,
            "batch_size": vit3d.batch_size,
            PLANS_KEY: {**entry, "source_configuration": "3d_fullres"},
        }
        vit = dataclasses.replace(vit, volumetric=fitted(vit3d, trainer_3d, True))
        names.append(vit.volumetric.configuration_name)
    write_text_atomic(plans_file, json.dumps(plans, indent=4))
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

        nnunet_preprocess([dataset_id(dataset_name)], plans_name, configurations=names,
                          num_processes=[num_processes] * len(names))
    return dataset_name, vit
