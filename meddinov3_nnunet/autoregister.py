"""Zero-config trainer discovery: the one-line start-up file (`.pth`) that pip installs beside the package.

Python runs every `import ...` line of a site-packages `.pth` file at start-up. Ours appends the trainer folder
(`meddinov3_nnunet/nnunet_ext`) to `nnUNet_extTrainer`, nnU-Net's hook for external trainers, so that
`nnUNetv2_train ... -tr MedDINOv3Trainer` works without an `export`. Rules: entries the user set stay first;
`MEDDINOV3_NO_AUTOREGISTER=1` turns it off; the line imports only `os`/`sys` (never torch, never this package)
and marks what it did in `MEDDINOV3_AUTOREGISTERED`, which `doctor` reads. pip lists the file in the install
record, so `pip uninstall` removes it.

setup.py writes the file (this module is loaded there by path, so it must stay stdlib-only): a wheel gets a
line that finds the folder on `sys.path` (the package lies in the same site-packages); an editable install
gets the source tree's folder, fixed at build time.
"""
from __future__ import annotations

import os

PTH_NAME = "meddinov3_nnunet-autoregister.pth"
OPT_OUT = "MEDDINOV3_NO_AUTOREGISTER"
MARKER = "MEDDINOV3_AUTOREGISTERED"

# Run by the .pth line in a fresh namespace whose TRAINER_DIR is the editable folder, or None for a wheel.
STARTUP_SOURCE = """
def _register(trainer_dir):
    import os, sys
    if os.environ.get("MEDDINOV3_NO_AUTOREGISTER", "").strip() not in ("", "0"):
        return
    if trainer_dir is None:
        candidates = (os.path.join(p, "meddinov3_nnunet", "nnunet_ext") for p in sys.path if p)
        trainer_dir = next((c for c in candidates if os.path.isdir(c)), None)
    if trainer_dir is None or not os.path.isdir(trainer_dir):
        return
    entries = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if os.path.normpath(trainer_dir) in {os.path.normpath(p) for p in entries}:
        return
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(entries + [trainer_dir])
    os.environ["MEDDINOV3_AUTOREGISTERED"] = trainer_dir
_register(TRAINER_DIR)
"""


def pth_line(trainer_dir: str | None = None) -> str:
    """The `.pth` file's content: one `import` line (only such lines are executed), newline-terminated."""
    return f"import os; exec({STARTUP_SOURCE!r}, {{'TRAINER_DIR': {trainer_dir!r}}})\n"


def discovery_source(ext_dir: str, environ: os._Environ | dict | None = None) -> str:
    """How `nnUNet_extTrainer` came to hold (or not) the trainer folder: 'auto', 'user', 'off' or 'missing'."""
    environ = os.environ if environ is None else environ
    entries = [os.path.realpath(p) for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if os.path.realpath(ext_dir) in entries:
        marker = environ.get(MARKER)
        return "auto" if marker and os.path.realpath(marker) == os.path.realpath(ext_dir) else "user"
    return "off" if environ.get(OPT_OUT, "").strip() not in ("", "0") else "missing"
