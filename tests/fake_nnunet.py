"""Fake nnU-Net folders for benchmark tests: paths in the environment and label files."""
import numpy as np
import SimpleITK as sitk


def nnunet_paths(tmp_path, monkeypatch) -> None:
    """Empty raw / preprocessed / results folders under ``tmp_path``, exported as nnU-Net's variables."""
    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))


def write_label(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))
