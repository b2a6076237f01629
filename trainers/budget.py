"""Training budgets: class attributes, overridable per run by environment variables (and logged).

``MEDDINOV3_NUM_EPOCHS``, ``MEDDINOV3_ITERS_PER_EPOCH``, ``MEDDINOV3_VAL_ITERS``, ``MEDDINOV3_BATCH_SIZE`` let a
benchmark give every row, stock nnU-Net included (`nnUNetTrainer_budget`), the same budget.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from meddinov3_nnunet.nnunet.budget import BATCH_SIZE, ITERS_PER_EPOCH, NUM_EPOCHS, VAL_ITERS, env_int


class EnvironmentBudget:
    """Mixin for nnU-Net trainers: epochs, iterations, validation batches, batch size and checkpoint interval."""

    epochs = 1000  # nnU-Net's defaults
    iterations_per_epoch = 250
    val_iterations_per_epoch = 50
    batch_size_override = None  # None: the plans' batch size
    checkpoint_every = 50  # epochs between checkpoint_latest.pth saves

    @classmethod
    def budget_plans(cls, plans: dict, configuration: str) -> list[str]:
        """Writes the batch size into the plans (before nnU-Net reads them, so DDP splits it); returns log lines."""
        batch_size = env_int(BATCH_SIZE, cls.batch_size_override)
        planned = PlansManager(plans).get_configuration(configuration).batch_size
        if batch_size is None or batch_size == planned:
            return []
        plans["configurations"][configuration]["batch_size"] = batch_size
        return [f"batch size {planned} -> {batch_size}"]

    def apply_budget(self, notes: list[str]) -> None:
        self.num_epochs = env_int(NUM_EPOCHS, self.epochs)
        self.num_iterations_per_epoch = env_int(ITERS_PER_EPOCH, self.iterations_per_epoch)
        self.num_val_iterations_per_epoch = env_int(VAL_ITERS, self.val_iterations_per_epoch)
        self.save_every = self.checkpoint_every
        for note in notes + [f"budget: {self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations "
                             f"(+{self.num_val_iterations_per_epoch} validation batches per epoch)"]:
            self.print_to_log_file(note)


class nnUNetTrainer_budget(EnvironmentBudget, nnUNetTrainer):
    """Stock nnUNetTrainer (architecture, loss, optimiser, schedule unchanged) with the budget above."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        notes = self.budget_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_budget(notes)
