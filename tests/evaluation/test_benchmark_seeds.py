"""benchmark with seeds: one training per seed in its own folders, MEDDINOV3_SEED set per run, the table's mean and
spread over seeds; undefined metric values counted in every metric column (on a fake nnU-Net results tree)."""
import argparse
import csv
import io
import json

import numpy as np
import pytest

from fake_nnunet import nnunet_paths, write_label
from meddinov3_nnunet.evaluation.benchmark import Benchmark, BenchmarkError, Row
from meddinov3_nnunet.evaluation.cli_benchmark import configure_parser

ROW = Row.parse("nnUNetTrainer_budget:2d=U-Net")


def truth_volume():
    truth = np.zeros((4, 12, 12))
    truth[1:3, 2:6, 2:6], truth[1:3, 6:10, 6:10] = 1, 2
    return truth


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """Preprocessed dataset (classes a, b; validation cases c2, c3) and a function that writes a finished run."""
    nnunet_paths(tmp_path, monkeypatch)
    pre = tmp_path / "preprocessed" / "Dataset009_Fake"
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {}}}))
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                  "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["c0", "c1"], "val": ["c2", "c3"]}]))
    for case in ("c0", "c1", "c2", "c3"):
        write_label(pre / "gt_segmentations" / f"{case}.nii.gz", truth_volume())

    def finished(results_root, predictions):
        fold = results_root / "Dataset009_Fake" / ROW.folder_name / "fold_0"
        for case, prediction in predictions.items():
            write_label(fold / "validation" / f"{case}.nii.gz", prediction)
        (fold / "validation" / "summary.json").write_text("{}")
        (fold / "checkpoint_final.pth").write_bytes(b"")

    return tmp_path, finished


def benchmark(root, seeds=None, preset=None):
    preset = preset or {"description": "fake", "budget": {"MEDDINOV3_ITERS_PER_EPOCH": 50}}
    return Benchmark("9", [ROW], [0], preset, root / "out", log=lambda *a: None, seeds=seeds)


def test_each_seed_trains_in_its_own_folders_with_its_seed(tree, monkeypatch):
    root, _ = tree
    monkeypatch.setenv("MEDDINOV3_SEED", "7")  # inherited from the shell: must not leak into any run
    bench = benchmark(root, seeds=[0, 1])
    env0, env1, unseeded = bench.env(ROW, 0), bench.env(ROW, 1), bench.env(ROW)
    assert (env0["MEDDINOV3_SEED"], env1["MEDDINOV3_SEED"]) == ("0", "1") and "MEDDINOV3_SEED" not in unseeded
    assert env1["nnUNet_results"] == str(root / "results" / "benchmark_seed_1")
    assert unseeded["nnUNet_results"] == str(root / "results")
    assert bench.fold_dir(ROW, 0, 1) == root / "results" / "benchmark_seed_1" / "Dataset009_Fake" / ROW.folder_name / "fold_0"
    assert bench.row_out(ROW, 0, 1) == root / "out" / "rows" / ROW.folder_name / "seed_1" / "fold_0"
    assert bench.row_out(ROW, 0) == root / "out" / "rows" / ROW.folder_name / "fold_0"  # unseeded: unchanged layout


def test_table_gives_mean_and_spread_over_seeds(tree):
    root, finished = tree
    truth = truth_volume()
    finished(root / "results" / "benchmark_seed_0", {"c2": truth, "c3": truth})  # perfect
    shifted = np.roll(truth, 1, axis=2)  # 4x4 squares shifted by one voxel: DSC 0.75
    finished(root / "results" / "benchmark_seed_1", {"c2": shifted, "c3": shifted})
    bench = benchmark(root, seeds=[0, 1])
    result = bench.run()
    assert bench.commands == []  # both seeds finished: nothing trained
    assert [(r["seed"], r["summary"]["overall"]["dsc"]["mean"]) for r in result["records"]] == [(0, 1.0), (1, 0.75)]
    table = (root / "out" / "table.md").read_text()
    line = next(l for l in table.splitlines() if l.startswith("| U-Net |"))
    spread = np.std([100.0, 75.0], ddof=1)
    assert f"| 87.50 ± {spread:.2f} | 87.50 ± {spread:.2f} | 87.50 ± {spread:.2f} |" in line  # DSC a, b, mean
    assert line.endswith("| 0, 1 |") and len(table.splitlines()[0].split("|")) == len(line.split("|"))
    assert "sd over seeds" in table
    rows = list(csv.DictReader(io.StringIO((root / "out" / "table.csv").read_text())))
    assert {r["seed"] for r in rows} == {"0", "1"} and len(rows) == 2 * 3 * 3
    for seed in (0, 1):
        assert (bench.row_out(ROW, 0, seed) / "summary.json").is_file()


def test_undefined_values_are_counted_in_the_metric_columns(tree):
    root, finished = tree
    truth = truth_volume()
    without_b = np.where(truth == 2, 0, truth)  # class b missing from c3's prediction: its HD95 is undefined
    finished(root / "results", {"c2": truth, "c3": without_b})
    result = benchmark(root).run()
    line = next(l for l in (root / "out" / "table.md").read_text().splitlines() if l.startswith("| U-Net |"))
    cells = line.split("|")  # '', method, trainer, configuration, fold, DSC a, DSC b, DSC mean, NSD mean, HD95
    assert "(1 undef.)" in cells[9] and "undef." not in cells[7] + cells[8] and line.endswith("| none |")
    assert result["records"][0]["summary"]["overall"]["hd95"]["undefined"] == 1
    rows = list(csv.DictReader(io.StringIO((root / "out" / "table.csv").read_text())))
    by_key = {(r["class"], r["metric"]): r for r in rows}
    assert by_key["mean", "hd95"]["undefined"] == "1" and by_key["b", "hd95"]["undefined"] == "1"
    assert by_key["mean", "dsc"]["undefined"] == "0" and by_key["mean", "hd95"]["seed"] == ""


def test_seeds_come_from_the_cli_or_the_preset_and_must_be_valid(tree):
    root, _ = tree
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["-d", "9", "--seeds", "0", "1"]).seeds == [0, 1]
    assert benchmark(root, preset={"seeds": [3, 4]}).seeds == [3, 4]
    assert benchmark(root, seeds=[5], preset={"seeds": [3, 4]}).seeds == [5]
    assert benchmark(root).seeds == [None]
    for bad in ([0, 0], [-1]):
        with pytest.raises(BenchmarkError, match="distinct non-negative integers"):
            benchmark(root, seeds=bad)
