"""Shared test fixtures. Data and reference files are read from ../shared beside the repository root,
or from the folder named by MEDDINOV3_SHARED."""
import os
import sys
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# the helper modules beside this file (nnunet_workspace, fake_nnunet, pretraining_helpers, process_helpers) serve
# every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = Path(os.environ.get("MEDDINOV3_SHARED", REPO_ROOT.parent / "shared"))

warnings.filterwarnings("ignore", message=".*torch.jit.interface.*")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder {SHARED} not found: put ../shared beside the repository or set "
                    f"MEDDINOV3_SHARED")
    return SHARED
