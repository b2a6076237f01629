"""Inference time per case from nnU-Net's validation log: robust to the export pool's start-up in the first
case, and taken from the last validation when a fold was validated again (--val)."""
import pytest

from meddinov3_nnunet.evaluation.benchmark_report import parse_training_logs

# nnU-Net 2.8.1's lines (trailing space included); the first case waits ~100 s for the spawned export pool
TRAINING = """2026-11-28 08:29:51.068442: Epoch 0 
2026-11-28 08:29:51.068442: train_loss 0.7 
2026-11-28 08:29:51.068442: Epoch time: 4.74 s 
2026-11-28 08:29:57.546632: predicting hippocampus_001 
2026-11-28 08:29:57.547987: hippocampus_001, shape torch.Size([1, 35, 51, 35]), rank 0 
2026-11-28 08:31:42.000000: predicting hippocampus_015 
2026-11-28 08:31:44.000000: predicting hippocampus_017 
2026-11-28 08:31:46.500000: predicting hippocampus_020 
2026-11-28 08:31:55.000000: Validation complete 
"""
REVALIDATION = """2026-11-28 09:00:00.000000: predicting hippocampus_001 
2026-11-28 09:00:03.000000: predicting hippocampus_015 
2026-11-28 09:00:10.000000: Validation complete 
"""


def test_inference_time_is_the_median_gap_between_cases(tmp_path):
    (tmp_path / "training_log_2026_11_28_08_29_46.txt").write_text(TRAINING)
    parsed = parse_training_logs(tmp_path)
    assert parsed["inference_seconds_per_case"] == pytest.approx(2.5)  # gaps 104.5, 2.0, 2.5
    assert parsed["validation_seconds"] == pytest.approx(117.453368)
    assert parsed["train_loss"] == [0.7] and parsed["epoch_seconds"] == [4.74]


def test_a_later_validation_replaces_the_first(tmp_path):
    (tmp_path / "training_log_2026_11_28_08_29_46.txt").write_text(TRAINING)
    (tmp_path / "training_log_2026_11_28_09_00_00.txt").write_text(REVALIDATION)
    parsed = parse_training_logs(tmp_path)
    assert parsed["inference_seconds_per_case"] == pytest.approx(3.0)
    assert parsed["validation_seconds"] == pytest.approx(10.0)
