"""More hand-computed references for `evaluate`: anisotropic spacing along z read from the image headers,
2D label maps, other file endings, MONAI's own empty-case values (which our convention table overrides),
a rotated image grid, and the CLI's --out folder.

Surface voxels are MONAI's: mask XOR its erosion; a 10-voxel cube has 10^3 - 8^3 = 488 of them, a 10-pixel
square 10^2 - 8^2 = 36. NSD counts boundary elements within the tolerance (<=) of the other boundary.
"""
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3_nnunet.evaluation.folder_evaluation import EvaluationError, evaluate_folders
from meddinov3_nnunet.evaluation.segmentation_metrics import case_metrics


def cube(shift: int = 0, axis: int = 0, size: int = 10, start: int = 8, shape=(30, 30, 30)) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    index = [slice(start, start + size)] * 3
    index[axis] = slice(start + shift, start + size + shift)
    volume[tuple(index)] = 1
    return volume


def square(shift: int = 0) -> np.ndarray:
    image = np.zeros((20, 20), np.uint8)
    image[4 + shift:14 + shift, 4:14] = 1
    return image


def write(path, array, spacing, direction=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def test_shift_along_thick_slices():
    """Cube shifted by one 3 mm slice along z (array axis 0), in-plane spacing 1 mm, tolerance 2 mm.
    Failing boundary voxels per surface: the 100 voxels of the shifted z face (3 mm away) and the 16 inner
    voxels of the overlapping z face that are more than 2 mm in-plane from the side faces -> NSD = 372/488.
    HD95 = 3 mm (116 of 488 distances are 3 mm, more than 5 %)."""
    result = case_metrics(cube(1, axis=0), cube(0), [1], (3.0, 1.0, 1.0), nsd_tolerance_mm=2.0)[1]
    assert result["dsc"] == pytest.approx(0.9)
    assert result["nsd"] == pytest.approx(372 / 488, rel=1e-6)
    assert result["hd95"] == pytest.approx(3.0)
    # the same shift in-plane is only 1 mm: every boundary voxel is within 2 mm
    in_plane = case_metrics(cube(1, axis=2), cube(0), [1], (3.0, 1.0, 1.0), nsd_tolerance_mm=2.0)[1]
    assert in_plane["nsd"] == pytest.approx(1.0) and in_plane["hd95"] == pytest.approx(1.0)


def test_two_dimensional_label_maps():
    """10-pixel square shifted one 2 mm row along y; x spacing 0.5 mm; tolerance 1 mm. Failing: the shifted
    row (10 pixels, 2 mm) and the 4 inner pixels of the overlapping row farther than 1 mm from the side
    columns (1.5, 2, 2, 1.5 mm) -> NSD = 22/36; HD95 = 2 mm."""
    result = case_metrics(square(1), square(0), [1], (2.0, 0.5), nsd_tolerance_mm=1.0)[1]
    assert result["dsc"] == pytest.approx(0.9)
    assert result["nsd"] == pytest.approx(22 / 36, rel=1e-6)
    assert result["hd95"] == pytest.approx(2.0)


def test_monai_leaves_empty_structures_undefined_where_our_table_decides():
    """MONAI returns NaN NSD and HD95 when both masks are empty and NaN HD95 when one is; the documented
    convention counts both-empty as perfect (NSD 1, HD95 0) and keeps one-empty HD95 undefined."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    empty = torch.zeros(1, 1, 8, 8, 8)
    full = empty.clone()
    full[..., 2:6, 2:6, 2:6] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = lambda p, g: float(compute_surface_dice(p, g, [1.0], include_background=True)[0, 0])
        hd95 = lambda p, g: float(compute_hausdorff_distance(p, g, include_background=True, percentile=95)[0, 0])
        assert math.isnan(nsd(empty, empty)) and math.isnan(hd95(empty, empty))
        assert nsd(full, empty) == 0.0 and nsd(empty, full) == 0.0
        assert math.isnan(hd95(full, empty)) and math.isnan(hd95(empty, full))
    assert case_metrics(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), [1], (1, 1, 1))[1] == \
        {"dsc": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_spacing_comes_from_the_image_headers_in_array_order(tmp_path):
    """NRRD files (dataset.json file_ending) with 3 mm slices: the evaluation must pair SimpleITK's (x, y, z)
    spacing with the array's (z, y, x) axes, giving the thick-slice numbers above, not 1 mm ones."""
    for folder, shift in (("gt", 0), ("pred", 1)):
        write(tmp_path / folder / "case_a.nrrd", cube(shift, axis=0), spacing=(1.0, 1.0, 3.0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1},
                                                       "file_ending": ".nrrd"}))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "dataset.json", nsd_tolerance_mm=2.0,
                               out_dir=tmp_path / "out", num_processes=1)
    organ = summary["per_case"]["case_a"]["organ"]
    assert organ["hd95"] == pytest.approx(3.0) and organ["nsd"] == pytest.approx(372 / 488, rel=1e-6)


