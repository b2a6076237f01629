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

from meddinov3_nnunet.models.checkpoints import save_encoder, save_teacher_layout

from . import run_checkpoint


def export_run(path: str | os.PathLike, output_dir: str | os.PathLike | None = None, which: str = "teacher") -> dict:
    """Writes ``encoder.pth`` and ``meddinov3_teacher.pth`` into ``output_dir`` (default: ``<run>/export``)."""
    checkpoint_path = run_checkpoint.resolve(path)
    checkpoint = run_checkpoint.load_run_checkpoint(checkpoint_path)
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_path.parent / "export"
    encoder = run_checkpoint.encoder(checkpoint, which)
    heads = {f"{head}.{k}": v for head, state in run_checkpoint.head_states(checkpoint, which).items()
             for k, v in state.items()}
    config = checkpoint["config"]
    meta = {"source": str(checkpoint_path.resolve()), "weights": which, "step": int(checkpoint["step"]),
            "total_steps": int(config["optim"]["iterations"]), "recipe": str(config["name"]),
            "stage": int(config["stage"]), "corpus_slices": int(checkpoint["corpus"]["slices"]),
            "corpus_volumes": int(checkpoint["corpus"]["volumes"])}
    project = output_dir / "encoder.pth"
    teacher_layout = output_dir / "meddinov3_teacher.pth"
    save_encoder(encoder, project, meta=meta)
    save_teacher_layout(encoder, teacher_layout, heads=heads)
    return {"encoder": str(project), "meddinov3_teacher": str(teacher_layout), **meta}
