"""nnU-Net's own 3D ViT (Primus-S, trained from scratch) under the benchmark budget, as the comparison row of
the 3D MedDINOv3 trainers."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer

from .budget import EnvironmentBudget


class nnUNet_Primus_S_Trainer_budget(EnvironmentBudget, nnUNet_Primus_S_Trainer):
    """Stock `nnUNet_Primus_S_Trainer` with the `MEDDINOV3_*` budget. Its whole-network warm-up (50 of nnU-Net's
    1000 epochs) is scaled to the same 5 % of the budget's epochs (at least 1), so that a short run also trains
    after the warm-up instead of spending every epoch in it."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        notes = self.budget_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_budget(notes)
        self.warmup_duration_whole_net = max(1, round(self.num_epochs * 50 / 1000))
        self.print_to_log_file(f"Primus warm-up: {self.warmup_duration_whole_net} epoch(s)")
