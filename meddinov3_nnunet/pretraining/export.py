"""From a pretraining run checkpoint to the files downstream code reads.

* ``encoder.pth`` — this project's encoder format (`save_encoder`), what ``MEDDINOV3_WEIGHTS`` /
  ``meddinov3-nnunet plan --weights`` point the nnU-Net trainers at;
* ``meddinov3_teacher.pth`` — MedDINOv3's ``{'teacher': {backbone.*, dino_head.*, ibot_head.*}}`` layout
  (official DINOv3 key names), readable by the MedDINOv3/DINOv3 code and by ``--init`` of a next stage.

The teacher (EMA) is exported by default, as DINO-family models are evaluated and released from the teacher.
"""
from __future__ import annotations

import os
from pathlib import Path

from meddinov3_nnunet.models.checkpoints import CheckpointError, save_encoder, save_teacher_layout
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.presets import EncoderArch

from .model import _internal_to_official
from .train import CHECKPOINT_NAME, load_run_checkpoint


def resolve_run_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no {CHECKPOINT_NAME} in this folder; pass a pretraining run folder or one "
                                  f"of its checkpoint_*.pth files")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def encoder_from_run(checkpoint: dict, which: str = "teacher") -> DINOv3Encoder:
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    arch = EncoderArch.from_dict(checkpoint["arch"])
    encoder = DINOv3Encoder(arch)
    state = {k[len("backbone."):]: v for k, v in checkpoint[which].items() if k.startswith("backbone.")}
    encoder.load_state_dict(state, strict=True)
    return encoder


def heads_from_run(checkpoint: dict, which: str = "teacher") -> dict:
    """``dino_head.*`` / ``ibot_head.*`` in DINOv3's key names."""
    out = {}
    for head in ("dino_head", "ibot_head"):
        state = {k[len(head) + 1:]: v for k, v in checkpoint[which].items() if k.startswith(head + ".")}
        out.update({f"{head}.{k}": v for k, v in _internal_to_official(state).items()})
    return out


def export_run(path: str | os.PathLike, output_dir: str | os.PathLike | None = None, which: str = "teacher") -> dict:
    """Writes ``encoder.pth`` and ``meddinov3_teacher.pth`` into ``output_dir`` (default: ``<run>/export``)."""
    checkpoint_path = resolve_run_checkpoint(path)
    checkpoint = load_run_checkpoint(checkpoint_path)
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_path.parent / "export"
    encoder = encoder_from_run(checkpoint, which)
    config = checkpoint["config"]
    meta = {"source": str(checkpoint_path.resolve()), "weights": which, "step": int(checkpoint["step"]),
            "total_steps": int(config["optim"]["iterations"]), "recipe": str(config["name"]),
            "stage": int(config["stage"]), "corpus_slices": int(checkpoint["corpus"]["slices"]),
            "corpus_volumes": int(checkpoint["corpus"]["volumes"])}
    project = output_dir / "encoder.pth"
    teacher_layout = output_dir / "meddinov3_teacher.pth"
    save_encoder(encoder, project, meta=meta)
    save_teacher_layout(encoder, teacher_layout, heads=heads_from_run(checkpoint, which))
    return {"encoder": str(project), "meddinov3_teacher": str(teacher_layout), **meta}
