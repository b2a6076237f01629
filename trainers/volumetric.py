"""Trainers beyond 2D slices: depth context on 3D configurations (2.5D, slice mixing) and finer tokens (patch 8).

3D trainers run on nnU-Net's ``3d_fullres`` (or ``3d_meddinov3`` from `meddinov3-nnunet plan`) and predict with
nnU-Net's 3D sliding window; the 2D encoder runs on the slices along axis 0 of the patch (the axis the ``2d``
configuration slices). See `meddinov3_nnunet.models.volumetric` for the designs. Every trainer here loads the
same encoder files as the 2D ones (strictly; patch 8 resamples the patch embedding, nothing else).
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from meddinov3_nnunet.models.decoder import ConvPath
from meddinov3_nnunet.models.volumetric import VolumetricMedDINOv3Net, build_volumetric_network
from meddinov3_nnunet.nnunet.planning import round_up_to_patch

from .base import MedDINOv3Trainer
from .variants import MedDINOv3Trainer_S, MedDINOv3Trainer_tiny, SmokeBudget


class MedDINOv3Trainer3DBase(MedDINOv3Trainer):
    """2D encoder on the slices of a 3D patch; ``context`` neighbours per side as stem input (2.5D),
    ``mix_slices`` adds zero-initialised slice mixers after the tapped blocks."""

    context = 1
    mix_slices = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # explicit: nnU-Net records the init arguments
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.print_to_log_file(f"3D: slices along axis 0 of the patch, {2 * self.context + 1} slice(s) per stem "
                               f"input, slice mixing {'on' if self.mix_slices else 'off'}, {self.decoder} decoder, "
                               f"patch {self.encoder_patch_size}")

    @classmethod
    def _adapt_plans(cls, plans: dict, configuration: str) -> list[str]:
        """Patch sizes (D, H, W): H and W rounded up to multiples of the token patch size, D kept."""
        if configuration not in plans.get("configurations", {}):
            raise ValueError(f"configuration {configuration!r} is not in the plans "
                             f"({sorted(plans.get('configurations', {}))}); use 3d_fullres or run "
                             f"`meddinov3-nnunet plan` to add 3d_meddinov3")
        patch_size = list(PlansManager(plans).get_configuration(configuration).patch_size)
        if len(patch_size) != 3:
            raise ValueError(f"{cls.__name__} is a 3D method but configuration {configuration!r} has a "
                             f"{len(patch_size)}D patch size {patch_size}; use 3d_fullres or 3d_meddinov3, or a 2D "
                             f"trainer (MedDINOv3Trainer, MedDINOv3Trainer_patch8) for {configuration!r}")
        rounded = [patch_size[0]] + round_up_to_patch(patch_size[1:], cls.encoder_patch_size)
        notes = []
        if rounded != patch_size:
            plans["configurations"][configuration]["patch_size"] = rounded
            notes.append(f"patch size {patch_size} rounded up to {rounded} (in-plane multiples of "
                         f"{cls.encoder_patch_size}; axis 0 is the slice axis)")
        return notes + cls.budget_plans(plans, configuration)

    @classmethod
    def conv_path(cls, configuration_manager: ConfigurationManager | None) -> ConvPath:
        """The 3D hybrid's conv pyramid: the plans' kernels, depth strides and widths (`ConvPath.from_plans`);
        without a configuration (tests) nnU-Net's isotropic default."""
        if configuration_manager is None:
            return ConvPath.default(cls.encoder_patch_size, ndim=3)
        arch = configuration_manager.network_arch_init_kwargs
        path = ConvPath.from_plans(cls.encoder_patch_size, arch["kernel_sizes"], arch["strides"],
                                   arch.get("features_per_stage"))
        path.check_patch(configuration_manager.patch_size)
        return path

    @classmethod
    def build_plain_network(cls, num_input_channels: int, num_output_channels: int,
                            configuration_manager: ConfigurationManager | None = None) -> VolumetricMedDINOv3Net:
        """``image_skip`` in 3D is the hybrid decoder: its conv path's first level is the full-resolution skip."""
        if cls.token_injection:
            raise ValueError(f"{cls.__name__}: token injection is built for the 2D hybrid only")
        arch = cls.encoder_arch()
        decoder = "hybrid" if cls.image_skip else cls.decoder
        return build_volumetric_network(arch, num_input_channels, num_output_channels, context=cls.context,
                                        mix_slices=cls.mix_slices, tap_blocks=cls.tap_blocks, decoder=decoder,
                                        drop_path_rate=cls.drop_path_rate, vit_tokens=cls.vit_tokens,
                                        conv_path=cls.conv_path(configuration_manager) if decoder == "hybrid" else None)


# -- 3D: ViT-B (MedDINOv3 CT-3M weights) -------------------------------------------------------------
class MedDINOv3Trainer_3d(MedDINOv3Trainer3DBase):
    """Recommended 3D design: slices z-1, z, z+1 as RGB (2.5D) + slice mixing after the tapped blocks."""


class MedDINOv3Trainer_25d(MedDINOv3Trainer3DBase):
    """(a) 2.5D only: slices z-1, z, z+1 as the stem's RGB channels, 2D decoder per slice."""
    mix_slices = False


class MedDINOv3Trainer_slicemix(MedDINOv3Trainer3DBase):
    """(b) only: one slice per stem input, tokens mixed across slices after the tapped blocks."""
    context = 0


# -- finer tokens and the projected decoder (2D, like MedDINOv3Trainer) -------------------------------
class MedDINOv3Trainer_patch8(MedDINOv3Trainer):
    """Patch 8 (patch embedding resampled from the patch-16 weights), decoder with three 2x stages."""
    encoder_patch_size = 8


class MedDINOv3Trainer_proj(MedDINOv3Trainer):
    """Projected decoder (FlexiCT's Primus v2): taps -> 1x1 conv to the embedding width + norm -> 2x stages."""
    decoder = "projected"


class MedDINOv3Trainer_skip(MedDINOv3Trainer):
    """The paper's network + a full-resolution conv skip from the image into the decoder (`ImageSkip`)."""
    image_skip = True


# -- ViT-S forms (weights required; from-scratch benchmark forms in benchmark_rows.py) ----------------------
class MedDINOv3Trainer_S_3d(MedDINOv3Trainer_3d):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_S_25d(MedDINOv3Trainer_25d):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_S_patch8(MedDINOv3Trainer_patch8):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_S_proj(MedDINOv3Trainer_proj):
    encoder_preset, weights_hint = MedDINOv3Trainer_S.encoder_preset, MedDINOv3Trainer_S.weights_hint


class MedDINOv3Trainer_3d_smoke(SmokeBudget, MedDINOv3Trainer_3d):
    """Tiny encoder, 2.5D + slice mixing, a few iterations at batch 2: checks the 3D path in about a minute.
    Loads encoder weights when some are configured (e.g. a tiny pretraining export), else random."""
    encoder_preset = MedDINOv3Trainer_tiny.encoder_preset
    drop_path_rate = 0.0
    weights_hint = MedDINOv3Trainer_tiny.weights_hint
    batch_size_override = 2
