"""DSC / NSD / HD95 against hand-computed cases and MONAI, the empty-case conventions, folder checks and the CLI."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3_nnunet.evaluation.folder_evaluation import EvaluationError, evaluate_folders
from meddinov3_nnunet.evaluation.segmentation_metrics import case_metrics, summarise


def cube(shift: int = 0, size: int = 10, start: int = 8, shape=(30, 30, 30)) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    volume[start:start + size, start:start + size, start + shift:start + size + shift] = 1
    return volume


def test_shifted_cube_matches_hand_computation():
    """A 10-voxel cube shifted by 2 voxels along x, 1 mm spacing. DSC = 2*800/2000. Every surface point is
    within 2 mm of the other surface, so HD95 = 2 and NSD(2 mm) = 1. At 1 mm tolerance, of the 488 surface
    voxels of each cube, 136 are > 1 mm away (the 100 voxels of the far x face and the 36 inner voxels of the
    near x face), so NSD = 352/488."""
    result = case_metrics(cube(2), cube(0), [1], (1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)[1]
    assert result["dsc"] == pytest.approx(0.8)
    assert result["hd95"] == pytest.approx(2.0)
    assert result["nsd"] == pytest.approx(352 / 488, rel=1e-6)
    assert case_metrics(cube(2), cube(0), [1], (1.0, 1.0, 1.0), nsd_tolerance_mm=2.0)[1]["nsd"] == pytest.approx(1.0)


def test_spacing_is_physical_and_anisotropic():
    """One voxel of shift along x is 3 mm when x spacing is 3 mm (array order z, y, x)."""
    result = case_metrics(cube(1), cube(0), [1], (1.0, 1.0, 3.0), nsd_tolerance_mm=2.0)[1]
    assert result["hd95"] == pytest.approx(3.0) and result["nsd"] < 1.0
    assert case_metrics(cube(1), cube(0), [1], (1.0, 1.0, 3.0), nsd_tolerance_mm=3.0)[1]["nsd"] == pytest.approx(1.0)
    assert case_metrics(cube(1), cube(0), [1], (1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)[1]["hd95"] == pytest.approx(1.0)


def test_multiclass_values_equal_monai_directly():
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    def blobs():
        field = gaussian_filter(rng.normal(size=(24, 32, 32)), 3)
        return np.digitize(field, np.quantile(field, [0.6, 0.85])).astype(np.uint8)

    prediction, truth, spacing = blobs(), blobs(), (2.0, 0.8, 0.8)
    ours = case_metrics(prediction, truth, [1, 2], spacing, nsd_tolerance_mm=1.5)
    one_hot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a).long(), 3).permute(3, 0, 1, 2)[None].float()
    p, g = one_hot(prediction), one_hot(truth)
    dice = compute_dice(p, g, include_background=False)[0]
    nsd = compute_surface_dice(p, g, class_thresholds=[1.5, 1.5], include_background=False, spacing=spacing)[0]
    hd95 = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=spacing)[0]
    for index, value in enumerate((1, 2)):
        assert ours[value]["dsc"] == pytest.approx(float(dice[index]), rel=1e-6)
        assert ours[value]["nsd"] == pytest.approx(float(nsd[index]), rel=1e-6)
        assert ours[value]["hd95"] == pytest.approx(float(hd95[index]), rel=1e-6)


def test_empty_structures_follow_the_documented_conventions():
    empty, full = np.zeros((8, 8, 8), np.uint8), cube(0, size=4, start=2, shape=(8, 8, 8))
    assert case_metrics(empty, empty, [1], (1, 1, 1))[1] == {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0}
    for prediction, truth in ((empty, full), (full, empty)):
        result = case_metrics(prediction, truth, [1], (1, 1, 1))[1]
        assert result["dsc"] == 0.0 and result["nsd"] == 0.0 and math.isnan(result["hd95"])


def test_summary_leaves_out_and_counts_undefined_hd95():
    per_case = {"a": {1: {"dsc": 0.5, "nsd": 0.4, "hd95": 2.0}}, "b": {1: {"dsc": 0.0, "nsd": 0.0, "hd95": math.nan}},
                "c": {1: {"dsc": 1.0, "nsd": 0.8, "hd95": 4.0}}}
    summary = summarise(per_case, {1: "organ"})
    organ = summary["per_class"]["organ"]
    assert organ["dsc"]["mean"] == pytest.approx(0.5) and organ["dsc"]["sd"] == pytest.approx(0.5)
    assert organ["hd95"] == {"mean": 3.0, "sd": pytest.approx(math.sqrt(2)), "n": 2, "undefined": 1}
    assert summary["overall"]["nsd"]["mean"] == pytest.approx(0.4)


def write_case(folder, name, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for index, shift in enumerate((0, 1, 2)):
        truth = cube(0, shape=(20, 30, 30))
        truth[2:5, 2:5, 2:5] = 2
        prediction = cube(shift, shape=(20, 30, 30))
        write_case(gt, f"case_{index}", truth)
        write_case(pred, f"case_{index}", prediction)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2},
                                                       "file_ending": ".nii.gz"}))
    return tmp_path


def test_folder_evaluation_writes_every_report(folders):
    summary = evaluate_folders(folders / "pred", folders / "gt", folders / "dataset.json", out_dir=folders / "out",
                               num_processes=1)
    assert summary["per_class"]["liver"]["dsc"]["mean"] == pytest.approx((1.0 + 0.9 + 0.8) / 3)
    assert summary["per_class"]["tumour"]["dsc"]["mean"] == 0.0  # never predicted
    assert summary["per_class"]["tumour"]["hd95"]["undefined"] == 3
    per_case = (folders / "out" / "per_case.csv").read_text().splitlines()
    assert per_case[0] == "case,class,dsc,nsd,hd95" and len(per_case) == 1 + 3 * 2
    assert "| liver | 90.00 ± 10.00 |" in (folders / "out" / "summary.md").read_text()
    assert "overall (class-averaged),dsc,0.45" in (folders / "out" / "summary.csv").read_text()
    def refuse_nan(constant):
        raise AssertionError(f"summary.json is not strict JSON: {constant}")

    strict = json.loads((folders / "out" / "summary.json").read_text(), parse_constant=refuse_nan)
    assert strict["per_case"]["case_1"]["liver"]["dsc"] == pytest.approx(0.9)
    assert strict["per_case"]["case_1"]["tumour"]["hd95"] is None  # undefined: never predicted


def test_missing_and_extra_cases_are_named(folders):
    (folders / "pred" / "case_2.nii.gz").unlink()
    write_case(folders / "pred", "stray_case", cube(0, shape=(20, 30, 30)))
    with pytest.raises(EvaluationError) as info:
        evaluate_folders(folders / "pred", folders / "gt", folders / "dataset.json", num_processes=1)
    assert "missing predictions for 1 case(s): case_2" in str(info.value)
    assert "predictions without ground truth for 1 case(s): stray_case" in str(info.value)


@pytest.mark.parametrize("change,message", [
    (dict(spacing=(1.0, 1.0, 2.0)), "spacing"),
    (dict(origin=(5.0, 0.0, 0.0)), "origin"),
])
def test_misaligned_case_is_named(folders, change, message):
    write_case(folders / "pred", "case_1", cube(0, shape=(20, 30, 30)), **change)
    with pytest.raises(EvaluationError, match=rf"case case_1: prediction .* not aligned .*{message}"):
        evaluate_folders(folders / "pred", folders / "gt", folders / "dataset.json", num_processes=1)


def test_shape_mismatch_is_named(folders):
    write_case(folders / "pred", "case_0", np.zeros((20, 30, 31), np.uint8))
    with pytest.raises(EvaluationError, match=r"case case_0: .*size \(31, 30, 20\) vs ground truth \(30, 30, 20\)"):
        evaluate_folders(folders / "pred", folders / "gt", folders / "dataset.json", num_processes=1)


@pytest.mark.slow  # a CLI subprocess whose evaluation spawns its own worker pool
def test_evaluate_cli(folders):
    command = [sys.executable, "-m", "meddinov3_nnunet.cli", "evaluate", "--pred", str(folders / "pred"), "--gt",
               str(folders / "gt"), "--dataset-json", str(folders / "dataset.json"), "--nsd-tolerance", "2"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "NSD tolerance 2 mm" in result.stdout and (folders / "pred" / "summary.json").is_file()
    (folders / "pred" / "case_0.nii.gz").unlink()
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2 and "missing predictions for 1 case(s): case_0" in failed.stderr
