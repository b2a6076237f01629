"""benchmarks/gpu_check.sh --dry-run: every section of the one-shot GPU check runs on the CPU and is reported."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # nnU-Net planning, training and prediction, a training step and two torchrun ranks
def test_gpu_check_dry_run_writes_a_passing_report(tmp_path, shared_dir):
    report = tmp_path / "report.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "MEDDINOV3_SHARED": str(shared_dir)}
    result = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(report)],
                            capture_output=True, text=True, env=env, timeout=1500)
    text = report.read_text()
    assert result.returncode == 0, text + result.stdout[-2000:] + result.stderr[-2000:]
    assert text.startswith("# GPU check (DRY RUN on the CPU")
    for section in ("Environment", "Stock nnU-Net smoke: train + predict", "Training step (dry run",
                    "DDP pretraining smoke (torchrun)"):
        assert f"## {section}" in text and text.split(f"## {section}")[1].split("\n")[0].count("passed") == 1
    assert "Dataset004_Hippocampus (shared), 5 training cases, 2 held out" in text
    assert "(finite)" in text and "2 predictions written with the inputs' size" in text
    assert "| s / step (median, min-max) | FLOP / step | achieved TFLOP/s | bf16 matmul peak TFLOP/s |" in text
    assert "torchrun, 2 rank(s) on cpu" in text and "weights identical on all ranks: True" in text
    assert text.rstrip().endswith("all sections passed.")