def test_two_dimensional_files_without_dataset_json(tmp_path):
    """2D .nrrd label maps, class names from the ground-truth values, file ending given explicitly."""
    for folder, shift in (("gt", 0), ("pred", 1)):
        write(tmp_path / folder / "slice_1.nrrd", square(shift), spacing=(0.5, 2.0))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", out_dir=tmp_path / "out", num_processes=1,
                               file_ending=".nrrd")
    assert list(summary["per_class"]) == ["label_1"]
    assert summary["per_case"]["slice_1"]["label_1"]["nsd"] == pytest.approx(22 / 36, rel=1e-6)


def test_rotated_prediction_grid_is_named(tmp_path):
    write(tmp_path / "gt" / "case_r.nii.gz", cube(0), spacing=(1.0, 1.0, 1.0))
    write(tmp_path / "pred" / "case_r.nii.gz", cube(0), spacing=(1.0, 1.0, 1.0),
          direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(EvaluationError, match=r"case case_r: .*not aligned.*direction differs"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", num_processes=1)


@pytest.mark.slow  # a CLI subprocess whose evaluation spawns its own worker pool
def test_cli_writes_reports_to_out_and_leaves_predictions_alone(tmp_path):
    for folder, shift in (("gt", 0), ("pred", 2)):
        write(tmp_path / folder / "case_b.nii.gz", cube(shift, axis=2), spacing=(1.0, 1.0, 1.0))
    result = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "evaluate", "--pred", str(tmp_path / "pred"),
                             "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "report"), "-np", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["per_case.csv", "summary.csv", "summary.json",
                                                                       "summary.md"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case_b.nii.gz"]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["per_class"]["label_1"]["dsc"]["mean"] == pytest.approx(0.8)
    assert summary["per_class"]["label_1"]["hd95"]["mean"] == pytest.approx(2.0)
    assert "| **mean (class-averaged)** | 80.00 | 72.13 | 2.00 |" in (tmp_path / "report" / "summary.md").read_text()


def test_reports_are_written_whole_with_ordinary_permissions(tmp_path):
    import os
    import stat

    from meddinov3_nnunet.atomic_io import write_text_atomic

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "summary.md", "table\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "summary.md").stat().st_mode) == 0o644
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "summary.md", None)  # a failed write leaves the old file and no temporary
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"] and (tmp_path / "summary.md").read_text() == "table\n"


def test_print_and_write_prints_the_report_and_writes_it_only_when_given_a_path(tmp_path, capsys):
    from meddinov3_nnunet.atomic_io import print_and_write

    print_and_write("| a | b |\n", tmp_path / "sub" / "table.md")
    print_and_write("not written\n", None)
    assert capsys.readouterr().out == "| a | b |\n\nnot written\n\n"
    assert [p.name for p in tmp_path.rglob("*")] == ["sub", "table.md"]
    assert (tmp_path / "sub" / "table.md").read_text() == "| a | b |\n"
