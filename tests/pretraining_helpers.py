"""Small synthetic volumes, datasets and recipes for the pretraining tests (fixed seeds, written with SimpleITK)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pytest
import torch

from meddinov3_nnunet.pretraining.config import load_config

# A recipe that trains in well under a second per step on a CPU: 32 px global / 16 px local crops, tiny heads.
TINY_TEST_OVERRIDES = [
    "crops.global_size=32", "crops.local_size=16", "crops.local_number=2", "optim.batch_size=4",
    "optim.iterations=6", "optim.lr.warmup_iterations=2", "optim.teacher_temp.warmup_iterations=2",
    "optim.teacher_temp.start=0.04", "optim.teacher_temp.peak=0.07", "optim.teacher_temp.end=0.07",
    "optim.freeze_last_layer_iterations=1", "dino.head_prototypes=64", "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_prototypes=48", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "data.num_workers=0", "data.chunk_volumes=2", "train.checkpoint_every=100", "train.keep_every=100",
    "model.drop_path_rate=0.1",  # so that a resume must restore the RNG state to match
]


def tiny_config(*extra: str):
    return load_config("tiny_cpu", TINY_TEST_OVERRIDES + list(extra))


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    """``array`` is (z, y, x); written with an identity direction (LPS), so it reads back unchanged."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def ct_volume(rng: np.random.Generator, slices: int = 6, height: int = 40, width: int = 48,
              empty_slices: int = 1) -> np.ndarray:
    """int16 HU: air around an elliptic 'body' (soft tissue with noise and a bright 'bone'); the first
    ``empty_slices`` slices are air only (they must be dropped)."""
    z, y, x = np.mgrid[0:slices, 0:height, 0:width]
    body = ((y - height / 2) / (height * 0.4)) ** 2 + ((x - width / 2) / (width * 0.4)) ** 2 < 1
    volume = np.full((slices, height, width), -1000.0)
    volume[body] = 40 + 30 * rng.standard_normal(body.sum())
    bone = ((y - height / 2) ** 2 + (x - width / 2) ** 2) < 16
    volume[bone] = 700
    volume[:empty_slices] = -1000
    return volume.astype(np.int16)


def tiny_ct_manifest(root: Path) -> Path:
    """A corpus manifest of 4 small synthetic CT volumes (4 slices each) under ``root``, for tiny_config's runs."""
    from meddinov3_nnunet.pretraining.corpus import Source, build_corpus, settings_from_config

    rng = np.random.default_rng(0)
    for i in range(4):
        write_volume(root / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=4, empty_slices=0))
    build_corpus([Source(str(root / "ct"))], settings_from_config(tiny_config()), root / "corpus.json", progress=False)
    return root / "corpus.json"


def mri_volume(rng: np.random.Generator, slices: int = 6, height: int = 24, width: int = 20) -> np.ndarray:
    base = 100 + 40 * np.sin(np.linspace(0, 3, width))[None, None, :] + 20 * rng.standard_normal((slices, height, width))
    return np.clip(base, 0, 255).astype(np.uint8)


def nnunet_dataset(root: Path, cases: list[str], channel_names: dict, seed: int = 0, test_cases: list[str] = (),
                   modality_volume=mri_volume) -> Path:
    """nnU-Net raw layout with imagesTr (+ labelsTr, which the corpus must ignore) and imagesTs."""
    rng = np.random.default_rng(seed)
    for folder, names in (("imagesTr", cases), ("imagesTs", test_cases)):
        for case in names:
            for channel in channel_names:
                write_volume(root / folder / f"{case}_{int(channel):04d}.nii.gz", modality_volume(rng))
            if folder == "imagesTr":
                write_volume(root / "labelsTr" / f"{case}.nii.gz", np.zeros((6, 24, 20), np.uint8))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": {"background": 0, "a": 1}, "numTraining": len(cases),
        "file_ending": ".nii.gz"}))
    return root


def dicom_series(folder: Path, array: np.ndarray, modality: str = "CT", series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> Path:
    """One DICOM file per slice with the tags GDCM needs to group and order them."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        image = sitk.GetImageFromArray(array[z].astype(np.int16))
        for tag, value in (("0008|0060", modality), ("0020|000e", series_uid), ("0020|000d", series_uid + ".9"),
                           ("0008|0018", f"{series_uid}.{z + 100}"), ("0020|0013", str(z + 1)),
                           ("0020|0032", f"0\\0\\{2.0 * z}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0028|0030", "1\\1"), ("0018|0050", "2.0"), ("0028|1052", "0"), ("0028|1053", "1")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(image)
    return folder


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers module-scoped runs
def one_torch_thread():
    """Tiny models run fastest single-threaded; with 2 threads on busy shared cores OpenMP waits dominate
    (measured 10-15x slower). Import this fixture into a test module to apply it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_ranks(target, world_size: int = 2, args: tuple = (), collective_timeout_s: float = 30.0) -> None:
    """``target(rank, *args)`` in ``world_size`` spawned processes set up as torchrun sets them up (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each with a gloo default group whose collectives time out after
    ``collective_timeout_s`` (a stand-in for NCCL's 10 minutes). ``target`` must be a module-level function; an
    exception in any rank fails the call with that rank's traceback."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_entry, args=(world_size, port, collective_timeout_s, target, args), nprocs=world_size, join=True)


def _rank_entry(rank: int, world_size: int, port: int, timeout_s: float, target, args: tuple) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        target(rank, *args)
    finally:
        if dist.is_initialized():  # a whole `pretrain` run destroys its process groups itself when it ends
            dist.destroy_process_group()
