"""Per-step metrics of a pretraining run: a JSON-lines log (``metrics.jsonl``) and the loss-curve plot
(``loss_curves.png``) drawn from it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from meddinov3_nnunet.atomic_io import save_figure_atomic, write_text_atomic


class MetricsLog:
    """Appends one JSON object per step; on a resume, lines of steps at or after the resume point (written by
    the interrupted run after its last checkpoint) are dropped first, so the file reads as one run."""

    def __init__(self, path: str | os.PathLike, start_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step(line) is not None and _step(line) < start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step(line: str):
    try:
        return json.loads(line).get("step")
    except json.JSONDecodeError:
        return None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def _plot_probes(ax, probes: list[dict]) -> None:
    """Linear-probe Dice of the teacher (``probe.jsonl``) over the steps: mean and per label."""
    steps = [r["step"] for r in probes]
    ax.plot(steps, [r["probe_dice_mean"] for r in probes], marker="o", color="black", label="mean")
    for label in probes[-1].get("probe_dice", {}):
        ax.plot(steps, [r.get("probe_dice", {}).get(label) for r in probes], marker=".", alpha=0.7, label=label)
    ax.set_title("linear probe Dice (teacher)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Loss curves (raw and smoothed), schedules, throughput and, when the run probes (``probe.jsonl``), the
    linear-probe Dice in one PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 50)
    probe_path = Path(metrics_path).with_name("probe.jsonl")
    probes = read_metrics(probe_path) if probe_path.exists() else []
    fig, axes = plt.subplots(2, 3 if probes else 2, figsize=(16 if probes else 11, 7.5), squeeze=False)
    if probes:
        _plot_probes(axes[0, 2], probes)
        axes[1, 2].axis("off")
    mim = any("mim" in r for r in records)  # the masked-pixel loss of a run with mim.enabled
    panels = [(axes[0, 0], ("total",), "total loss"), (axes[0, 1], ("dino", "ibot"), "DINO and iBOT"),
              (axes[1, 0], ("koleo", "gram", "mim"), "KoLeo, Gram and masked pixels" if mim else "KoLeo and Gram")]
    for ax, keys, name in panels:
        for key in keys:
            values = [r.get(key) for r in records]
            if all(v is None for v in values) or (key == "gram" and not any(values)):
                continue
            pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
            xs, ys = zip(*pairs)
            line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, _smooth(list(ys), window), color=line.get_color(), label=f"{key} (smoothed)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    ax.plot(steps, [r["lr"] for r in records], label="lr", color="tab:blue")
    ax.set_ylabel("lr")
    ax.set_xlabel("step")
    twin = ax.twinx()
    twin.plot(steps, _smooth([r.get("images_per_s", 0.0) for r in records], window), label="slices/s (smoothed)",
              color="tab:green")
    twin.set_ylabel("slices/s")
    ax.set_title("lr and throughput")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, png_path, dpi=90)
    plt.close(fig)
