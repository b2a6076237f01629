"""The project's error contract: every error a user can cause or fix derives from `UserError`.

`meddinov3-nnunet` prints such an error as one `error: ...` line and exits with its `exit_code`; anything else
is a bug and keeps its traceback. Exit codes: 2 bad input (files, data, arguments, configuration), 3 a training
run that diverged (non-finite loss). Standard library only, so every layer can import it.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message names the file or value at fault and the fix."""

    exit_code = 2


class InputError(UserError, ValueError):
    """Bad input: a file, a dataset, an argument or a configuration value (exit code 2).

    Also a `ValueError`, so callers of the Python API that catch `ValueError` keep working."""


class DivergedError(UserError, RuntimeError):
    """A training run whose loss became non-finite (exit code 3)."""

    exit_code = 3
