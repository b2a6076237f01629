"""`MedDINOv3Trainer`: the single nnU-Net trainer class of this plugin.

Variants (see `variants.py`) change class attributes only. The architecture attributes (encoder preset,
flavour, decoder mode) are read by `build_network_architecture`, which nnU-Net also calls at prediction, so
a results folder always rebuilds the network it was trained with.

Encoder weights are looked up when training starts (never in `build_network_architecture`):
1. the environment variable named by ``weights_env_var`` (``MEDDINOV3_WEIGHTS``; ``DINOV3_WEIGHTS`` for
   `DINOv3Trainer`) — a per-run choice, so it wins;
2. ``plans['configurations'][CONFIG]['meddinov3']['encoder_weights']``, written by
   ``meddinov3-nnunet plan --weights``.

Budget overrides for quick or benchmark runs (logged): ``MEDDINOV3_NUM_EPOCHS``,
``MEDDINOV3_ITERS_PER_EPOCH``, ``MEDDINOV3_VAL_ITERS``, ``MEDDINOV3_BATCH_SIZE``.

Mixed precision (training, validation and ``nnUNetv2_predict``): ``MEDDINOV3_AMP=auto|bf16|fp16|off``, see
`meddinov3_nnunet.nnunet.precision`. Activation checkpointing: ``activation_checkpointing``, overridden by
``MEDDINOV3_ACTIVATION_CHECKPOINTING=1|0`` (logged), see `meddinov3_nnunet.models.checkpointing`.
"""
from __future__ import annotations

import os
import sys

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from meddinov3_nnunet.nnunet import precision
from meddinov3_nnunet.nnunet.finetune import FinetuneRecipe, WarmupLinearDecay, build_optimizer
from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.models import checkpointing
from meddinov3_nnunet.models.checkpoints import CheckpointError, SizeMismatchError, load_into, read_checkpoint
from meddinov3_nnunet.models.network import MedDINOv3Net, build_network
from meddinov3_nnunet.models.patch_size import with_patch_size
from meddinov3_nnunet.models.presets import EncoderArch, preset
from meddinov3_nnunet.nnunet.planning import PLANS_KEY, round_up_to_patch

from .budget import EnvironmentBudget


