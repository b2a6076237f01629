"""ViT-aware nnU-Net planning: derive a ViT/16 configuration from nnU-Net's own ``2d`` plan.

The new configuration (default ``2d_meddinov3``) inherits everything from ``2d`` (preprocessor, normalisation,
resampling: stock nnU-Net names only) and changes four things:

* in-plane spacing divided by ``scale = clip(target_size / max(median slice size), 1, max_scale)``: MedDINOv3
  upsamples CT slices to 896 px (56 x 56 tokens) because a 16 px token is coarse for small organs;
* patch size scaled likewise and rounded up to multiples of 16;
* batch size ``clip(tokens_per_batch // tokens_per_patch, min_batch_size, batch size of 2d)``;
* a ``meddinov3`` entry recording how it was made and, optionally, the encoder weights to fine-tune from.

Then nnU-Net's own preprocessing runs for that configuration.

When the plans also have ``3d_fullres``, a 3D counterpart (``3d_meddinov3``, for the 3D trainers) is derived from it
with the same in-plane ``scale``: axis 0 (the axis nnU-Net's ``2d`` slices) keeps its spacing and patch length,
the in-plane patch is scaled and rounded up to multiples of 16, the batch size follows the same token budget
(tokens of all slices of a patch) clipped to ``[min_batch_size, batch size of 3d_fullres]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from meddinov3_nnunet.atomic_io import write_text_atomic
from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.plans import load_preset

from .environment import dataset_id, find_dataset_name, required_path

PLANS_KEY = "meddinov3"


class PlanningError(InputError):
    """Bad input to `plan`; the message says what to fix."""


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


def plan(dataset: str | int, preset: str = "default", plans_name: str = "nnUNetPlans",
         target_size: int | None = None, max_scale: float | None = None, batch_size: int | None = None,
         configuration_name: str | None = None, weights: str | None = None, preprocess: bool = True,
         num_processes: int = 2, volumetric: bool = True) -> tuple[str, VitPlan]:
    """Adds the ViT configuration to ``nnUNet_preprocessed/<dataset>/<plans_name>.json`` and preprocesses it;
    with ``volumetric`` and a ``3d_fullres`` in the plans also ``3d_meddinov3`` (in ``plan.volumetric``).
    Returns (dataset name, plan)."""
    settings = load_preset(preset)
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
        PLANS_KEY: entry,
    }
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
        vit = dataclasses.replace(vit, volumetric=vit3d)
        names.append(vit3d.configuration_name)
    write_text_atomic(plans_file, json.dumps(plans, indent=4))
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nnunet_preprocess

        nnunet_preprocess([dataset_id(dataset_name)], plans_name, configurations=names,
                          num_processes=[num_processes] * len(names))
    return dataset_name, vit
