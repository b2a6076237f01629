"""The wrapper around each training: exit status, wall time, peak RSS, and peak GPU memory summed over the
command's process tree as nvidia-smi lists it (a fake nvidia-smi here: 100 MiB for every process)."""
import json
import os
import subprocess
import sys

import pytest

MONITOR = [sys.executable, "-m", "meddinov3_nnunet.evaluation.process_monitor"]


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\nfor d in /proc/[0-9]*; do echo \"${d#/proc/}, 100\"; done\n")
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_exit_status_wall_time_and_rss_without_a_gpu(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no nvidia-smi
    allocate = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); raise SystemExit(3)"
    result = subprocess.run(MONITOR + [str(tmp_path / "s.json"), sys.executable, "-c", allocate], env=env)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert result.returncode == 3 and stats["returncode"] == 3
    assert stats["max_rss_mib"] > 200 and 0 < stats["wall_seconds"] < 60 and stats["gpu_peak_mib"] is None


def test_gpu_memory_is_summed_over_the_process_tree(tmp_path, fake_nvidia_smi):
    three_processes = "sleep 3 & sleep 3; wait"  # sh, and its two sleeps
    subprocess.run(MONITOR + [str(tmp_path / "s.json"), "sh", "-c", three_processes], env=fake_nvidia_smi, check=True)
    assert json.loads((tmp_path / "s.json").read_text())["gpu_peak_mib"] == 300.0


def test_a_gpu_that_lists_none_of_the_processes_leaves_the_peak_unknown(tmp_path, fake_nvidia_smi):
    script = tmp_path / "bin" / "nvidia-smi"
    script.write_text("#!/bin/sh\necho '1, 5000'\n")  # another container's process only
    subprocess.run(MONITOR + [str(tmp_path / "s.json"), "sleep", "1.5"], env=fake_nvidia_smi, check=True)
    assert json.loads((tmp_path / "s.json").read_text())["gpu_peak_mib"] is None
