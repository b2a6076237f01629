"""Key numbers of a pretraining run folder as JSON: throughput, wall time, and losses at the start and the end
(means over the first / last 100 steps, so single noisy steps do not decide).

    python benchmarks/pretraining/summarise_run.py RUN_DIR > run_summary.json
"""
import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("total", "dino", "dino_global", "dino_local", "ibot", "koleo")


def summarise(run: Path, window: int = 100) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    corpus = json.loads((run / "corpus.json").read_text())
    seconds = [r["step_seconds"] for r in records]
    config = (run / "config.yaml").read_text()
    batch = next(int(line.split(":")[1]) for line in config.splitlines() if line.strip().startswith("batch_size:"))
    return {
        "steps": len(records),
        "batch_size": batch,
        "corpus": {"volumes": corpus["totals"]["volumes"], "slices": corpus["totals"]["slices"],
                   "skipped": corpus["totals"]["skipped"], "filters": corpus["filters"]},
        "training_wall_minutes": round(sum(seconds) / 60, 1),
        "slices_per_second_mean": round(len(records) * batch / sum(seconds), 1),
        "slices_per_second_median_step": round(float(np.median([r["images_per_s"] for r in records])), 1),
        "loss_first_steps": {k: round(float(np.mean([r[k] for r in records[:window]])), 4) for k in KEYS},
        "loss_last_steps": {k: round(float(np.mean([r[k] for r in records[-window:]])), 4) for k in KEYS},
        "window_steps": window,
        "uniform_prediction_loss_dino": round(float(np.log(1024)), 4),
    }


if __name__ == "__main__":
    print(json.dumps(summarise(Path(sys.argv[1])), indent=1))
