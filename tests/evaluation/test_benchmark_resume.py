"""benchmark re-runs: an evaluation is reused only while it is newer than the fold's predictions, a
resumed training (--c) reports the cost of all its attempts, a fresh run replaces old stats, and a fold trained from
other weights is refused instead of skipped."""
import json
import os
import sys

import numpy as np
import pytest

from fake_nnunet import nnunet_paths, write_label
from meddinov3_nnunet.evaluation.benchmark import INITIALISATION_RECORD, Benchmark, BenchmarkError, Row


@pytest.fixture
def one_row(tmp_path, monkeypatch):
    nnunet_paths(tmp_path, monkeypatch)
    pre = tmp_path / "preprocessed" / "Dataset011_Resume"
    pre.mkdir()
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["c0"], "val": ["c1"]}]))
    truth = np.zeros((4, 12, 12))
    truth[1:3, 2:8, 2:8] = 1
    write_label(pre / "gt_segmentations" / "c1.nii.gz", truth)
    row = Row.parse("nnUNetTrainer_budget:2d=U-Net")
    benchmark = Benchmark("11", [row], [0], {"budget": {}}, tmp_path / "out", log=lambda *a: None)
    return benchmark, row, truth


def test_evaluation_is_redone_when_the_predictions_are_newer(one_row):
    benchmark, row, truth = one_row
    validation = benchmark.fold_dir(row, 0) / "validation"
    write_label(validation / "c1.nii.gz", truth)
    assert benchmark.evaluate(row, 0)["per_class"]["a"]["dsc"]["mean"] == pytest.approx(1.0)
    assert benchmark.evaluate(row, 0)["per_class"]["a"]["dsc"]["mean"] == pytest.approx(1.0)  # reused
    retrained = np.zeros_like(truth)
    retrained[1:3, 2:8, 2:5] = 1  # half of the square
    write_label(validation / "c1.nii.gz", retrained)
    later = os.stat(benchmark.row_out(row, 0) / "summary.json").st_mtime + 5
    os.utime(validation / "c1.nii.gz", (later, later))
    assert benchmark.evaluate(row, 0)["per_class"]["a"]["dsc"]["mean"] == pytest.approx(2 * 36 / (36 + 72))


def test_resumed_training_adds_up_its_attempts(one_row, tmp_path):
    benchmark, _, _ = one_row
    stats_file = tmp_path / "row" / "train.stats.json"
    stats_file.parent.mkdir()
    stats_file.write_text(json.dumps({"returncode": 1, "wall_seconds": 100.0, "max_rss_mib": 1e9}))
    resumed = benchmark._run([sys.executable, "-c", "pass", "--c"], dict(os.environ), tmp_path / "row" / "train.log",
                             stats_file)
    assert resumed["returncode"] == 0 and resumed["attempts"] == 2
    assert 100.0 < resumed["wall_seconds"] < 160.0 and resumed["max_rss_mib"] == 1e9
    assert json.loads(stats_file.read_text()) == resumed


def test_a_fresh_run_replaces_old_stats_and_a_failure_names_its_log(one_row, tmp_path):
    benchmark, _, _ = one_row
    stats_file = tmp_path / "train.stats.json"
    stats_file.write_text(json.dumps({"returncode": 0, "wall_seconds": 1.0, "max_rss_mib": 1.0}))
    fresh = benchmark._run([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "train.log", stats_file)
    assert fresh["wall_seconds"] < 60 and "attempts" not in fresh  # a new run, not added to the old file
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\); see .*train.log"):
        benchmark._run([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "train.log",
                       stats_file)


def test_cpu_rows_get_few_nnunet_workers_unless_the_user_chose(one_row, monkeypatch):
    benchmark, row, _ = one_row
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    monkeypatch.setenv("nnUNet_def_n_proc", "6")
    env = benchmark.env(row)
    assert int(env["nnUNet_n_proc_DA"]) <= 2 and env["nnUNet_def_n_proc"] == "6"
    benchmark.device = "cuda"
    assert "nnUNet_n_proc_DA" not in benchmark.env(row)


def test_a_fold_trained_from_other_weights_is_refused_not_skipped(one_row, tmp_path, monkeypatch):
    benchmark, row, _ = one_row
    trainings, messages = [], []
    benchmark.log = messages.append
    monkeypatch.setattr(benchmark, "_run", lambda command, *args: trainings.append(command) or {"returncode": 0})
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    first.write_bytes(b"1")
    second.write_bytes(b"22")
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", str(first))
    benchmark.train(row, 0)  # a fresh fold: trained, its initialisation recorded
    fold_dir = benchmark.fold_dir(row, 0)
    assert json.loads((fold_dir / INITIALISATION_RECORD).read_text())["MEDDINOV3_WEIGHTS"]["bytes"] == 1
    (fold_dir / "checkpoint_final.pth").write_bytes(b"")
    (fold_dir / "validation").mkdir()
    (fold_dir / "validation" / "summary.json").write_text("{}")
    benchmark.train(row, 0)  # the same weights: finished, skipped
    assert len(trainings) == 1 and "skipped" in messages[-1]
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", str(second))
    with pytest.raises(BenchmarkError, match="second.pth: give this run its own nnUNet_results") as error:
        benchmark.train(row, 0)
    assert str(first) in str(error.value)
    monkeypatch.delenv("MEDDINOV3_WEIGHTS")
    with pytest.raises(BenchmarkError, match="random initialisation"):
        benchmark.train(row, 0)
    (fold_dir / INITIALISATION_RECORD).unlink()  # a fold trained before the record existed: taken as it is
    benchmark.train(row, 0)
    assert len(trainings) == 1 and "no record of its initialisation" in messages[-2]
