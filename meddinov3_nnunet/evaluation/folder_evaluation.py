"""Evaluate a folder of predicted label maps against a folder of ground truth: files, checks, reports.

Writes ``per_case.csv`` (case, class, DSC, NSD, HD95), ``summary.json``, ``summary.csv`` and ``summary.md``
(mean ± sd per class and overall), each atomically, and only after every case passed every check (complete files,
same grid, label values that ``dataset.json`` defines). A failed run removes these reports of an earlier run from
the output folder, so that no stale report is left beside an error. Images are read with
`meddinov3_nnunet.volume_io` (whole-file check); 2D label maps (e.g. ``.png`` datasets) are accepted.
"""
from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..atomic_io import write_text_atomic
from ..errors import InputError
from ..volume_io import read_image
from .segmentation_metrics import METRICS, case_metrics, summarise

METRIC_TITLES = {"dsc": "DSC (%)", "nsd": "NSD (%)", "hd95": "HD95 (mm)"}
REPORT_FILES = ("summary.json", "summary.csv", "summary.md", "per_case.csv")


class EvaluationError(InputError):
    """Inputs that cannot be evaluated; the message names the case(s) and the fix."""


def strict_json(value):
    """NaN and infinities -> None, so that the JSON files are standard JSON (null = undefined)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def load_summary(path: Path) -> dict:
    """A summary.json written by `write_reports`, with its nulls (undefined values) back as NaN."""
    def restore(value):
        if value is None:
            return math.nan
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(Path(path).read_text()))


def class_names_from_dataset_json(dataset_json: Path | None, gt_files: list[Path]) -> dict[int, str]:
    """{label value: name} of the foreground classes; without dataset.json, the values found in the ground truth."""
    if dataset_json is not None:
        labels = json.loads(Path(dataset_json).read_text())["labels"]
        names = {int(v): n for n, v in labels.items() if isinstance(v, int) and v > 0 and n != "ignore"}
        if not names:
            raise EvaluationError(f"{dataset_json}: no integer foreground labels (region-based datasets are not supported)")
        return dict(sorted(names.items()))
    import SimpleITK as sitk

    values: set[int] = set()
    for path in gt_files:
        values |= set(np.unique(sitk.GetArrayFromImage(read_image(path, allow_2d=True))).astype(int).tolist())
    return {v: f"label_{v}" for v in sorted(values) if v > 0}


def allowed_label_values(dataset_json: Path | None, class_values: list[int]) -> set[int]:
    """Values a label map may hold: background 0, the classes, and the ``ignore`` label of dataset.json if any."""
    allowed = {0, *class_values}
    if dataset_json is not None:
        ignore = json.loads(Path(dataset_json).read_text())["labels"].get("ignore")
        if isinstance(ignore, int):
            allowed.add(ignore)
    return allowed


def _match_cases(pred_dir: Path, gt_dir: Path, file_ending: str, cases: list[str] | None = None) -> list[str]:
    def cases_in(folder: Path) -> set[str]:
        if not folder.is_dir():
            raise EvaluationError(f"{folder} is not a folder")
        return {p.name[: -len(file_ending)] for p in folder.iterdir() if p.name.endswith(file_ending)}

    predicted, truth = cases_in(pred_dir), cases_in(gt_dir)
    if cases is not None:
        absent = sorted(set(cases) - truth)
        if absent:
            raise EvaluationError(f"{gt_dir} has no ground truth for {len(absent)} case(s): {', '.join(absent[:10])}")
        truth = set(cases)
    if not truth:
        raise EvaluationError(f"{gt_dir} has no *{file_ending} files (is --gt right, or set --file-ending)")
    missing, extra = sorted(truth - predicted), sorted(predicted - truth)
    problems = []
    if missing:
        problems.append(f"missing predictions for {len(missing)} case(s): {', '.join(missing[:10])}")
    if extra:
        problems.append(f"predictions without ground truth for {len(extra)} case(s): {', '.join(extra[:10])}")
    if problems:
        raise EvaluationError(f"{pred_dir} vs {gt_dir}: " + "; ".join(problems)
                              + ". Predict every ground-truth case, or evaluate against a folder holding only those.")
    return sorted(truth)


def _evaluate_case(args) -> tuple[str, dict]:
    import SimpleITK as sitk

    case, pred_path, gt_path, class_values, allowed, tolerance = args
    pred_image, gt_image = read_image(pred_path, allow_2d=True), read_image(gt_path, allow_2d=True)
    problems = []
    if pred_image.GetSize() != gt_image.GetSize():
        problems.append(f"size {pred_image.GetSize()} vs ground truth {gt_image.GetSize()}")
    if not np.allclose(pred_image.GetSpacing(), gt_image.GetSpacing(), rtol=1e-3, atol=1e-4):
        problems.append(f"spacing {pred_image.GetSpacing()} vs {gt_image.GetSpacing()}")
    if not np.allclose(pred_image.GetOrigin(), gt_image.GetOrigin(), atol=1e-2):
        problems.append(f"origin {pred_image.GetOrigin()} vs {gt_image.GetOrigin()}")
    if not np.allclose(pred_image.GetDirection(), gt_image.GetDirection(), atol=1e-3):
        problems.append("direction differs")
    if problems:
        raise EvaluationError(f"case {case}: prediction {pred_path} is not aligned with its ground truth "
                              f"({'; '.join(problems)}); predictions must be in the ground truth's image grid")
    prediction = sitk.GetArrayFromImage(pred_image).astype(np.int64)
    truth = sitk.GetArrayFromImage(gt_image).astype(np.int64)
    foreign = [(kind, path, sorted(set(np.unique(array).tolist()) - allowed))
               for kind, path, array in (("prediction", pred_path, prediction), ("ground truth", gt_path, truth))]
    foreign = [f"{kind} {path} holds label value(s) {values}" for kind, path, values in foreign if values]
    if foreign:
        raise EvaluationError(f"case {case}: {'; '.join(foreign)}, which the labels {sorted(allowed)} do not define; "
                              f"fix the label maps or the dataset.json labels")
    spacing = tuple(reversed(gt_image.GetSpacing()))  # SimpleITK (x, y, z) -> array (z, y, x)
    return case, case_metrics(prediction, truth, class_values, spacing, tolerance)


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, dataset_json: str | Path | None = None,
                     nsd_tolerance_mm: float = 1.0, out_dir: str | Path | None = None, num_processes: int = 2,
                     file_ending: str | None = None, cases: list[str] | None = None) -> dict:
    """Evaluates every ground-truth case (or only ``cases``); returns the summary dict (also written to
    ``out_dir``). On any failure the reports of an earlier run in ``out_dir`` are removed."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    out_dir = Path(out_dir) if out_dir is not None else pred_dir
    try:
        summary = _evaluate(pred_dir, gt_dir, dataset_json, nsd_tolerance_mm, num_processes, file_ending, cases)
    except BaseException:
        for name in REPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        raise
    write_reports(summary, out_dir)
    return summary


