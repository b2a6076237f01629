"""The slice corpus (MedDINOv3's CT-3M step): which volumes, which axial slices, how they are normalised.

A corpus is built once into a JSON *manifest* and then streamed (see `stream.py`); nothing here holds more
than one volume in memory.

Sources (``--data [ct=|mri=|auto=]PATH``, repeatable):

* an nnU-Net raw dataset (a folder with ``dataset.json`` and ``imagesTr``): ``imagesTr`` and ``imagesTs`` are
  read, ``labels*`` never; every channel file ``CASE_XXXX`` is its own grey volume (restrict with
  ``--channels``); the modality of channel X comes from ``channel_names[X]`` ('CT' -> CT, anything else ->
  per-volume z-score, called 'mri' here) unless the source names one;
* a folder: every NIfTI/NRRD/MHA/MHD file and every DICOM series (one per series instance UID, read with
  SimpleITK's ImageSeriesReader) below it, skipping folders named ``labels*``;
* a single volume file.

Every volume is reoriented to LPS so that array axis 0 runs foot-to-head and each ``array[z]`` is an axial
slice in radiological view. Normalisation: CT is clipped to ``ct_hu_window`` and z-scored with ``ct_zscore``
(what the released MedDINOv3 model expects); other modalities are clipped to their own ``mri_percentiles``
and z-scored with the clipped volume's mean and std. With modality 'auto', DICOM uses its Modality tag and
other files count as CT when their 1st percentile is below -500 (air in Hounsfield units).

A slice is kept when at least ``min_foreground_fraction`` of it is foreground (CT: above ``ct_air_hu``;
others: above the lower percentile) and its normalised std reaches ``min_slice_std``. A file that cannot be
read, or keeps no slice, is skipped, counted and named with the reason in the manifest.

Case filters (``--include-cases``, ``--exclude-cases``, ``--nnunet-split splits_final.json --fold F``) match a
volume's case identifier: the nnU-Net case name (``hippocampus_001``), or a file's path below its source
folder without the extension (its base name also matches), or a DICOM series folder's relative path.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from meddinov3_nnunet.atomic_io import write_text_atomic
from meddinov3_nnunet.errors import InputError

from .volumes import Candidate, index_volume, short_error

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "meddinov3_nnunet.corpus"
MANIFEST_VERSION = 1
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima", "")


class CorpusError(InputError):
    """A corpus that cannot be built or used; the message names the path and the fix."""


# ---------------------------------------------------------------------------------------------
# sources and case filters
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    path: str
    modality: str = "auto"


def parse_source(spec: str) -> Source:
    """``"/data/ct"`` or ``"ct=/data/ct"`` (modality one of auto, ct, mri)."""
    match = re.match(r"^(auto|ct|mri)=(.+)$", spec, flags=re.IGNORECASE)
    if match:
        return Source(match.group(2), match.group(1).lower())
    return Source(spec)


def read_case_list(value: str) -> list[str]:
    """Case identifiers from a file (a JSON list or one per line) or a comma-separated string."""
    if os.path.isfile(value):
        text = Path(value).read_text()
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{value}: not a valid JSON list of case identifiers ({err})") from None
        else:
            items = text.splitlines()
    else:
        if os.sep in value or value.endswith((".txt", ".json")):
            raise CorpusError(f"case list file {value} does not exist")
        items = value.split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def read_nnunet_split(path: str, fold: int) -> list[str]:
    """The training cases of ``fold`` in nnU-Net's ``splits_final.json`` (validation cases are left out)."""
    if not os.path.isfile(path):
        raise CorpusError(f"nnU-Net split file {path} does not exist (it is written to "
                          f"nnUNet_preprocessed/DATASET/splits_final.json by the first training run or planning)")
    try:
        splits = json.loads(Path(path).read_text())
        train = splits[fold]["train"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise CorpusError(f"{path}: no training list for fold {fold} (expected a list of "
                          f"{{'train': [...], 'val': [...]}} with at least {fold + 1} folds)") from None
    return [str(case) for case in train]


@dataclass
class CaseFilter:
    include: set[str] | None = None
    exclude: set[str] = field(default_factory=set)
    described: dict = field(default_factory=dict)

    def accepts(self, case: str) -> bool:
        names = {case, case.rsplit("/", 1)[-1]}
        if self.include is not None and not names & self.include:
            return False
        return not names & self.exclude


def make_case_filter(include: Sequence[str] = (), exclude: Sequence[str] = (), split: str | None = None,
                     fold: int | None = None) -> CaseFilter:
    include_set: set[str] | None = None
    described = {}
    for value in include:
        include_set = (include_set or set()) | set(read_case_list(value))
    if split is not None:
        if fold is None:
            raise CorpusError("--nnunet-split needs --fold (the fold whose training cases to keep)")
        train = set(read_nnunet_split(split, fold))
        include_set = train if include_set is None else include_set & train
        described["nnunet_split"] = {"file": str(split), "fold": fold, "train_cases": len(train)}
    elif fold is not None:
        raise CorpusError("--fold needs --nnunet-split PATH/TO/splits_final.json")
    exclude_set: set[str] = set()
    for value in exclude:
        exclude_set |= set(read_case_list(value))
    if include_set is not None:
        described["include_cases"] = len(include_set)
    if exclude_set:
        described["exclude_cases"] = len(exclude_set)
    return CaseFilter(include_set, exclude_set, described)


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _volume_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in VOLUME_SUFFIXES if lower.endswith(s)), None)


