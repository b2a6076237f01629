"""Reading one volume and turning it into normalised axial slices: the per-volume half of the corpus.

`read_volume` reads a file or a DICOM series with the project's verified reader (`meddinov3_nnunet.volume_io`:
a cut or empty file is an error, never a zero-filled volume; 2D images are refused, the corpus takes 3D volumes),
reoriented to LPS so that ``array[z]`` is an axial slice; `index_volume` decides a volume's modality, its normalisation ``[low, high, offset, scale]`` and
the slices that pass the filters (see `corpus` for the rules); `normalise_slice` applies the normalisation
when slices are streamed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from meddinov3_nnunet import volume_io


@dataclass
class Candidate:
    """A volume to index."""

    source: int
    path: str  # a file, or the folder of a DICOM series
    case: str
    modality: str  # 'auto' | 'ct' | 'mri'
    channel: int | None = None
    series: str | None = None  # DICOM series instance UID


def read_volume(path: str, series: str | None = None,
                verify: bool = True) -> tuple[np.ndarray, tuple[float, float, float], "object"]:
    """Array (z, y, x) in LPS orientation (axial slices along axis 0), spacing (z, y, x) in mm, and the image.
    The one place the pretraining code reads a volume (indexing, streaming); raises `VolumeError` naming the
    file and the reason. ``verify=False`` skips the complete-file check (see `volume_io`)."""
    volume = volume_io.read_volume(path, series=series, orient_lps=True, verify=verify)
    return volume.array, volume.spacing, volume.image


def dicom_modality(path: str, series: str) -> str | None:
    import SimpleITK as sitk

    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series)
    reader = sitk.ImageFileReader()
    reader.SetFileName(names[0])
    reader.ReadImageInformation()
    if reader.HasMetaDataKey("0008|0060"):
        return reader.GetMetaData("0008|0060").strip().upper()
    return None


def normalise_slice(raw: np.ndarray, norm: Sequence[float]) -> np.ndarray:
    """``(clip(raw, low, high) - offset) / scale`` as float32, with ``norm = [low, high, offset, scale]``."""
    low, high, offset, scale = norm
    return ((np.clip(raw.astype(np.float32), low, high) - offset) / scale).astype(np.float32)


def subsample(array: np.ndarray, limit: int = 4_000_000) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


def slice_ranges(indices: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b) for a, b in ranges])


def guess_modality(array: np.ndarray) -> str:
    """For volumes without a DICOM modality tag: CT if the 1st percentile is below -500 (air in HU), else MRI."""
    return "ct" if float(np.percentile(subsample(array), 1.0)) < -500 else "mri"


def volume_normalisation(array: np.ndarray, modality: str, settings: dict) -> list[float] | None:
    """``[low, high, offset, scale]`` for `normalise_slice`: CT clipped to the HU window and z-scored with the
    corpus constants; MRI clipped to its own percentiles and z-scored per volume (None for a constant volume)."""
    if modality == "ct":
        low, high = settings["ct_hu_window"]
        offset, scale = settings["ct_zscore"]
    else:
        sample = subsample(array).astype(np.float64)
        low, high = (float(v) for v in np.percentile(sample, settings["mri_percentiles"]))
        clipped = np.clip(sample, low, high)
        offset, scale = float(clipped.mean()), float(clipped.std())
        if not np.isfinite(scale) or scale < 1e-8 or high <= low:
            return None
    return [float(low), float(high), float(offset), float(scale)]


def index_volume(candidate: Candidate, settings: dict) -> dict:
    """Reads one volume and decides its modality, normalisation and kept slices. Returns a manifest entry,
    or ``{'skipped': reason}`` (never raises for a bad file)."""
    try:  # taken before reading: a file changed during the read gets re-verified when streamed
        version = None if candidate.series else volume_io.file_version(candidate.path)
    except OSError:
        version = None  # read_volume names what is wrong
    try:
        array, spacing, _ = read_volume(candidate.path, candidate.series)
    except volume_io.VolumeError as err:  # cut, empty, damaged, 2D, colour: the reader names the reason
        return {"skipped": f"unreadable: {str(err).removeprefix(candidate.path + ': ')}"}
    try:
        modality = candidate.modality
        if modality == "auto":
            tag = dicom_modality(candidate.path, candidate.series) if candidate.series else None
            if tag is not None:
                modality = "ct" if tag == "CT" else "mri"
            else:
                modality = guess_modality(array)
        norm = volume_normalisation(array, modality, settings)
        if norm is None:
            return {"skipped": "constant volume (no intensity variation)"}
        foreground_level = settings["ct_air_hu"] if modality == "ct" else norm[0]
        kept = []
        for start in range(0, array.shape[0], 16):
            slab = array[start:start + 16]
            foreground = (slab > foreground_level).reshape(slab.shape[0], -1).mean(axis=1)
            stds = normalise_slice(slab, norm).reshape(slab.shape[0], -1).std(axis=1)
            for offset_z, (fg, sd) in enumerate(zip(foreground, stds)):
                if fg >= settings["min_foreground_fraction"] and sd >= settings["min_slice_std"]:
                    kept.append(start + offset_z)
        if not kept:
            return {"skipped": f"no slice passed the filters (empty or near-constant; {array.shape[0]} slices)"}
        entry = {
            "case": candidate.case, "source": candidate.source, "path": candidate.path, "modality": modality,
            "shape": [int(s) for s in array.shape], "spacing": [round(s, 6) for s in spacing], "norm": norm,
            "slices": slice_ranges(kept), "n_slices": len(kept),
        }
        if version is not None:  # [size, mtime ns] of the verified file: streaming verifies it again only if changed
            entry["file_version"] = version
        if candidate.series is not None:
            entry["series"] = candidate.series
        if candidate.channel is not None:
            entry["channel"] = candidate.channel
        return entry
    except Exception as err:
        return {"skipped": f"could not be indexed ({short_error(err)})"}


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = next((line.strip() for line in text if line.strip() and not line.startswith(("/", "  "))), "")
    return f"{type(err).__name__}: {message}"[:200] if message else type(err).__name__
