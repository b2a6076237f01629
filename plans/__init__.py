"""ViT-aware planning presets (JSON data read by `meddinov3_nnunet.nnunet.planning`)."""
import json
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown planning preset {name!r}; choose one of {available_presets()}")
    return json.loads(path.read_text())
