"""MEDDINOV3_SEED: the budget mixin seeds torch / numpy / random and nnU-Net's augmentation workers (nnU-Net 2.8.1
passes seeds=None to them), and leaves everything unseeded without it."""
import random

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.trainers.budget import nnUNetTrainer_budget


def bare_trainer():
    trainer = nnUNetTrainer_budget.__new__(nnUNetTrainer_budget)  # no plans needed for the seeding parts
    trainer.local_rank = 0
    return trainer


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_seed_makes_every_generator_repeat(monkeypatch):
    monkeypatch.setenv("MEDDINOV3_SEED", "5")
    note = bare_trainer().apply_seed()
    first = draws()
    bare_trainer().apply_seed()
    assert draws() == first
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert draws() == first and note.startswith("seed 5: torch, numpy and random seeded")


def test_other_seed_or_rank_draws_differently(monkeypatch):
    monkeypatch.setenv("MEDDINOV3_SEED", "5")
    bare_trainer().apply_seed()
    first = draws()
    ranked = bare_trainer()
    ranked.local_rank = 1
    assert ranked.apply_seed().startswith("seed 6")
    assert draws() != first


def test_augmentation_workers_get_seeds(monkeypatch):
    created = []

    def fake_get_dataloaders(self):  # what nnU-Net does: seeds=None, several worker processes
        created.append(trainer_module.NonDetMultiThreadedAugmenter(object(), None, num_processes=2, seeds=None))
        created.append(trainer_module.NonDetMultiThreadedAugmenter(object(), None, num_processes=1, seeds=None))
        return created

    monkeypatch.setattr(nnUNetTrainer, "get_dataloaders", fake_get_dataloaders)
    monkeypatch.setenv("MEDDINOV3_SEED", "3")
    trainer = bare_trainer()
    trainer.apply_seed()
    train, val = trainer.get_dataloaders()
    assert (train.seeds, val.seeds) == ([3100, 3101], [3200])
    assert trainer_module.NonDetMultiThreadedAugmenter.__name__ == "NonDetMultiThreadedAugmenter"  # restored

    monkeypatch.delenv("MEDDINOV3_SEED")
    created.clear()
    unseeded = bare_trainer()
    assert unseeded.apply_seed().startswith("seed: not set")
    assert [a.seeds for a in unseeded.get_dataloaders()] == [[None, None], [None]]


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_a_bad_seed_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("MEDDINOV3_SEED", value)
    with pytest.raises(InputError, match="MEDDINOV3_SEED=.*non-negative integer seed"):
        bare_trainer().apply_seed()
