"""The self-distillation networks: projection heads, student/teacher branches, the masked forward, the optimiser's
parameter groups, and initialisation from earlier checkpoints.

A *branch* is DINOv3's ``{backbone, dino_head, ibot_head}`` (+ ``pixel_head`` with ``mim.enabled``); the student
is trained, the teacher is its EMA, and the Gram teacher (stages 2-3) is a frozen backbone only.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from torch import nn

from meddinov3_nnunet.models.checkpoints import (CheckpointError, EncoderCheckpoint, checkpoint_from_object,
                                                 describe_arch, isclose_arch, load_into, load_torch_file, strip_prefix)
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import EncoderArch

from . import run_checkpoint
from .config import encoder_arch

log = logging.getLogger(__name__)


class DINOHead(ProjectionHead):
    """DINOv3's projection head: MLP (Linear-GELU x (layers-1), Linear to the bottleneck), L2 normalisation,
    then a bias-free linear layer to the prototypes.

    Built on lightly's `ProjectionHead` (same Linear/GELU stack, ``layers.0/2/4``). lightly's
    `DINOProjectionHead` is not used because its last layer is weight-normalised (``weight_g``/``weight_v``);
    DINOv3 trains a plain ``last_layer`` (``head_norm_last_layer: false``, ``force_weight_norm: false``), which
    also keeps the exported ``last_layer.weight`` in DINOv3's key layout.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        if layers == 1:
            blocks = [(in_dim, bottleneck_dim, None, None)]
        else:
            blocks = [(in_dim, hidden_dim, None, nn.GELU())]
            blocks += [(hidden_dim, hidden_dim, None, nn.GELU()) for _ in range(layers - 2)]
            blocks += [(hidden_dim, bottleneck_dim, None, None)]
        super().__init__(blocks)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:  # DINOv3 DINOHead.init_weights
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under DINOv3's ``DINOHead`` names: ``mlp.{0,2,4}.*`` (``mlp.*`` for one layer), ``last_layer.weight``."""
        return run_checkpoint.official_head_names({k: v.detach().cpu().clone() for k, v in self.state_dict().items()})

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        single = len(self.layers) == 1
        mapped = {}
        for key, value in state.items():
            if key.startswith("mlp."):
                key = "layers.0." + key[len("mlp."):] if single else "layers." + key[len("mlp."):]
            mapped[key] = value
        self.load_state_dict(mapped, strict=True)


class Branch(nn.Module):
    """Backbone + DINO head (CLS) + iBOT head (masked patch tokens) + optionally a pixel head (``mim``: one
    linear layer from a masked patch token to its p x p grey pixels, SimMIM's head). Images are (B, 1, H, W) grey
    slices; the grey channel is copied to the encoder's RGB stem, as the fine-tuning network does. The teacher is
    a deep copy (the EMA update pairs parameters), so it carries an unused pixel head too."""

    def __init__(self, backbone: DINOv3Encoder, dino_head: DINOHead, ibot_head: DINOHead,
                 pixel_head: nn.Linear | None = None):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.pixel_head = pixel_head  # None: no parameters, the state dict as without mim

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, self.backbone.arch.in_chans, -1, -1) if images.shape[1] == 1 else images

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                mask_indices: torch.Tensor) -> dict:
        """The student pass: global crops with iBOT masks, local crops plain; both CLS sets through the DINO
        head in one call, the masked patch tokens through the iBOT head."""
        global_out = self.backbone.forward_features(self._stem(global_crops), masks=masks)
        local_out = self.backbone.forward_features(self._stem(local_crops))
        patches = global_out["x_norm_patchtokens"]
        masked_tokens = patches.flatten(0, 1).index_select(0, mask_indices)
        cls = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
        cls_logits = self.dino_head(cls)
        n_global = global_crops.shape[0]
        out = {
            "global_cls": global_out["x_norm_clstoken"],  # (2B, D), for KoLeo
            "global_patches": patches,  # (2B, N, D), for the Gram loss
            "global_cls_logits": cls_logits[:n_global],
            "local_cls_logits": cls_logits[n_global:],
            "masked_patch_logits": self.ibot_head(masked_tokens),  # (M, K_ibot)
        }
        if self.pixel_head is not None:
            out["masked_pixel_pred"] = self.pixel_head(masked_tokens)  # (M, p * p), for the mim loss
        return out

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor, mask_indices: torch.Tensor) -> dict:
        """The teacher pass: unmasked global crops; logits of CLS and of the tokens the student sees masked."""
        out = self.backbone.forward_features(self._stem(global_crops))
        patches = out["x_norm_patchtokens"]
        return {
            "global_cls_logits": self.dino_head(out["x_norm_clstoken"]),
            "masked_patch_logits": self.ibot_head(patches.flatten(0, 1).index_select(0, mask_indices)),
            "global_patches": patches,
        }


def build_branch(config) -> Branch:
    arch = encoder_arch(config)
    backbone = DINOv3Encoder(arch, drop_path_rate=config.model.drop_path_rate,
                             drop_path_mode=config.model.drop_path_mode)
    if config.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)

    def head(cfg):
        return DINOHead(arch.embed_dim, cfg.head_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)

    dino_head, ibot_head = head(config.dino), head(config.ibot)
    pixel_head = None
    if config.mim.enabled:  # SimMIM: a linear head suffices; one grey channel of targets. Drawn last, so that the
        pixel_head = nn.Linear(arch.embed_dim, arch.patch_size ** 2)  # other weights equal a run without mim
        DINOHead._init_weights(pixel_head)
    return Branch(backbone, dino_head, ibot_head, pixel_head)