def _evaluate(pred_dir: Path, gt_dir: Path, dataset_json, nsd_tolerance_mm: float, num_processes: int,
              file_ending: str | None, cases: list[str] | None) -> dict:
    if dataset_json is not None and not Path(dataset_json).is_file():
        raise EvaluationError(f"{dataset_json}: no such dataset.json")
    if file_ending is None:
        file_ending = json.loads(Path(dataset_json).read_text()).get("file_ending", ".nii.gz") if dataset_json \
            else ".nii.gz"
    cases = _match_cases(pred_dir, gt_dir, file_ending, cases)
    class_names = class_names_from_dataset_json(
        Path(dataset_json) if dataset_json else None, [gt_dir / f"{c}{file_ending}" for c in cases])
    allowed = allowed_label_values(Path(dataset_json) if dataset_json else None, list(class_names))
    jobs = [(c, pred_dir / f"{c}{file_ending}", gt_dir / f"{c}{file_ending}", list(class_names), allowed,
             nsd_tolerance_mm) for c in cases]
    if num_processes > 1 and len(jobs) >= 8:  # below that, starting worker processes costs more than it saves
        with ProcessPoolExecutor(num_processes) as pool:
            per_case = dict(pool.map(_evaluate_case, jobs))
    else:
        per_case = dict(map(_evaluate_case, jobs))
    summary = summarise(per_case, class_names)
    summary.update(nsd_tolerance_mm=nsd_tolerance_mm, prediction_folder=str(pred_dir), ground_truth_folder=str(gt_dir),
                   per_case={case: {class_names[v]: m for v, m in metrics.items()} for case, metrics in per_case.items()})
    return summary


def write_reports(summary: dict, out_dir: Path) -> None:
    write_text_atomic(out_dir / "summary.json", json.dumps(strict_json(summary), indent=1, allow_nan=False))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["case", "class", *METRICS])
    for case, classes in summary["per_case"].items():
        for name, metrics in classes.items():
            writer.writerow([case, name] + [f"{metrics[m]:.6g}" for m in METRICS])
    write_text_atomic(out_dir / "per_case.csv", rows.getvalue())
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["class", "metric", "mean", "sd", "n", "undefined"])
    for name, metrics in summary["per_class"].items():
        for metric, stats in metrics.items():
            writer.writerow([name, metric, f"{stats['mean']:.6g}", f"{stats['sd']:.6g}", stats["n"], stats["undefined"]])
    for metric, stats in summary["overall"].items():
        writer.writerow(["overall (class-averaged)", metric, f"{stats['mean']:.6g}", f"{stats['sd']:.6g}", "", ""])
    write_text_atomic(out_dir / "summary.csv", table.getvalue())
    write_text_atomic(out_dir / "summary.md", markdown_table(summary))


def format_cell(stats: dict, metric: str) -> str:
    scale = 100.0 if metric in ("dsc", "nsd") else 1.0
    if not math.isfinite(stats["mean"]):
        return "n/a" + (f" ({stats['undefined']} undef.)" if stats.get("undefined") else "")
    sd = stats["sd"]
    text = f"{stats['mean'] * scale:.2f} ± {sd * scale:.2f}" if math.isfinite(sd) else f"{stats['mean'] * scale:.2f}"
    return text + (f" ({stats['undefined']} undef.)" if stats.get("undefined") else "")


def markdown_table(summary: dict) -> str:
    """Classes as rows, DSC / NSD / HD95 as columns, mean ± sd over cases, plus the class-averaged row."""
    lines = [f"Cases: {summary['num_cases']}; NSD tolerance {summary['nsd_tolerance_mm']:g} mm; DSC and NSD in %, "
             f"mean ± sd over cases.", "", "| class | " + " | ".join(METRIC_TITLES.values()) + " |",
             "|---|" + "---|" * len(METRIC_TITLES)]
    for name, metrics in summary["per_class"].items():
        lines.append(f"| {name} | " + " | ".join(format_cell(metrics[m], m) for m in METRIC_TITLES) + " |")
    lines.append("| **mean (class-averaged)** | " + " | ".join(
        format_cell(summary["overall"][m], m) for m in METRIC_TITLES) + " |")
    return "\n".join(lines) + "\n"
