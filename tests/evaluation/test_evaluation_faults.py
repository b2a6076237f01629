"""Fault injection for `evaluate` and the volume reader: cut, empty and foreign files never pass silently, and a
failed run leaves no report (of its own or a stale one of an earlier run)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.evaluation.folder_evaluation import REPORT_FILES, EvaluationError, evaluate_folders
from meddinov3_nnunet.volume_io import VolumeError, read_volume, verify_file


def write(path, array, spacing=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def labels(shape=(12, 24, 24), value=1):
    array = np.zeros(shape, np.uint8)
    array[3:9, 6:18, 6:18] = value
    return array


@pytest.fixture
def folders(tmp_path):
    for case in ("a", "b"):
        write(tmp_path / "gt" / f"{case}.nii.gz", labels())
        write(tmp_path / "pred" / f"{case}.nii.gz", labels())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1},
                                                       "file_ending": ".nii.gz"}))
    return tmp_path


def run(folders, out=None):
    return evaluate_folders(folders / "pred", folders / "gt", folders / "dataset.json", num_processes=1,
                            out_dir=out or folders / "out")


# ---------------------------------------------------------------------------------------------
# the volume reader
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_volume_is_refused_in_every_format(tmp_path, ending):
    """SimpleITK itself returns a half-zero volume for a cut .nii.gz / .nii; the reader refuses every format."""
    path = tmp_path / f"v{ending}"
    write(path, (np.arange(12 * 24 * 24) % 251).reshape(12, 24, 24).astype(np.int16))
    assert read_volume(path).array.shape == (12, 24, 24)
    truncate(path)
    with pytest.raises(VolumeError, match=rf"{path.name}: (truncated|cannot be read)"):
        read_volume(path)


def test_silent_sitk_truncation_is_what_the_reader_guards_against(tmp_path):
    """The fault itself: SimpleITK reads the cut file without an error and fills zeros."""
    path = tmp_path / "v.nii.gz"
    write(path, np.random.default_rng(0).integers(1, 1000, (12, 24, 24)).astype(np.int16))
    truncate(path)
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 0).mean() > 0.3
    with pytest.raises(VolumeError, match="gzip stream ends before its end marker"):
        verify_file(path)


def test_uncompressed_nifti_short_of_its_header_voxel_count(tmp_path):
    path = tmp_path / "v.nii"
    write(path, np.ones((10, 20, 20), np.float32))
    truncate(path, 0.75)
    with pytest.raises(VolumeError, match=r"declares 4000 voxels \(20, 20, 10\) \(16352 bytes\) but the file holds "
                                          r"12264 bytes"):
        verify_file(path)


def test_complete_gzip_of_a_cut_nifti(tmp_path):
    """A whole gzip stream around a NIfTI that was cut before it was compressed: the voxel count catches it."""
    import gzip

    path = tmp_path / "v.nii"
    write(path, np.ones((10, 20, 20), np.int16))
    (tmp_path / "v.nii.gz").write_bytes(gzip.compress(path.read_bytes()[:5000]))
    with pytest.raises(VolumeError, match=r"v\.nii\.gz: truncated: the header declares 4000 voxels .* 5000 bytes"):
        read_volume(tmp_path / "v.nii.gz")


def test_an_uncompressed_file_named_nii_gz_still_reads(tmp_path):
    """Compression is told by content, as SimpleITK does: a plain NIfTI named .nii.gz is complete and reads."""
    write(tmp_path / "v.nii", np.arange(4000, dtype=np.int16).reshape(10, 20, 20))
    (tmp_path / "v.nii").rename(tmp_path / "plain.nii.gz")
    assert read_volume(tmp_path / "plain.nii.gz").array[9, 19, 19] == 3999


def test_damaged_gzip_crc(tmp_path):
    path = tmp_path / "v.nii.gz"
    write(path, (np.arange(4000) % 97).reshape(10, 20, 20).astype(np.int16))
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 / size trailer
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="damaged gzip data"):
        verify_file(path)


def test_zero_byte_folder_missing_and_2d(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(VolumeError, match="empty.nii.gz: empty file"):
        read_volume(tmp_path / "empty.nii.gz")
    with pytest.raises(VolumeError, match="is a folder, not a volume file"):
        read_volume(tmp_path)
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")
    write(tmp_path / "slice.nii.gz", np.ones((24, 24), np.int16))
    with pytest.raises(VolumeError, match=r"a 2D image \(24x24\); a 3D volume is needed"):
        read_volume(tmp_path / "slice.nii.gz")
    volume = read_volume(tmp_path / "slice.nii.gz", allow_2d=True)
    assert volume.array.shape == (1, 24, 24) and volume.spacing == (1.0, 1.0, 1.0)
    assert issubclass(VolumeError, InputError)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault,message", [
    (lambda p: truncate(p), r"a\.nii\.gz: truncated"),
    (lambda p: p.write_bytes(b""), r"a\.nii\.gz: empty file"),
])
def test_cut_or_empty_prediction_fails_and_removes_the_stale_report(folders, fault, message):
    summary = run(folders)
    assert summary["per_class"]["organ"]["dsc"]["mean"] == 1.0
    assert all((folders / "out" / name).is_file() for name in REPORT_FILES)
    fault(folders / "pred" / "a.nii.gz")
    with pytest.raises(VolumeError, match=message):
        run(folders)
    assert not any((folders / "out" / name).exists() for name in REPORT_FILES)


@pytest.mark.parametrize("folder,value,kind", [("pred", 5, "prediction"), ("gt", 7, "ground truth")])
def test_label_values_outside_dataset_json_are_refused(folders, folder, value, kind):
    array = labels()
    array[0, 0, :3] = value
    write(folders / folder / "b.nii.gz", array)
    with pytest.raises(EvaluationError, match=rf"case b: {kind} .*b\.nii\.gz holds label value\(s\) \[{value}\], "
                                              rf"which the labels \[0, 1\] do not define"):
        run(folders)
    assert not (folders / "out").exists()


def test_ignore_label_of_dataset_json_is_allowed(folders):
    (folders / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "ignore": 3}}))
    truth = labels()
    truth[0] = 3
    write(folders / "gt" / "a.nii.gz", truth)
    assert run(folders)["num_cases"] == 2


def test_2d_label_maps_are_evaluated(tmp_path):
    """2D datasets (one image per case) are accepted by evaluate, which documents it."""
    for folder, shift in (("gt", 0), ("pred", 2)):
        array = np.zeros((20, 20), np.uint8)
        array[5:15, 5 + shift:15 + shift] = 1
        write(tmp_path / folder / "x.nii.gz", array)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", num_processes=1)
    assert summary["per_class"]["label_1"]["dsc"]["mean"] == pytest.approx(0.8)


@pytest.mark.slow  # a CLI subprocess whose evaluation spawns its own worker pool
def test_cli_exit_code_and_message_for_a_truncated_file(folders):
    truncate(folders / "gt" / "b.nii.gz")
    result = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "evaluate", "--pred",
                             str(folders / "pred"), "--gt", str(folders / "gt"), "--dataset-json",
                             str(folders / "dataset.json"), "-np", "1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "b.nii.gz: truncated" in result.stderr
    assert "Traceback" not in result.stderr
