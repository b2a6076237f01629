"""Presets given as "a shipped name or a path": the planning presets (``plans/*.json``), the benchmark presets
(``evaluation/presets/*.json``) and the pretraining recipes (``pretraining/configs/*.yaml``) resolve the same way.
Standard library only."""
from __future__ import annotations

import json
import os
from pathlib import Path

from meddinov3_nnunet.errors import InputError


def available(folder: Path, suffixes: tuple[str, ...] = (".json",)) -> list[str]:
    """Names of the files shipped in ``folder``."""
    return sorted(p.stem for p in folder.iterdir() if p.suffix in suffixes)


def resolve(name_or_path: str | os.PathLike, folder: Path, kind: str, suffixes: tuple[str, ...] = (".json",),
            error: type[InputError] = InputError) -> Path:
    """A path (it has one of ``suffixes``, a folder part, or is an existing file) or the name of a file shipped in
    ``folder``; ``error`` (an `InputError`) names the choices when it is neither."""
    text, candidate = str(name_or_path), Path(name_or_path)
    if candidate.suffix in suffixes or os.sep in text or candidate.is_file():
        if not candidate.is_file():
            raise error(f"{kind} file {candidate} does not exist; pass a {suffixes[0]} path or one of "
                        f"{available(folder, suffixes)}")
        return candidate
    shipped = folder / f"{text}{suffixes[0]}"
    if not shipped.is_file():
        raise error(f"unknown {kind} {text!r}; choose one of {available(folder, suffixes)} or give a "
                    f"{suffixes[0]} file")
    return shipped


def load_json(name_or_path: str | os.PathLike, folder: Path, kind: str,
              error: type[InputError] = InputError) -> dict:
    """The JSON object of a shipped preset or of a file; a damaged file is an ``error`` naming it."""
    path = resolve(name_or_path, folder, kind, (".json",), error)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{kind} file {path} is not valid JSON ({err}); fix or replace it") from None
    if not isinstance(value, dict):
        raise error(f"{kind} file {path} must hold a JSON object, not {type(value).__name__}")
    return value
