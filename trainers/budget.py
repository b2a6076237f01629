"""Training budgets: class attributes, overridable per run by environment variables (and logged).

``MEDDINOV3_NUM_EPOCHS``, ``MEDDINOV3_ITERS_PER_EPOCH``, ``MEDDINOV3_VAL_ITERS``, ``MEDDINOV3_BATCH_SIZE`` let a
benchmark give every row, stock nnU-Net included (`nnUNetTrainer_budget`), the same budget. ``MEDDINOV3_SEED``
seeds torch, numpy and random before the network is built (nnU-Net 2.8.1 seeds nothing: only its split is
fixed), so a benchmark can repeat a row with several seeds.
"""
from __future__ import annotations

import random
from unittest import mock

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from meddinov3_nnunet.nnunet.budget import BATCH_SIZE, ITERS_PER_EPOCH, NUM_EPOCHS, VAL_ITERS, env_int, env_seed


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
        notes = notes + [self.apply_seed()]
        for note in notes + [f"budget: {self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations "
                             f"(+{self.num_val_iterations_per_epoch} validation batches per epoch)"]:
            self.print_to_log_file(note)

    def apply_seed(self) -> str:
        """Seeds torch (CPU and CUDA), numpy and random from ``MEDDINOV3_SEED`` (+ the DDP rank, so ranks draw
        different batches; DDP copies rank 0's initial weights). Called from ``__init__``, i.e. before nnU-Net
        builds the network in ``initialize``. Returns a log line."""
        seed = env_seed()
        if seed is None:
            return "seed: not set (nnU-Net default: unseeded data augmentation)"
        seed += int(getattr(self, "local_rank", 0) or 0)
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        self._worker_seed = seed
        return (f"seed {seed}: torch, numpy and random seeded, and nnU-Net's augmentation workers (seed "
                f"{seed} x 1000 + worker); with several workers their batch order still varies")

    def get_dataloaders(self):
        """nnU-Net's loaders; with a seed, its `NonDetMultiThreadedAugmenter` workers get seeds too (nnU-Net
        passes ``seeds=None``, so each worker would draw from the OS entropy)."""
        seed = getattr(self, "_worker_seed", None)
        if seed is None:
            return super().get_dataloaders()
        counter = iter(range(1, 1000))

        class SeededAugmenter(trainer_module.NonDetMultiThreadedAugmenter):
            def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs):
                first = seed * 1000 + next(counter) * 100
                super().__init__(data_loader, transform, num_processes, *args,
                                 seeds=seeds or [first + i for i in range(num_processes)], **kwargs)

        with mock.patch.object(trainer_module, "NonDetMultiThreadedAugmenter", SeededAugmenter):
            return super().get_dataloaders()


class nnUNetTrainer_budget(EnvironmentBudget, nnUNetTrainer):
    """Stock nnUNetTrainer (architecture, loss, optimiser, schedule unchanged) with the budget above."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        notes = self.budget_plans(plans, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_budget(notes)