# ---------------------------------------------------------------------------------------------
# optimiser parameter groups (DINOv3 train/param_groups.py)
# ---------------------------------------------------------------------------------------------
def _layer_id(name: str, depth: int) -> int:
    if name.startswith(("patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def trained_modules(branch: Branch) -> tuple[str, ...]:
    """The branch's trained modules by name; the optimiser groups and the per-module gradient clipping use them."""
    return ("backbone", "dino_head", "ibot_head") + (("pixel_head",) if branch.pixel_head is not None else ())


def param_groups(branch: Branch, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with DINOv3's multipliers: lr x ``layerwise_decay ** (depth + 1 - layer)`` in the backbone
    (patch embedding and prefix tokens are layer 0), x ``patch_embed_lr_mult`` for the patch embedding; no
    weight decay on biases, norms and LayerScale; heads (the pixel head too) at the full lr; ``last_layer`` flagged
    for the frozen-last-layer schedule. Parameters with equal multipliers share one group."""
    depth = branch.backbone.arch.depth
    fused: dict[tuple, dict] = {}
    for module_name in trained_modules(branch):
        module = getattr(branch, module_name)
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = layerwise_decay ** (depth + 1 - _layer_id(name, depth)) if module_name == "backbone" else 1.0
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            wd_mult = 0.0 if (name.endswith("bias") or "norm" in name or "gamma" in name) else 1.0
            is_last = "last_layer" in name
            key = (lr_mult, wd_mult, is_last)
            group = fused.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                                           "is_last_layer": is_last})
            group["params"].append(param)
    return list(fused.values())


# ---------------------------------------------------------------------------------------------
# starting points: --init and the Gram teacher
# ---------------------------------------------------------------------------------------------
@dataclass
class StartingPoint:
    """Weights read for ``--init`` or ``--gram-teacher``: an encoder plus, when the file has them, heads."""

    checkpoint: EncoderCheckpoint
    dino_head: dict[str, torch.Tensor] | None = None  # DINOv3 names (mlp.*, last_layer.weight)
    ibot_head: dict[str, torch.Tensor] | None = None


def read_starting_point(path: str) -> StartingPoint:
    """Reads a pretraining run checkpoint (its *teacher*), a MedDINOv3 teacher file (backbone + heads), or any
    encoder file `read_checkpoint` understands (backbone only)."""
    path = str(path)
    obj = load_torch_file(path)  # read once, whatever the format
    if run_checkpoint.is_run_checkpoint(obj):
        obj = run_checkpoint.checked(obj, path)
        checkpoint = EncoderCheckpoint(path=path, format="meddinov3_nnunet_run", arch=run_checkpoint.arch(obj),
                                       state_dict=run_checkpoint.backbone_state(obj), meta={"step": obj.get("step")})
        return StartingPoint(checkpoint, **run_checkpoint.head_states(obj))
    checkpoint = checkpoint_from_object(obj, path)
    point = StartingPoint(checkpoint)
    if checkpoint.format == "meddinov3_teacher":
        for head in run_checkpoint.HEADS:
            setattr(point, head, strip_prefix(obj["teacher"], head) or None)
    return point


def check_fits(point: StartingPoint, arch: EncoderArch, what: str, fix: str) -> None:
    """Raises one clear `CheckpointError` when the checkpoint's encoder has another shape than ``arch``."""
    if not isclose_arch(point.checkpoint.arch, arch):
        raise CheckpointError(
            f"{point.checkpoint.path} (detected format: {point.checkpoint.format}) cannot be used as {what}: it "
            f"holds a different encoder ({describe_arch(point.checkpoint.arch)}) than the config's model.arch "
            f"({describe_arch(arch)}). {fix}")


def initialise_branch(branch: Branch, point: StartingPoint, with_heads: bool) -> list[str]:
    """Loads ``point`` into ``branch`` (strict for the backbone; heads when present and wanted). Returns notes."""
    load_into(branch.backbone, point.checkpoint)
    notes = [f"backbone from {point.checkpoint.path} ({point.checkpoint.format})"]
    if branch.pixel_head is not None:
        notes.append("pixel_head: random (--init carries the DINO and iBOT heads only)")
    if not with_heads:
        return notes + ["heads: random (model.init_heads=false)"]
    for name in ("dino_head", "ibot_head"):
        state = getattr(point, name)
        if not state:
            notes.append(f"{name}: random (not in the checkpoint)")
            continue
        head: DINOHead = getattr(branch, name)
        expected = head.official_state_dict()
        wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                       for k, v in expected.items() if k in state and state[k].shape != v.shape)
        missing = sorted(set(expected) - set(state))
        if wrong or missing:
            raise CheckpointError(
                f"{point.checkpoint.path}: its {name} does not fit the config's head "
                f"({'; '.join(wrong + [f'missing {k}' for k in missing])[:400]}). Set the config's head sizes to the "
                f"checkpoint's, or start the heads from random with --set model.init_heads=false.")
        head.load_official_state_dict({k: state[k] for k in expected})
        notes.append(f"{name}: from the checkpoint")
    return notes
