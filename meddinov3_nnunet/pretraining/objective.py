"""The stage objective: DINO (CLS) + iBOT (masked patches) + KoLeo (+ Gram anchoring in stages 2-3), combined
with DINOv3's weights (``ssl_meta_arch.py``), optionally + masked-pixel reconstruction (``mim``, SimMIM/MAE). One
`nn.Module` owns every weight and temperature of the sum; the loss functions themselves are in `losses.py`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import encoder_arch
from .losses import (GramLoss, dino_cross_entropy, ibot_masked_cross_entropy, koleo_loss, masked_pixel_loss,
                     sinkhorn_knopp)


class PretrainingObjective(nn.Module):
    """``forward(student, teacher, masks, mask_indices, teacher_temp, gram_targets, images)`` -> (total, parts).

    ``student`` / ``teacher`` are the outputs of `Branch.forward` / `Branch.teacher_forward`; the teacher's
    logits become targets by Sinkhorn-Knopp at ``teacher_temp``. ``parts`` holds every term as a detached 0-d
    tensor on the device (the loop reads them once per log interval). With ``mim.enabled`` ``images`` (the
    (2B, 1, H, W) global crops) give the pixel targets of the student's ``masked_pixel_pred``."""

    def __init__(self, config, gram_enabled: bool):
        super().__init__()
        dino = config.dino
        self.dino_weight = dino.loss_weight
        self.local_weight = dino.local_loss_weight  # DINOv3's reweight_dino_local_loss
        self.koleo_weight = dino.koleo_loss_weight
        self.ibot_weight = config.ibot.loss_weight
        self.gram_weight = config.gram.loss_weight if gram_enabled else 0.0
        self.student_temp = dino.student_temp
        self.sinkhorn_iterations = dino.sinkhorn_iterations
        self.ignore_diagonal = dino.global_ignore_diagonal
        self.gram = GramLoss(config.gram.remove_negatives) if gram_enabled else None
        self.mim = config.mim if config.mim.enabled else None
        self.patch_size = encoder_arch(config).patch_size

    def teacher_targets(self, teacher: dict, teacher_temp: float, n_images: int, n_masked: int) -> tuple:
        """Sinkhorn-Knopp probabilities: CLS (2, B, K) and masked patches (M, K_ibot)."""
        cls = sinkhorn_knopp(teacher["global_cls_logits"], teacher_temp, self.sinkhorn_iterations)
        patches = sinkhorn_knopp(teacher["masked_patch_logits"], teacher_temp, self.sinkhorn_iterations,
                                 n_samples=n_masked)
        return cls.unflatten(0, (2, n_images)), patches

    def forward(self, student: dict, teacher: dict, masks: torch.Tensor, mask_indices: torch.Tensor,
                teacher_temp: float, gram_targets: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        n_global = 2
        n_images = student["global_cls_logits"].shape[0] // n_global
        teacher_cls, teacher_patches = self.teacher_targets(teacher, teacher_temp, n_images, mask_indices.numel())
        local_logits = student["local_cls_logits"].unflatten(0, (-1, n_images))
        global_logits = student["global_cls_logits"].unflatten(0, (n_global, n_images))
        n_local = local_logits.shape[0]
        global_terms = n_global * (n_global - 1) if self.ignore_diagonal else n_global ** 2
        local_terms = n_global * n_local
        dino_local = dino_cross_entropy(local_logits, teacher_cls, self.student_temp)
        dino_global = dino_cross_entropy(global_logits, teacher_cls, self.student_temp,
                                         ignore_diagonal=self.ignore_diagonal)
        # DINOv3's weighting: each part scaled by its share of (student, teacher) crop pairs
        dino = (dino_local * local_terms * self.local_weight + dino_global * global_terms) / (
            global_terms + local_terms)
        koleo = sum(koleo_loss(cls) for cls in student["global_cls"].unflatten(0, (n_global, n_images))) / n_global
        ibot = ibot_masked_cross_entropy(student["masked_patch_logits"], teacher_patches, masks, self.student_temp,
                                         mask_indices)
        total = self.dino_weight * dino + self.koleo_weight * n_global * koleo + self.ibot_weight * ibot
        parts = {"dino": dino, "dino_global": dino_global, "dino_local": dino_local, "ibot": ibot, "koleo": koleo}
        if gram_targets is not None:
            gram = self.gram(student["global_patches"], gram_targets)
            total = total + self.gram_weight * gram
            parts["gram"] = gram
        if self.mim is not None:
            if images is None or "masked_pixel_pred" not in student:
                raise ValueError("mim.enabled needs the student's masked_pixel_pred (a branch with a pixel_head) "
                                 "and the global crops as images")
            mim = masked_pixel_loss(student["masked_pixel_pred"], images, mask_indices, self.patch_size,
                                    self.mim.norm_pixels, self.mim.loss)
            total = total + self.mim.loss_weight * mim
            parts["mim"] = mim
        parts["total"] = total
        return total, {k: v.detach().float() for k, v in parts.items()}  # tensors: reading them waits for the device


def to_student_grid(features: torch.Tensor, student_side: int, gram_config) -> torch.Tensor:
    """Gram-teacher patch tokens (B, Ng, D) resized onto the student's ``student_side`` x ``student_side`` grid
    (B, N, D) with ``gram.resize_mode``, as DINOv3 resizes its Gram teacher's output."""
    teacher_side = int(math.isqrt(features.shape[1]))
    if teacher_side == student_side:
        return features
    grid = features.transpose(1, 2).unflatten(-1, (teacher_side, teacher_side)).float()
    kwargs = {}
    if gram_config.resize_mode in ("bicubic", "bilinear"):
        kwargs = {"align_corners": False, "antialias": gram_config.resize_antialias}
    grid = F.interpolate(grid, size=(student_side, student_side), mode=gram_config.resize_mode, **kwargs)
    return grid.flatten(-2).transpose(1, 2)
