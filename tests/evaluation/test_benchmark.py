"""benchmark: row syntax, nnU-Net log parsing, skipping finished work and the tables/plots it writes
(on a fake nnU-Net results tree; the real runs are in benchmarks/)."""
import json

import numpy as np
import pytest

from fake_nnunet import nnunet_paths, write_label
from meddinov3_nnunet.evaluation.benchmark import Benchmark, BenchmarkError, Row, load_preset
from meddinov3_nnunet.evaluation.benchmark_report import parse_training_logs

LOG = """2026-11-28 08:00:00.000000: Epoch 0
2026-11-28 08:00:00.100000: Current learning rate: 0.0003
2026-11-28 08:00:10.000000: train_loss 0.9
2026-11-28 08:00:10.000000: val_loss 0.8
2026-11-28 08:00:10.000000: Pseudo dice [np.float32(0.1), np.float32(0.3)]
2026-11-28 08:00:10.000000: Epoch time: 10.0 s
2026-11-28 08:00:11.000000: Epoch 1
2026-11-28 08:00:20.000000: train_loss 0.5
2026-11-28 08:00:20.000000: val_loss 0.6
2026-11-28 08:00:20.000000: Pseudo dice [np.float32(0.5), np.float32(0.7)]
2026-11-28 08:00:20.000000: Epoch time: 5.0 s
2026-11-28 08:00:30.000000: predicting case_a
2026-11-28 08:00:34.000000: predicting case_b
2026-11-28 08:00:38.000000: Validation complete
"""


def test_row_syntax():
    row = Row.parse("MedDINOv3Trainer_S:2d_meddinov3=ViT-S, high res")
    assert (row.trainer, row.configuration, row.plans, row.label) == ("MedDINOv3Trainer_S", "2d_meddinov3",
                                                                      "nnUNetPlans", "ViT-S, high res")
    assert row.folder_name == "MedDINOv3Trainer_S__nnUNetPlans__2d_meddinov3"
    assert Row.parse("nnUNetTrainer:3d_fullres:nnUNetResEncUNetMPlans").plans == "nnUNetResEncUNetMPlans"
    with pytest.raises(BenchmarkError, match="TRAINER:CONFIGURATION"):
        Row.parse("MedDINOv3Trainer")


def test_presets_share_one_budget_for_every_row():
    cpu = load_preset("cpu")
    assert cpu["budget"] == {"MEDDINOV3_NUM_EPOCHS": 10, "MEDDINOV3_ITERS_PER_EPOCH": 50, "MEDDINOV3_VAL_ITERS": 5}
    assert {Row.parse(r).configuration for r in cpu["rows"]} == {"2d", "3d_fullres", "2d_meddinov3"}
    assert "MedDINOv3Trainer_tiny:2d" in " ".join(cpu["rows"])
    assert load_preset("gpu")["budget"] == {} and load_preset("gpu")["plan_preset"] == "default"
    with pytest.raises(BenchmarkError, match="unknown benchmark preset 'fast'"):
        load_preset("fast")


def test_training_logs_give_curves_and_inference_time(tmp_path):
    (tmp_path / "training_log_2026_11_28_08_00_00.txt").write_text(LOG)
    curves = parse_training_logs(tmp_path)
    assert curves["train_loss"] == [0.9, 0.5] and curves["val_loss"] == [0.8, 0.6]
    assert curves["pseudo_dice"] == pytest.approx([0.2, 0.6]) and curves["epoch_seconds"] == [10.0, 5.0]
    assert curves["inference_seconds_per_case"] == pytest.approx(4.0)


