"""The benchmark's machine-readable table: one numeric CSV line per row, fold, class and metric, with a label
that contains the CSV and Markdown separators; every output replaced whole."""
import csv
import io
import json
import math

import pytest

from meddinov3_nnunet.evaluation.benchmark import Row
from meddinov3_nnunet.evaluation.benchmark_report import write_outputs
from meddinov3_nnunet.evaluation.segmentation_metrics import summarise


def test_csv_is_long_and_numeric(tmp_path):
    per_case = {"c1": {1: {"dsc": 0.8, "nsd": 0.6, "hd95": 2.0}, 2: {"dsc": 0.0, "nsd": 0.0, "hd95": math.nan}},
                "c2": {1: {"dsc": 0.6, "nsd": 0.4, "hd95": 4.0}, 2: {"dsc": 0.5, "nsd": 0.5, "hd95": 3.0}}}
    summary = summarise(per_case, {1: "anterior", 2: "posterior"})
    summary.update(nsd_tolerance_mm=1.0, per_case={c: {"anterior": m[1], "posterior": m[2]} for c, m in per_case.items()})
    row = Row.parse('MedDINOv3Trainer_S:2d=ViT-S, "pretrained" | 2d')
    collected = {(row, 0): {"summary": summary, "stats": {"wall_seconds": 600.0, "max_rss_mib": 1500.0},
                            "curves": {"train_loss": [1.0, 0.5], "val_loss": [0.9, 0.6], "pseudo_dice": [0.2, 0.4],
                                       "epoch_seconds": [50.0, 50.0], "inference_seconds_per_case": 1.5,
                                       "validation_seconds": 70.0},
                            "epochs": 2, "iterations_per_epoch": 50, "iterations_per_second": 1.0}}
    (tmp_path / "table.csv").write_text("old")
    write_outputs(collected, tmp_path, {"description": "test budget"})
    lines = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert len(lines) == 3 * 3  # (2 classes + class mean) x (DSC, NSD, HD95)
    assert {line["label"] for line in lines} == {'ViT-S, "pretrained" | 2d'}
    by_key = {(line["class"], line["metric"]): line for line in lines}
    assert float(by_key["anterior", "dsc"]["mean"]) == pytest.approx(0.7)
    assert float(by_key["anterior", "dsc"]["sd"]) == pytest.approx(math.sqrt(0.02), rel=1e-5)
    assert by_key["posterior", "hd95"]["n"] == "1" and by_key["posterior", "hd95"]["undefined"] == "1"
    assert float(by_key["mean", "nsd"]["mean"]) == pytest.approx((0.5 + 0.25) / 2)
    assert float(by_key["mean", "dsc"]["inference_seconds_per_case"]) == 1.5
    assert float(by_key["mean", "dsc"]["train_wall_seconds"]) == 600.0 and by_key["mean", "dsc"]["epochs"] == "2"
    assert json.loads((tmp_path / "results.json").read_text())[0]["label"] == 'ViT-S, "pretrained" | 2d'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsc_boxplot.png", "learning_curves.png", "results.json",
                                                          "table.csv", "table.md"]  # no temporary file left
