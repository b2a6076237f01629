"""ViT-aware planning presets (JSON data read by `meddinov3_nnunet.nnunet.planning`)."""
from pathlib import Path

from meddinov3_nnunet.named_files import available, load_json

PRESET_DIR = Path(__file__).resolve().parent


def available_presets() -> list[str]:
    return available(PRESET_DIR)


def load_preset(name_or_path: str) -> dict:
    """A shipped planning preset by name, or a preset .json file."""
    return load_json(name_or_path, PRESET_DIR, "planning preset")
