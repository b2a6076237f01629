"""Runs one command and records what it cost: exit status, wall time, peak resident memory and peak GPU memory.

    python -m meddinov3_nnunet.evaluation.process_monitor STATS.json COMMAND [ARGS...]

`benchmark` wraps every ``nnUNetv2_train`` in it. The wrapper's only children are the command's process tree (and
the nvidia-smi queries), so ``ru_maxrss`` of RUSAGE_CHILDREN is the largest resident set of one process of that
tree (the trainer; nnU-Net's augmentation and export workers are separate processes with their own). GPU memory:
when ``nvidia-smi`` is on PATH, the memory of the tree's processes as nvidia-smi lists them is summed every
few seconds and the maximum kept (CUDA context included; ``null`` when no process of the tree was ever listed,
e.g. inside a PID namespace nvidia-smi cannot see). Writes STATS.json atomically and exits with the command's
status.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..atomic_io import write_text_atomic

GPU_POLL_SECONDS = 2.0


def process_tree(root: int) -> set[int]:
    """``root`` and its live descendants, from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = {root}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


class GpuPeak(threading.Thread):
    """Polls nvidia-smi for the GPU memory of one process tree; ``peak_mib`` is None until a process is listed."""

    def __init__(self, root: int, nvidia_smi: str):
        super().__init__(daemon=True)
        self.root, self.nvidia_smi, self.peak_mib = root, nvidia_smi, None
        self.stopped = threading.Event()

    def sample(self) -> float | None:
        result = subprocess.run([self.nvidia_smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            return None
        usage = {}
        for line in result.stdout.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip().isdigit() and used.strip().replace(".", "", 1).isdigit():
                usage[int(pid)] = usage.get(int(pid), 0.0) + float(used)
        listed = process_tree(self.root) & set(usage)
        return sum(usage[p] for p in listed) if listed else None

    def run(self) -> None:
        while not self.stopped.wait(0.5 if self.peak_mib is None else GPU_POLL_SECONDS):
            try:
                used = self.sample()
            except (OSError, subprocess.SubprocessError):
                return  # no usable nvidia-smi: leave the peak unknown rather than guess
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0.0, used)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    stats_path, command = Path(argv[0]), argv[1:]
    started = time.time()
    process = subprocess.Popen(command)
    nvidia_smi = shutil.which("nvidia-smi")
    monitor = GpuPeak(process.pid, nvidia_smi) if nvidia_smi else None
    if monitor:
        monitor.start()
    try:
        returncode = process.wait()
    except KeyboardInterrupt:  # the command got the same SIGINT; wait for it to stop
        returncode = process.wait()
    if monitor:
        monitor.stopped.set()
        monitor.join(timeout=35)
    stats = {"returncode": returncode, "wall_seconds": time.time() - started,
             "max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
             "gpu_peak_mib": monitor.peak_mib if monitor else None}
    write_text_atomic(stats_path, json.dumps(stats))
    return returncode


if __name__ == "__main__":
    sys.exit(main())
