"""The project's one volume reader (pretraining corpus, `evaluate`, demo, probes): whole files or a clear error.

SimpleITK reads a NIfTI file cut short (a ``.nii.gz`` whose gzip stream ends early, or a ``.nii`` missing its
tail) without complaint and fills the missing voxels with zeros. `verify_file` therefore checks every file before
SimpleITK reads it:

* any gzip file (``.gz`` or gzip magic bytes) is decompressed to its end: a cut stream raises ``EOFError``, a
  damaged one fails its CRC;
* a NIfTI file's data size must cover the voxel count its header declares (``prod(shape) * bytes per voxel``
  after ``vox_offset``), read with nibabel;
* other formats (NRRD, MHA/MHD, DICOM) already fail in SimpleITK when their data is short.

Every failure is an `InputError` naming the file and the reason. 2D images (one slice) are refused unless the
caller passes ``allow_2d=True``; then they come back as a 1-slice volume. A caller that has verified this version
of a file (same `file_version`) may pass ``verify=False`` and save the extra decompression.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class VolumeError(InputError):
    """A volume file that cannot be used; the message names the file and the reason."""


@dataclass
class Volume:
    """A read volume: ``array`` (z, y, x), ``spacing`` (z, y, x) in mm, the SimpleITK ``image`` it came from."""

    path: str
    array: np.ndarray
    spacing: tuple[float, ...]
    image: object


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == _GZIP_MAGIC


def _gzip_size(path: Path) -> int:
    """Decompressed size in bytes, reading the whole stream (raises for a cut or damaged stream)."""
    size = 0
    with gzip.open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
    return size


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _nifti_expected_size(path: Path, compressed: bool) -> tuple[int, tuple[int, ...]]:
    """(bytes the header declares up to the last voxel, data shape), from the header only (NIfTI-1 or -2; gzip
    by content, not by name, as SimpleITK does)."""
    import nibabel

    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
        raw = handle.read(540)
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    header_class = nibabel.Nifti2Header if 540 in sizes else nibabel.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(raw))
    shape = tuple(int(s) for s in header.get_data_shape())
    return int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize, shape


def verify_file(path: str | os.PathLike) -> None:
    """Raises `VolumeError` unless ``path`` is a complete file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder, not a volume file")
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VolumeError(f"{path}: empty file (0 bytes); write or copy it again")
    compressed = _is_gzip(path)
    actual = None
    if compressed:
        try:
            actual = _gzip_size(path)
        except EOFError:
            raise VolumeError(f"{path}: truncated (the gzip stream ends before its end marker); the file was cut "
                              f"short while being written or copied; write or copy it again") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as err:
            raise VolumeError(f"{path}: damaged gzip data ({err}); write or copy it again") from None
    if _is_nifti(path):
        try:
            expected, shape = _nifti_expected_size(path, compressed)
        except Exception as err:  # nibabel raises several types for a damaged header
            raise VolumeError(f"{path}: not a readable NIfTI header ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if actual is None:
            actual = path.stat().st_size
        if actual < expected:
            raise VolumeError(f"{path}: truncated: the header declares {int(np.prod(shape))} voxels {shape} "
                              f"({expected} bytes) but the file holds {actual} bytes; write or copy it again")


def file_version(path: str | os.PathLike) -> list[int]:
    """``[size in bytes, modification time in ns]`` of a file: a rewritten or cut file gets another version."""
    stat = os.stat(path)
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def read_image(path: str | os.PathLike, series: str | None = None, allow_2d: bool = False, verify: bool = True):
    """A verified SimpleITK image (3D, or 2D when ``allow_2d``); ``series`` reads a DICOM series from a folder.
    ``verify=False``: no `verify_file`, for a file version the caller has verified before."""
    import SimpleITK as sitk

    path = str(path)
    try:
        if series is not None:
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series)
            if not names:
                raise VolumeError(f"{path}: DICOM series {series} has no files")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            if verify:
                verify_file(path)
            image = sitk.ReadImage(path)
    except RuntimeError as err:  # SimpleITK/ITK/GDCM raise RuntimeError for files they cannot read
        raise VolumeError(f"{path}: cannot be read as an image ({_itk_reason(err)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component pixels (colour or vector "
                          f"image); a grey volume is needed")
    dimension = image.GetDimension()
    if dimension == 2 and not allow_2d:
        raise VolumeError(f"{path}: a 2D image ({image.GetSize()[0]}x{image.GetSize()[1]}); a 3D volume is needed here")
    if dimension not in (2, 3):
        raise VolumeError(f"{path}: a {dimension}D image; only 3D volumes{' and 2D images' if allow_2d else ''} "
                          f"are supported")
    return image


def read_volume(path: str | os.PathLike, series: str | None = None, allow_2d: bool = False,
                orient_lps: bool = False, verify: bool = True) -> Volume:
    """`read_image` as an array (z, y, x) with spacing (z, y, x); a 2D image becomes one slice of spacing 1.
    ``orient_lps`` reorients a 3D volume so that axis 0 runs foot-to-head (axial slices)."""
    import SimpleITK as sitk

    image = read_image(path, series, allow_2d, verify)
    if orient_lps and image.GetDimension() == 3:
        image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)
    expected = int(np.prod(image.GetSize()))
    if array.size != expected:
        raise VolumeError(f"{path}: {array.size} voxels read, the header declares {expected}")
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if array.ndim == 2:
        array, spacing = array[None], (1.0,) + spacing
    return Volume(str(path), array, spacing, image)


def _itk_reason(err: BaseException) -> str:
    """The informative line of an ITK message (they start with a source path and an exception banner)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception thrown", "/"))]
    return (useful[0] if useful else (lines[-1] if lines else type(err).__name__))[:200]