def _nnunet_modality(channel_names: dict, channel: int) -> str:
    name = str(channel_names.get(str(channel), channel_names.get(channel, "")))
    return "ct" if name.strip().lower() == "ct" else "mri"


def discover(index: int, source: Source, channels: set[int] | None) -> tuple[list[Candidate], list[dict], dict]:
    """Candidates of one source, files skipped at discovery (with reasons), and a summary."""
    root = Path(source.path)
    candidates: list[Candidate] = []
    skipped: list[dict] = []
    summary = {"path": str(root), "modality": source.modality, "kind": None, "ignored_files": 0}
    if root.is_file():
        summary["kind"] = "file"
        if _volume_suffix(root.name) is None:
            raise CorpusError(f"{root}: not a volume file (expected one of {', '.join(VOLUME_SUFFIXES)}); pass a "
                              f"folder for DICOM series")
        candidates.append(Candidate(index, str(root), root.name[:-len(_volume_suffix(root.name))], source.modality))
        return candidates, skipped, summary
    dataset_json = root / "dataset.json"
    if dataset_json.is_file() and (root / "imagesTr").is_dir():
        summary["kind"] = "nnunet"
        try:
            meta = json.loads(dataset_json.read_text())
        except json.JSONDecodeError as err:
            raise CorpusError(f"{dataset_json}: not valid JSON ({err}); fix it or pass the images folder itself") from None
        ending = meta.get("file_ending", ".nii.gz")
        channel_names = meta.get("channel_names", meta.get("modality", {}))
        pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
        for folder in ("imagesTr", "imagesTs"):
            if not (root / folder).is_dir():
                continue
            for path in sorted((root / folder).iterdir()):
                if path.name.startswith("."):
                    continue
                match = pattern.match(path.name)
                if not match:
                    skipped.append({"path": str(path), "reason": f"not named CASE_XXXX{ending} (nnU-Net raw layout)"})
                    continue
                channel = int(match.group(2))
                if channels is not None and channel not in channels:
                    continue
                modality = source.modality if source.modality != "auto" else _nnunet_modality(channel_names, channel)
                candidates.append(Candidate(index, str(path), match.group(1), modality, channel=channel))
        return candidates, skipped, summary
    summary["kind"] = "folder"
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.lower().startswith("labels") and not d.startswith("."))
        relative_dir = Path(directory).relative_to(root)
        dicom_like = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = _volume_suffix(name)
            if suffix is not None:
                case = str(relative_dir / name[:-len(suffix)]) if str(relative_dir) != "." else name[:-len(suffix)]
                candidates.append(Candidate(index, str(Path(directory) / name), case, source.modality))
            elif Path(name).suffix.lower() in DICOM_SUFFIXES:
                dicom_like.append(name)
            else:
                summary["ignored_files"] += 1
        if dicom_like:
            candidates_here, skipped_here = _discover_dicom(index, Path(directory), root, source.modality)
            candidates.extend(candidates_here)
            skipped.extend(skipped_here)
            if not candidates_here and not skipped_here:
                summary["ignored_files"] += len(dicom_like)
    return candidates, skipped, summary


def _discover_dicom(index: int, directory: Path, root: Path, modality: str) -> tuple[list[Candidate], list[dict]]:
    import SimpleITK as sitk

    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    except Exception as err:  # GDCM raises plain RuntimeError for unreadable folders
        return [], [{"path": str(directory), "reason": f"DICOM folder could not be scanned ({short_error(err)})"}]
    has_dcm = any(p.suffix.lower() in (".dcm", ".ima") for p in directory.iterdir())
    if not series_ids:
        if has_dcm:
            return [], [{"path": str(directory), "reason": "files named .dcm/.ima but no readable DICOM series"}]
        return [], []
    relative = str(directory.relative_to(root)) if directory != root else directory.name
    out = []
    for series in series_ids:
        case = relative if len(series_ids) == 1 else f"{relative}/{series}"
        out.append(Candidate(index, str(directory), case, modality, series=series))
    return out, []


def _index_star(args):
    return index_volume(*args)