class MedDINOv3Trainer(EnvironmentBudget, nnUNetTrainer):
    """ViT-B/16 (MedDINOv3 CT-3M weights) + multi-scale token aggregation decoder, 2D."""

    # architecture: also used at prediction time
    encoder_preset = "vit_b16"
    encoder_flavour = "meddinov3"
    multiscale = True
    tap_blocks = None  # None: last block of each quarter (2, 5, 8, 11 for ViT-B)
    drop_path_rate = 0.2  # MedDINOv3's trainer: vit_base(drop_path_rate=0.2), DINOv3's batch-subset form, every block
    encoder_patch_size = 16  # 8: finer tokens, patch embedding resampled from the patch-16 weights at load
    decoder = "aggregation"  # "projected" (1x1 projection of the taps, FlexiCT), "hybrid" (conv pyramid beside the ViT)
    image_skip = False  # True: the decoder also sees the image at full resolution (conv skip, beyond the paper)
    vit_tokens = True  # False: ablation of the hybrid without the ViT (zeros in place of its tokens)
    token_injection = False  # True (2D hybrid): the conv path's 1/16 features added to the patch embeddings
    layerscale_init = None  # None: the preset's start (1e-5); only a random encoder keeps it, weights overwrite it
    activation_checkpointing = False  # True: encoder blocks, full-resolution decoder stages recompute in backward
    deep_supervision = False  # True (hybrid): nnU-Net's deep supervision on the decoder's levels below full resolution

    # encoder initialisation: "required" (error without weights), "optional" (random if none), "none"
    encoder_weights = "required"
    weights_env_var = "MEDDINOV3_WEIGHTS"
    weights_hint = "MedDINOv3's CT-3M ViT-B/16 model.pth (huggingface.co/ricklisz123/MedDINOv3-ViTB-16-CT-3M)"

    recipe = FinetuneRecipe()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        notes = self._adapt_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = self.deep_supervision
        self.apply_budget(notes)
        self.initial_lr = self.recipe.decoder_lr
        self.weight_decay = self.recipe.weight_decay
        # MEDDINOV3_AMP: the network autocasts each forward itself (no process-wide autocast dtype)
        self.precision = precision.resolve(self.device.type)
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        self.print_to_log_file(
            f"{type(self).__name__}: encoder {self.encoder_preset} ({self.encoder_flavour} flavour), "
            f"{'multi-scale ' + str(self.tap_blocks or 'quarter-depth') if self.multiscale else 'single-scale'} "
            f"{self.decoder} decoder{' + image skip' if self.image_skip else ''}"
            f"{' + token injection' if self.token_injection else ''}"
            f"{'' if self.vit_tokens else ' (ablation: zeros in place of the ViT tokens)'}; {self.recipe}")
        self.print_to_log_file(self.precision.describe(), also_print_to_console=False)
        enabled, reason = checkpointing.requested(self.activation_checkpointing)
        self.print_to_log_file(f"activation checkpointing {'on' if enabled else 'off'} ({reason})",
                               also_print_to_console=False)

    # -- plans ------------------------------------------------------------------------------------
    @classmethod
    def _adapt_plans(cls, plans: dict, configuration: str) -> list[str]:
        """Makes the configuration usable by a ViT/16 before nnU-Net reads it: patch size rounded up to
        multiples of 16 (written into the plans, so the results folder's plans.json and prediction use the
        same size), then the budget's batch size. Returns log lines."""
        if configuration not in plans.get("configurations", {}):
            raise ValueError(f"configuration {configuration!r} is not in the plans "
                             f"({sorted(plans.get('configurations', {}))}); run `meddinov3-nnunet plan` to add "
                             f"a ViT-aware one or use 2d")
        manager = PlansManager(plans).get_configuration(configuration)
        if len(manager.patch_size) != 2:
            raise ValueError(f"{cls.__name__} is a 2D method but configuration {configuration!r} has a "
                             f"{len(manager.patch_size)}D patch size {manager.patch_size}; use the 2d "
                             f"configuration or one made by `meddinov3-nnunet plan`, or a 3D trainer "
                             f"(MedDINOv3Trainer_3d, MedDINOv3Trainer_25d) for {configuration!r}")
        notes = []
        entry = plans["configurations"][configuration]
        patch = cls.encoder_patch_size
        rounded = round_up_to_patch(manager.patch_size, patch)
        if rounded != list(manager.patch_size):
            entry["patch_size"] = rounded
            notes.append(f"patch size {list(manager.patch_size)} rounded up to {rounded} "
                         f"(multiples of {patch} for ViT/{patch})")
        return notes + cls.budget_plans(plans, configuration)

    # -- network ----------------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> MedDINOv3Net:
        network = cls.build_plain_network(num_input_channels, num_output_channels, configuration_manager)
        if cls.deep_supervision:  # heads in training and prediction alike (one state dict); used while enabled
            if not hasattr(network.decoder, "add_supervision_heads"):
                raise ValueError(f"{cls.__name__}: deep supervision needs the hybrid decoder's levels, not the "
                                 f"{cls.decoder!r} decoder")
            network.decoder.add_supervision_heads(num_output_channels)
            network.decoder.deep_supervision = enable_deep_supervision
        # also what nnUNetv2_predict gets: it rebuilds the network through this method
        network.autocast_dtypes = precision.autocast_dtypes()
        print(f"{cls.__name__}: " + "; ".join(precision.resolve(device_type).describe()
                                               for device_type in network.autocast_dtypes))
        enabled, reason = checkpointing.requested(cls.activation_checkpointing)
        if enabled:
            wrapped = checkpointing.apply_activation_checkpointing(network)
            print(f"{cls.__name__}: activation checkpointing ({reason}): {checkpointing.summary(wrapped)}")
        return network

    @classmethod
    def encoder_arch(cls) -> EncoderArch:
        arch = preset(cls.encoder_preset, cls.encoder_flavour, patch_size=cls.encoder_patch_size)
        return arch if cls.layerscale_init is None else arch.replace(layerscale_init=cls.layerscale_init)

    @classmethod
    def build_plain_network(cls, num_input_channels: int, num_output_channels: int,
                            configuration_manager: ConfigurationManager | None = None) -> MedDINOv3Net:
        """The network the class attributes describe (the 3D trainers override this and read the configuration's
        plans; a 2D hybrid needs none: the patch, rounded to the token size, is divisible by its conv path)."""
        return build_network(cls.encoder_arch(), in_channels=num_input_channels, num_classes=num_output_channels,
                             multiscale=cls.multiscale, tap_blocks=cls.tap_blocks, drop_path_rate=cls.drop_path_rate,
                             image_skip=cls.image_skip, decoder=cls.decoder, vit_tokens=cls.vit_tokens,
                             token_injection=cls.token_injection)

    def _get_deep_supervision_scales(self):
        """The hybrid decoder's level resolutions (nnU-Net's come from the plans' pooling, which the conv path does
        not follow in-plane); None without deep supervision."""
        return self._plain_network().decoder.supervision_scales() if self.enable_deep_supervision else None

    def _plain_network(self) -> MedDINOv3Net:
        network = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def _do_i_compile(self) -> bool:
        """nnU-Net never compiles on the CPU (its 2D U-Net crashed there). This network compiles, so an explicit
        ``nnUNet_compile=1`` is honoured on the CPU as well; unset, the CPU stays eager (compiling takes minutes
        there and does not pay for short runs) and CUDA follows nnU-Net (compiled by default)."""
        if self.device.type == "cpu" and os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            return True
        return super()._do_i_compile()

    def configure_optimizers(self):
        optimizer = build_optimizer(self._plain_network(), self.recipe)
        return optimizer, WarmupLinearDecay(optimizer, self.num_epochs, self.recipe.warmup_epochs)

    # -- encoder weights --------------------------------------------------------------------------
    def resolve_encoder_weights(self) -> tuple[str | None, str]:
        """(path or None, where it came from). The environment variable wins over the plans entry."""
        from_env = os.environ.get(self.weights_env_var)
        if from_env:
            return from_env, f"environment variable {self.weights_env_var}"
        from_plans = self.configuration_manager.configuration.get(PLANS_KEY, {}).get("encoder_weights")
        if from_plans:
            return from_plans, f"plans configuration {self.configuration_name!r}"
        return None, ""

    def initialize(self):
        super().initialize()
        # lets on_train_start notice weights loaded by nnU-Net's -pretrained_weights
        self._fresh_encoder_marker = self._plain_network().encoder.cls_token.detach().clone()

    def load_encoder_weights(self) -> None:
        encoder = self._plain_network().encoder
        if not torch.equal(encoder.cls_token.detach(), self._fresh_encoder_marker):
            self.print_to_log_file("encoder: keeping the weights loaded by -pretrained_weights")
            return
        path, source = self.resolve_encoder_weights()
        if self.encoder_weights == "none":
            self.print_to_log_file("encoder: random initialisation (trained from scratch)"
                                   + (f"; ignoring {path} from {source}" if path else ""))
            return
        if path is None:
            if self.encoder_weights == "required":
                scratch = self.trainer_names(
                    lambda t: t.encoder_weights == "none" and t.encoder_preset == self.encoder_preset,
                    preferred=f"{type(self).__name__}_scratch") or [
                    f"a from-scratch subclass (encoder_weights = 'none') of {type(self).__name__}"]
                self._refuse(InputError(
                    f"{type(self).__name__} needs encoder weights and none are configured. Download "
                    f"{self.weights_hint} (or export your own with `meddinov3-nnunet export`) and either "
                    f"`export {self.weights_env_var}=/path/to/weights.pth` or run "
                    f"`meddinov3-nnunet plan -d DATASET --weights /path/to/weights.pth`. To train without "
                    f"pretrained weights use {scratch[0]}."))
            self.print_to_log_file("encoder: random initialisation (no weights configured)")
            return
        try:
            checkpoint = with_patch_size(read_checkpoint(path), encoder.patch_size)
            load_into(encoder, checkpoint)
        except SizeMismatchError as err:
            names = self.trainer_names(lambda t: t.encoder_preset == err.checkpoint_preset
                                       and t.encoder_weights != "none")
            self._refuse(SizeMismatchError(
                f"{type(self).__name__} (encoder {self.encoder_preset}, weights from {source}): {err}"
                + (f"; for these weights use {names[0]}" if names else ""), err.checkpoint_preset))
        except CheckpointError as err:
            self._refuse(CheckpointError(f"{type(self).__name__} (encoder {self.encoder_preset}, weights from "
                                         f"{source}): {err}"))
        self.print_to_log_file(f"encoder: loaded {path} (format {checkpoint.format}, from {source}; "
                               f"{len(checkpoint.state_dict)} tensors, {checkpoint.num_parameters:,} parameters)"
                               + ("; patch embedding resampled from patch %d to %d (FlexiViT pseudo-inverse)"
                                  % tuple(checkpoint.meta["resampled_patch_size"])
                                  if "resampled_patch_size" in checkpoint.meta else ""))

    def _refuse(self, error: Exception) -> None:
        """Logs ``error`` as one clear ERROR line (console and training log) before the traceback, then raises it."""
        self.print_to_log_file(f"ERROR: {error}")
        raise error

    @classmethod
    def trainer_names(cls, accept, preferred: str | None = None) -> list[str]:
        """Names of the loaded trainer classes (nnU-Net imports every module of the trainer folder) with the same
        input dimensionality, decoder, image skip and patch size as this one that ``accept``; ``preferred`` first if
        among them, then the shortest names. Only classes nnU-Net can find by that name count (not classes made at
        run time, e.g. by tests)."""
        found, stack = set(), [MedDINOv3Trainer]
        while stack:
            trainer = stack.pop()
            stack.extend(trainer.__subclasses__())
            findable = getattr(sys.modules.get(trainer.__module__), trainer.__name__, None) is trainer
            same_builder = trainer.build_plain_network.__func__ is cls.build_plain_network.__func__
            if findable and accept(trainer) and same_builder \
                    and trainer.decoder == cls.decoder and trainer.multiscale == cls.multiscale \
                    and trainer.encoder_patch_size == cls.encoder_patch_size and trainer.image_skip == cls.image_skip \
                    and trainer.vit_tokens == cls.vit_tokens and trainer.token_injection == cls.token_injection \
                    and trainer.deep_supervision == cls.deep_supervision:
                found.add(trainer.__name__)
        return sorted(found, key=lambda name: (name != preferred, len(name), name))

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:  # not when resuming with --c
            self.load_encoder_weights()
        super().on_train_start()

    # -- training step: configurable clipping; autocast (MEDDINOV3_AMP) happens inside the network -------
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        # MEDDINOV3_CHECK_INPUT=1 refuses non-finite batches. Off by default: nnU-Net's preprocessing gives finite
        # data, and the check costs a device sync per step; turn it on when the loss turns NaN to find the case.
        if os.environ.get("MEDDINOV3_CHECK_INPUT") == "1" and not torch.isfinite(data).all():
            cases = ", ".join(map(str, batch.get("keys", [])))
            self._refuse(InputError(
                f"non-finite values (NaN/inf) in the input batch of case(s) {cases}: one such voxel makes every "
                f"output NaN; check those images and run nnU-Net's preprocessing again"))
        target = batch["target"]  # a list under deep supervision: one target per output
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.network(data), target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.recipe.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.recipe.grad_clip_norm)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}
