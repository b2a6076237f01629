"""The MedDINOv3 fine-tuning recipe, independent of nnU-Net: optimiser groups and learning-rate schedule.

Reference values (MedDINOv3's nnU-Net trainers): AdamW, betas (0.9, 0.98), weight decay 0.05 on every
parameter, decoder lr 3e-4, encoder lr 3e-5 (1e-4 for natural-image DINOv3 weights), linear decay to zero
over the epochs, no warm-up by default, encoder drop path 0.2, nnU-Net's gradient clipping at norm 12.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.network import MedDINOv3Net


@dataclass(frozen=True)
class FinetuneRecipe:
    decoder_lr: float = 3e-4
    encoder_lr: float = 3e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_epochs: int = 0
    grad_clip_norm: float = 12.0


def build_optimizer(network: MedDINOv3Net, recipe: FinetuneRecipe) -> torch.optim.AdamW:
    """AdamW with two groups: ``decoder`` (decoder + channel adapter) and ``encoder``. Frozen parameters (the
    encoder's mask token) stay in their group: AdamW skips parameters without a gradient (no update, no weight
    decay), and the groups keep the layout of optimizer states saved before they were frozen (``--c``)."""
    groups = [
        {"params": network.decoder_parameters(), "lr": recipe.decoder_lr, "name": "decoder"},
        {"params": list(network.encoder_parameters()), "lr": recipe.encoder_lr, "name": "encoder"},
    ]
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, betas=recipe.betas, weight_decay=recipe.weight_decay)


class WarmupLinearDecay:
    """Per-epoch schedule: linear warm-up from 0 over ``warmup_epochs``, then linear decay to 0 at
    ``num_epochs``; each parameter group scaled from its own ``initial_lr``.

    Stateless in the epoch (``step(epoch)`` sets the lrs for that epoch), so resuming an nnU-Net run with
    ``--c`` restores the schedule from the epoch counter alone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, warmup_epochs: int = 0):
        if num_epochs < 1 or not 0 <= warmup_epochs < num_epochs:
            raise ValueError(f"need num_epochs >= 1 and 0 <= warmup_epochs < num_epochs, got {num_epochs}, "
                             f"{warmup_epochs}")
        self.optimizer, self.num_epochs, self.warmup_epochs = optimizer, num_epochs, warmup_epochs
        self.last_epoch = -1

    def factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / (self.num_epochs - self.warmup_epochs)
        return max(0.0, 1.0 - progress)

    def step(self, epoch: int | None = None) -> None:
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        scale = self.factor(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