def _one_reader_thread() -> None:
    """Indexing processes read in parallel already: SimpleITK one thread each instead of one per core."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------
def check_sources_exist(sources: Sequence[Source]) -> None:
    missing = [s.path for s in sources if not os.path.exists(s.path)]
    if missing:
        raise CorpusError(f"data path(s) not found: {', '.join(missing)}. Pass existing folders or files with --data.")


def build_corpus(sources: Sequence[Source], settings: dict, output: str | os.PathLike, case_filter: CaseFilter | None = None,
                 channels: Sequence[int] | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Indexes every source, writes the manifest to ``output`` (atomically) and returns it.

    Raises `CorpusError` for missing paths (before reading anything) and for a corpus without slices (after
    writing the manifest, so the skipped files and their reasons can be read there)."""
    if not sources:
        raise CorpusError("no data: pass at least one --data PATH (nnU-Net raw dataset, folder of volumes / DICOM, or file)")
    check_sources_exist(sources)
    case_filter = case_filter or CaseFilter()
    channel_set = set(channels) if channels is not None else None
    candidates: list[Candidate] = []
    skipped: list[dict] = []
    summaries = []
    filtered_out = 0
    for index, source in enumerate(sources):
        found, skipped_here, summary = discover(index, source, channel_set)
        kept = [c for c in found if case_filter.accepts(c.case)]
        filtered_out += len(found) - len(kept)
        for item in skipped_here:
            item["source"] = index
        candidates.extend(kept)
        skipped.extend(skipped_here)
        summaries.append(summary)

    started = time.time()
    jobs = [(c, settings) for c in candidates]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_reader_thread) as pool:
            results = pool.map(_index_star, jobs, chunksize=4)
            results = list(_progress(results, len(jobs), progress))
    else:
        results = [index_volume(*job) for job in _progress(jobs, len(jobs), progress)]

    volumes = []
    for candidate, result in zip(candidates, results):
        if "skipped" in result:
            skipped.append({"path": candidate.path + (f" (series {candidate.series})" if candidate.series else ""),
                            "reason": result["skipped"], "source": candidate.source})
        else:
            volumes.append(result)
    for index, summary in enumerate(summaries):
        mine = [v for v in volumes if v["source"] == index]
        summary.update(volumes=len(mine), slices=sum(v["n_slices"] for v in mine),
                       skipped=sum(1 for s in skipped if s["source"] == index),
                       modalities={m: sum(1 for v in mine if v["modality"] == m) for m in ("ct", "mri")})
    found_cases = {c.case for c in candidates} | {c.case.rsplit("/", 1)[-1] for c in candidates}
    filters = dict(case_filter.described)
    if case_filter.include is not None:
        not_found = sorted(case_filter.include - found_cases)
        filters["include_cases_not_found"] = not_found[:50]
        filters["include_cases_not_found_count"] = len(not_found)
    filters["volumes_filtered_out"] = filtered_out
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "indexing_seconds": round(time.time() - started, 1),
        "settings": dict(settings), "channels": sorted(channel_set) if channel_set is not None else "all",
        "filters": filters,
        "totals": {"volumes": len(volumes), "slices": sum(v["n_slices"] for v in volumes), "skipped": len(skipped)},
        "sources": summaries, "skipped": skipped, "volumes": volumes,
    }
    write_text_atomic(output, json.dumps(manifest, indent=1))
    if not volumes:
        reasons = sorted({s["reason"].split(" (")[0] for s in skipped})
        raise CorpusError(
            f"the corpus is empty: {len(candidates)} volume(s) found after case filters, {len(skipped)} skipped "
            f"({'; '.join(reasons) or 'none found'}). Details: {output}. Check the --data paths, the case filters "
            f"and the corpus settings (e.g. corpus.min_foreground_fraction).")
    return manifest


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="indexing volumes", unit="vol", dynamic_ncols=True)


@dataclass
class Corpus:
    """A loaded manifest: volumes with their kept slices, and per-volume slice counts."""

    path: str
    manifest: dict
    counts: np.ndarray  # kept slices per volume

    @property
    def volumes(self) -> list[dict]:
        return self.manifest["volumes"]

    @property
    def num_slices(self) -> int:
        return int(self.counts.sum())

    def __len__(self) -> int:
        return len(self.volumes)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: dict | None = None) -> "Corpus":
        path = str(path)
        if not os.path.isfile(path):
            raise CorpusError(f"corpus manifest {path} does not exist; build one with `meddinov3-nnunet pretrain "
                              f"--data ... --corpus-only` or pass --data")
        try:
            manifest = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}: not a corpus manifest (invalid JSON: {err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CorpusError(f"{path}: not a corpus manifest written by meddinov3-nnunet")
        if manifest.get("format_version") != MANIFEST_VERSION:
            raise CorpusError(f"{path}: manifest version {manifest.get('format_version')} is not supported; rebuild it")
        if settings is not None:
            saved = manifest.get("settings", {})
            changed = [f"corpus.{k}: {saved.get(k)!r} (manifest) vs {v!r} (config)" for k, v in settings.items()
                       if saved.get(k) != v]
            if changed:
                raise CorpusError(f"{path} was built with other corpus settings ({'; '.join(changed)}). Rebuild it "
                                  f"with --data, or use the settings it was built with.")
        if not manifest.get("volumes"):
            raise CorpusError(f"{path}: the corpus is empty (0 volumes); see its 'skipped' list for reasons")
        counts = np.array([v["n_slices"] for v in manifest["volumes"]], dtype=np.int64)
        return cls(path, manifest, counts)


def settings_from_config(config) -> dict:
    return asdict(config.corpus)
