"""Per-case, per-class DSC, NSD and HD95 of label maps, with MONAI's surface metrics.

Definitions (spacing in mm, taken from the images):

* DSC  = 2|P∩G| / (|P| + |G|).
* NSD  = MONAI ``compute_surface_dice`` with one tolerance for every class (default 1 mm): the fraction of
  both boundaries lying within the tolerance of the other boundary (Nikolov et al. 2021) — the metric the
  MedDINOv3 paper reports.
* HD95 = MONAI ``compute_hausdorff_distance(percentile=95)``, symmetric, in mm.

Empty structures (documented choice; MONAI's value where MONAI defines one):

| ground truth | prediction | DSC | NSD | HD95 |
|---|---|---|---|---|
| empty | empty | 1 | 1 (MONAI: NaN) | 0 (MONAI: NaN) |
| empty | not empty, or the reverse | 0 | 0 (MONAI) | NaN: undefined, left out of means and counted |
"""
from __future__ import annotations

import math
import warnings

import numpy as np

METRICS = ("dsc", "nsd", "hd95")  # the keys of every per-case and summary entry


def _one_hot(labels: np.ndarray, values: list[int]):
    import torch

    return torch.from_numpy(np.stack([labels == v for v in values])[None].astype(np.float32))


def case_metrics(prediction: np.ndarray, truth: np.ndarray, class_values: list[int], spacing: tuple[float, ...],
                 nsd_tolerance_mm: float = 1.0) -> dict[int, dict[str, float]]:
    """{class value: {'dsc', 'nsd', 'hd95'}} for one case; arrays in the same (z, y, x) grid as ``spacing``."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from ground truth shape {truth.shape}")
    results: dict[int, dict[str, float]] = {}
    surface_classes = []
    for value in class_values:
        predicted, true = prediction == value, truth == value
        n_pred, n_true = int(predicted.sum()), int(true.sum())
        if n_pred == 0 and n_true == 0:
            results[value] = {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0}
        elif n_pred == 0 or n_true == 0:
            results[value] = {"dsc": 0.0, "nsd": 0.0, "hd95": math.nan}
        else:
            overlap = int(np.logical_and(predicted, true).sum())
            results[value] = {"dsc": 2.0 * overlap / (n_pred + n_true)}
            surface_classes.append(value)
    if surface_classes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about its own numpy return type on every call
            pred_1h, true_1h = _one_hot(prediction, surface_classes), _one_hot(truth, surface_classes)
            spacing = tuple(float(s) for s in spacing)
            nsd = compute_surface_dice(pred_1h, true_1h, class_thresholds=[nsd_tolerance_mm] * len(surface_classes),
                                       include_background=True, spacing=spacing)[0]
            hd95 = compute_hausdorff_distance(pred_1h, true_1h, include_background=True, percentile=95,
                                              spacing=spacing)[0]
        for index, value in enumerate(surface_classes):
            results[value]["nsd"] = float(nsd[index])
            results[value]["hd95"] = float(hd95[index])
    return results


def summarise(per_case: dict[str, dict[int, dict[str, float]]], class_names: dict[int, str]) -> dict:
    """Mean, sd and counts per class and metric. ``overall``: mean over classes of the class means
    (class-averaged, as in the paper's tables) and the sd over cases of each case's class average.
    NaN values (undefined HD95) are left out and counted."""
    summary: dict = {"per_class": {}, "overall": {}, "num_cases": len(per_case)}
    for value, name in class_names.items():
        entry = {}
        for metric in METRICS:
            values = np.array([case[value][metric] for case in per_case.values()], dtype=float)
            finite = values[np.isfinite(values)]
            entry[metric] = {"mean": float(finite.mean()) if finite.size else math.nan,
                             "sd": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else math.nan),
                             "n": int(finite.size), "undefined": int(values.size - finite.size)}
        summary["per_class"][name] = entry
    for metric in METRICS:
        means = np.array([summary["per_class"][n][metric]["mean"] for n in class_names.values()])
        means = means[np.isfinite(means)]
        case_averages = np.array([np.nanmean([case[v][metric] for v in class_names]) if any(
            np.isfinite(case[v][metric]) for v in class_names) else math.nan for case in per_case.values()])
        case_averages = case_averages[np.isfinite(case_averages)]
        summary["overall"][metric] = {
            "mean": float(means.mean()) if means.size else math.nan,
            "sd": float(case_averages.std(ddof=1)) if case_averages.size > 1 else math.nan}
    return summary