@pytest.fixture
def finished_tree(tmp_path, monkeypatch):
    """A dataset whose two rows already trained: checkpoints, validation predictions, logs, run stats."""
    nnunet_paths(tmp_path, monkeypatch)
    pre = tmp_path / "preprocessed" / "Dataset009_Fake"
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {}, "2d_meddinov3": {}}}))
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                  "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c2", "c3"]}]))
    truth = np.zeros((4, 12, 12))
    truth[1:3, 2:6, 2:6], truth[1:3, 6:10, 6:10] = 1, 2
    for case in ("c0", "c1", "c2", "c3"):
        write_label(pre / "gt_segmentations" / f"{case}.nii.gz", truth)
    rows = [Row.parse("nnUNetTrainer_budget:2d=U-Net"), Row.parse("MedDINOv3Trainer_S_scratch:2d_meddinov3=ViT")]
    for row, shift in zip(rows, (0, 1)):
        fold = tmp_path / "results" / "Dataset009_Fake" / row.folder_name / "fold_0"
        prediction = np.roll(truth, shift, axis=2)
        for case in ("c2", "c3"):
            write_label(fold / "validation" / f"{case}.nii.gz", prediction)
        (fold / "validation" / "summary.json").write_text("{}")
        (fold / "checkpoint_final.pth").write_bytes(b"")
        (fold / "training_log_2026_11_28_08_00_00.txt").write_text(LOG)
        stats = tmp_path / "out" / "rows" / row.folder_name / "fold_0" / "train.stats.json"
        stats.parent.mkdir(parents=True)
        stats.write_text(json.dumps({"returncode": 0, "wall_seconds": 120.0, "max_rss_mib": 900.0}))
    preset = {"description": "fake", "budget": {"MEDDINOV3_ITERS_PER_EPOCH": 50}, "nsd_tolerance_mm": 1.0}
    return Benchmark("9", rows, [0], preset, tmp_path / "out", log=lambda *a: None), tmp_path


def test_finished_rows_are_skipped_evaluated_and_tabulated(finished_tree):
    benchmark, root = finished_tree
    result = benchmark.run()
    assert benchmark.commands == []  # nothing was trained again
    table = (root / "out" / "table.md").read_text()
    assert "| U-Net | nnUNetTrainer_budget | 2d | 0 | 100.00 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 |" in table
    assert "| 2 x 50 | 2.0 | 6.67 | 4.00 | 900 |" in table  # 100 iterations in 15 s of epochs
    vit = next(r for r in result["records"] if r["label"] == "ViT")
    assert vit["summary"]["overall"]["dsc"]["mean"] == pytest.approx(0.75)  # 4x4 squares shifted by 1 voxel
    for name in ("table.csv", "results.json", "dsc_boxplot.png", "learning_curves.png"):
        assert (root / "out" / name).stat().st_size > 0, name
    assert (root / "out" / "rows" / "MedDINOv3Trainer_S_scratch__nnUNetPlans__2d_meddinov3" / "fold_0" /
            "per_case.csv").is_file()


def test_collect_only_leaves_out_unfinished_rows(finished_tree):
    benchmark, root = finished_tree
    benchmark.rows.append(Row.parse("MedDINOv3Trainer_S:2d=never trained"))
    result = benchmark.run(collect_only=True)
    assert [r["label"] for r in result["records"]] == ["U-Net", "ViT"]


def test_only_the_preset_sets_the_budget(finished_tree, monkeypatch):
    benchmark, _ = finished_tree
    monkeypatch.setenv("MEDDINOV3_NUM_EPOCHS", "999")  # inherited from the shell: must not leak into rows
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", "/weights.pth")
    benchmark.preset["batch_size"] = {"2d_meddinov3": 32}
    env = benchmark.env(benchmark.rows[1])
    assert env["MEDDINOV3_ITERS_PER_EPOCH"] == "50" and env["MEDDINOV3_BATCH_SIZE"] == "32"
    assert "MEDDINOV3_NUM_EPOCHS" not in env and env["MEDDINOV3_WEIGHTS"] == "/weights.pth"
    assert "MEDDINOV3_BATCH_SIZE" not in benchmark.env(benchmark.rows[0])
