"""The training-budget environment variables: read by the trainers (``trainers/budget.py``), set per row by
``meddinov3-nnunet benchmark`` and by the demo. Standard library only, so both sides import it cheaply."""
from __future__ import annotations

import os

from meddinov3_nnunet.errors import InputError

NUM_EPOCHS = "MEDDINOV3_NUM_EPOCHS"
ITERS_PER_EPOCH = "MEDDINOV3_ITERS_PER_EPOCH"
VAL_ITERS = "MEDDINOV3_VAL_ITERS"  # validation batches per epoch
BATCH_SIZE = "MEDDINOV3_BATCH_SIZE"
SEED = "MEDDINOV3_SEED"  # seeds torch / numpy / random in the trainer (nnU-Net 2.8.1 itself seeds nothing)
BUDGET_VARIABLES = (NUM_EPOCHS, ITERS_PER_EPOCH, VAL_ITERS, BATCH_SIZE, SEED)


def env_int(name: str, default):
    """A positive integer from the environment variable ``name``; ``default`` when it is unset or empty."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"environment variable {name}={value!r} must be a positive integer; set it to e.g. 10 "
                         f"or unset it")
    return int(value)


def env_seed(name: str = SEED) -> int | None:
    """A non-negative integer seed from the environment variable ``name``; None when it is unset or empty."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    if not value.isdigit():
        raise InputError(f"environment variable {name}={value!r} must be a non-negative integer seed; set it to "
                         f"e.g. 0 or unset it")
    return int(value)
