"""Key numbers of a pretraining run folder as JSON: throughput, wall time, and losses at the start and the end
(means over the first / last 100 steps, so single noisy steps do not decide), next to the losses of a uniform
prediction, computed from the run's own recipe (``config.yaml``): DINO ln K (K = ``dino.head_prototypes``), iBOT
f ln K (K = ``ibot.head_prototypes``; f, the fraction of global crops that carry masks, because DINOv3 averages
the masked-token loss over every image).

    python benchmarks/pretraining/summarise_run.py RUN_DIR > run_summary.json
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

from meddinov3_nnunet.pretraining.config import load_config

KEYS = ("total", "dino", "dino_global", "dino_local", "ibot", "koleo")
OPTIONAL_KEYS = ("gram", "mim")  # only in runs with Gram anchoring / the masked-pixel objective


def uniform_prediction_losses(config) -> dict:
    """DINO and iBOT losses of a student that predicts the uniform distribution over the prototypes."""
    global_crops = 2 * config.optim.batch_size  # one rank's view: a multi-rank run differs only by int rounding
    masked_fraction = int(global_crops * config.ibot.mask_sample_probability) / global_crops
    return {"dino": round(math.log(config.dino.head_prototypes), 4),
            "ibot": round(masked_fraction * math.log(config.ibot.head_prototypes), 4)}


def summarise(run: Path, window: int = 100) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    corpus = json.loads((run / "corpus.json").read_text())
    config = load_config(run / "config.yaml")
    seconds = [r["step_seconds"] for r in records]
    keys = KEYS + tuple(k for k in OPTIONAL_KEYS if k in records[0])
    batch = config.optim.batch_size
    return {
        "steps": len(records),
        "batch_size": batch,
        "corpus": {"volumes": corpus["totals"]["volumes"], "slices": corpus["totals"]["slices"],
                   "skipped": corpus["totals"]["skipped"], "filters": corpus["filters"]},
        "training_wall_minutes": round(sum(seconds) / 60, 1),
        "slices_per_second_mean": round(len(records) * batch / sum(seconds), 1),
        "slices_per_second_median_step": round(float(np.median([r["images_per_s"] for r in records])), 1),
        "loss_first_steps": {k: round(float(np.mean([r[k] for r in records[:window]])), 4) for k in keys},
        "loss_last_steps": {k: round(float(np.mean([r[k] for r in records[-window:]])), 4) for k in keys},
        "window_steps": window,
        "uniform_prediction_loss": uniform_prediction_losses(config),
    }


if __name__ == "__main__":
    print(json.dumps(summarise(Path(sys.argv[1])), indent=1))
