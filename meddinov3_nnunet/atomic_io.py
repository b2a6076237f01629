"""Atomic file writes: a temporary file in the target's folder, then a rename. Readers see the old file or the
new one, never half of one; a failed write leaves the old file and no temporary behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` to write to; on success it replaces ``path`` (with the permissions
    a plain ``open()`` would give, not mkstemp's 0600), on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, newline="")


def print_and_write(text: str, path: str | os.PathLike | None) -> None:
    """Prints ``text`` (a report) and, when ``path`` is given, also writes it there atomically."""
    print(text)
    if path:
        write_text_atomic(path, text)


def save_figure_atomic(figure, path: str | os.PathLike, dpi: int) -> None:
    """A matplotlib figure as PNG (format given explicitly: the temporary name does not end in .png)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
