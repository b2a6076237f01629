"""The slice corpus (sources, normalisation, filters, skipped files, case lists) and the sharded slice stream."""
import json

import numpy as np
import pytest
import torch

from meddinov3_nnunet.pretraining import augment
from meddinov3_nnunet.pretraining.corpus import (Corpus, CorpusError, Source, build_corpus, make_case_filter,
                                                 parse_source, settings_from_config)
from meddinov3_nnunet.pretraining.stream import ShardPlan, SliceStream
from meddinov3_nnunet.pretraining.volumes import expand_ranges, normalise_slice, read_volume

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import ct_volume, dicom_series, mri_volume, nnunet_dataset, tiny_config, write_volume

SETTINGS = settings_from_config(tiny_config())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A CT folder (NIfTI + MHA + NRRD + a DICOM series + a damaged file + a label folder) and an nnU-Net MRI dataset."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    ct = root / "ct"
    write_volume(ct / "patient1.nii.gz", ct_volume(rng), spacing=(0.8, 0.8, 2.0))
    write_volume(ct / "sub" / "patient2.mha", ct_volume(rng, slices=5, empty_slices=2))
    write_volume(ct / "sub" / "patient4.nrrd", ct_volume(rng, slices=3))
    dicom_series(ct / "dicom" / "patient3", ct_volume(rng, slices=4))
    (ct / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    write_volume(ct / "labelsTr" / "patient1.nii.gz", np.ones((6, 40, 48), np.uint8))  # never read
    (ct / "notes.txt").write_text("ignored")
    mri = nnunet_dataset(root / "Dataset010_Toy", [f"toy_{i:03d}" for i in range(4)], {"0": "T2", "1": "CT"},
                         test_cases=["toy_100"])
    return root, ct, mri


def test_a_corpus_reads_folders_dicom_and_nnunet_datasets_and_names_skipped_files(sources, tmp_path):
    _, ct, mri = sources
    manifest = build_corpus([Source(str(ct)), Source(str(mri))], SETTINGS, tmp_path / "corpus.json", progress=False)
    on_disk = json.loads((tmp_path / "corpus.json").read_text())
    assert on_disk["totals"] == manifest["totals"]
    cases = {v["case"]: v for v in manifest["volumes"]}
    # CT folder: NIfTI, MHA and NRRD in a sub folder, one DICOM series; labelsTr never read; the damaged file skipped
    assert {"patient1", "sub/patient2", "sub/patient4", "dicom/patient3"} == {c for c in cases if "toy" not in c}
    assert all("labelsTr" not in v["path"] for v in manifest["volumes"])
    assert [s["path"] for s in manifest["skipped"]] == [str(ct / "broken.nii.gz")]
    assert manifest["skipped"][0]["reason"].startswith("unreadable")
    assert manifest["sources"][0]["kind"] == "folder" and manifest["sources"][0]["skipped"] == 1
    assert manifest["sources"][0]["ignored_files"] == 1  # notes.txt
    # empty (air-only) slices dropped: patient1 has 1, patient2 has 2
    assert cases["patient1"]["slices"] == [[1, 6]] and cases["sub/patient2"]["slices"] == [[2, 5]]
    assert cases["dicom/patient3"]["modality"] == "ct" and cases["dicom/patient3"]["spacing"][0] == 2.0
    # nnU-Net: both channels of imagesTr and imagesTs; modality per channel from dataset.json
    toy = [v for v in manifest["volumes"] if v["source"] == 1]
    assert len(toy) == 2 * 5
    assert {v["modality"] for v in toy if v["channel"] == 0} == {"mri"}
    assert {v["modality"] for v in toy if v["channel"] == 1} == {"ct"}
    assert manifest["sources"][1]["kind"] == "nnunet"
    assert manifest["totals"]["slices"] == sum(v["n_slices"] for v in manifest["volumes"])


def test_ct_is_clipped_and_zscored_with_the_medDINOv3_constants(sources, tmp_path):
    _, ct, _ = sources
    manifest = build_corpus([Source(str(ct / "patient1.nii.gz"))], SETTINGS, tmp_path / "c.json", progress=False)
    entry = manifest["volumes"][0]
    assert entry["norm"] == [-1000.0, 1000.0, 65.108, 178.017]
    array, spacing, _ = read_volume(entry["path"])
    assert spacing == pytest.approx((2.0, 0.8, 0.8))
    raw = np.array([[-2000, -1000, 0, 65.108, 1500]], dtype=np.float32)
    expected = (np.clip(raw, -1000, 1000) - 65.108) / 178.017
    np.testing.assert_allclose(normalise_slice(raw, entry["norm"]), expected, rtol=1e-6)


def test_mri_gets_a_robust_per_volume_zscore(tmp_path):
    volume = mri_volume(np.random.default_rng(1)).astype(np.float32)
    volume[0, 0, 0] = 10000  # an outlier must not dominate the statistics
    write_volume(tmp_path / "scan.nii.gz", volume)
    entry = build_corpus([parse_source(f"mri={tmp_path / 'scan.nii.gz'}")], SETTINGS, tmp_path / "c.json",
                         progress=False)["volumes"][0]
    assert entry["modality"] == "mri"
    low, high, offset, scale = entry["norm"]
    assert high < 1000
    values = np.concatenate([normalise_slice(volume[z], entry["norm"]).ravel() for z in range(volume.shape[0])])
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05


def test_case_lists_and_an_nnunet_fold_restrict_the_corpus(sources, tmp_path):
    _, _, mri = sources
    split = tmp_path / "splits_final.json"
    split.write_text(json.dumps([{"train": ["toy_000", "toy_001"], "val": ["toy_002", "toy_003"]}]))
    fold0 = build_corpus([Source(str(mri))], SETTINGS, tmp_path / "a.json", make_case_filter(split=str(split), fold=0),
                         channels=[0], progress=False)
    assert sorted(v["case"] for v in fold0["volumes"]) == ["toy_000", "toy_001"]  # no validation or test images
    assert fold0["filters"]["nnunet_split"]["fold"] == 0
    excluded = build_corpus([Source(str(mri))], SETTINGS, tmp_path / "b.json",
                            make_case_filter(exclude=["toy_000,toy_100"]), channels=[0], progress=False)
    assert sorted(v["case"] for v in excluded["volumes"]) == ["toy_001", "toy_002", "toy_003"]
    listed = tmp_path / "cases.txt"
    listed.write_text("toy_003\nmissing_case\n")
    included = build_corpus([Source(str(mri))], SETTINGS, tmp_path / "c.json", make_case_filter(include=[str(listed)]),
                            channels=[0], progress=False)
    assert [v["case"] for v in included["volumes"]] == ["toy_003"]
    assert included["filters"]["include_cases_not_found"] == ["missing_case"]
    with pytest.raises(CorpusError, match="no training list for fold 3"):
        make_case_filter(split=str(split), fold=3)


def test_empty_corpus_and_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="data path.*not found.*nowhere"):
        build_corpus([Source(str(tmp_path / "nowhere"))], SETTINGS, tmp_path / "c.json", progress=False)
    write_volume(tmp_path / "air" / "air.nii.gz", np.full((3, 16, 16), -1000, np.int16))
    with pytest.raises(CorpusError, match="the corpus is empty.*no slice passed the filters"):
        build_corpus([parse_source(f"ct={tmp_path / 'air'}")], SETTINGS, tmp_path / "c.json", progress=False)
    assert json.loads((tmp_path / "c.json").read_text())["skipped"][0]["path"].endswith("air.nii.gz")
    with pytest.raises(CorpusError, match="the corpus is empty"):
        Corpus.load(tmp_path / "c.json")


def test_a_manifest_built_with_other_settings_is_refused(sources, tmp_path):
    _, ct, _ = sources
    build_corpus([Source(str(ct / "patient1.nii.gz"))], SETTINGS, tmp_path / "c.json", progress=False)
    other = dict(SETTINGS, ct_hu_window=[-500.0, 500.0])
    with pytest.raises(CorpusError, match=r"other corpus settings.*ct_hu_window"):
        Corpus.load(tmp_path / "c.json", other)


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------
def fake_corpus(counts):
    volumes = [{"n_slices": int(c), "slices": [[0, int(c)]], "norm": [-1e9, 1e9, 0, 1], "shape": [int(c), 8, 8],
                "path": f"v{i}"} for i, c in enumerate(counts)]
    return Corpus("fake.json", {"volumes": volumes}, np.array(counts))


class RecordingStream(SliceStream):
    """Reads no files: slice z of volume v is an 8x8 image filled with 1000 v + z."""

    def _load(self, volume):
        return np.arange(self.corpus.counts[volume])[:, None, None] + 1000.0 * volume + np.zeros((1, 8, 8))


def identity(image, rng):
    return {"id": float(image[0, 0])}


def ids(items, rng):
    return {"ids": torch.tensor([item["id"] for item in items])}


def test_shards_of_ranks_and_workers_cover_each_epoch_once_without_overlap():
    counts = np.array([5, 3, 7, 2, 4, 6, 1, 8])
    seen = []
    for shard in range(4):  # e.g. 2 ranks x 2 workers
        plan = ShardPlan(counts, shard, 4, chunk_volumes=2, seed=3)
        samples = RecordingStream(fake_corpus(counts), 1, identity, ids, seed=3)._samples(plan, 0)
        epoch_size = int(counts[plan.epoch_volumes(0)].sum())
        seen += [(v, z) for v, z, _, _ in (next(samples) for _ in range(epoch_size))]
    assert sorted(seen) == sorted((v, z) for v, c in enumerate(counts) for z in range(c))
    with pytest.raises(ValueError, match="fewer than the 9 data shards"):
        ShardPlan(counts, 0, 9, 2, 0)


def test_a_resumed_stream_continues_with_exactly_the_batches_of_an_uninterrupted_one():
    corpus = fake_corpus([5, 3, 7, 2, 4, 6])
    def batches(start_step, workers, count, rank=0):
        stream = RecordingStream(corpus, 3, identity, ids, seed=1, rank=rank, world_size=2, num_workers=workers,
                                 chunk_volumes=2, start_step=start_step)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        iterator = iter(loader)
        return [next(iterator)["ids"].tolist() for _ in range(count)]

    for workers in (0, 2):
        straight = batches(0, workers, 7)
        assert batches(3, workers, 4) == straight[3:]
        assert batches(4, workers, 3) == straight[4:]
        other_rank = batches(0, workers, 7, rank=1)
        assert not set(map(tuple, straight)) & set(map(tuple, other_rank))


def test_multi_crop_gives_the_configured_crops_and_the_gram_crop_is_the_undistorted_global_crop():
    config = tiny_config("crops.gram_teacher_size=64", "crops.intensity_probability=0",
                         "crops.blur_probability=[0, 0, 0]")
    image = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    crops = augment.MultiCrop(config.crops)(image, np.random.default_rng(5))
    assert crops["global"].shape == (2, 1, 32, 32)
    assert crops["local"].shape == (2, 1, 16, 16)
    assert crops["gram"].shape == (2, 1, 64, 64)
    downsized = augment.TF.resize(crops["gram"], [32, 32], augment.BICUBIC, antialias=True)
    torch.testing.assert_close(downsized, crops["global"])
    again = augment.MultiCrop(config.crops)(image, np.random.default_rng(5))
    assert torch.equal(again["local"], crops["local"])  # a function of the generator alone


def test_block_masks_follow_dinov3s_counts_and_always_mask_something():
    rng = np.random.default_rng(0)
    masks = augment.block_masks(8, (4, 4), 0.5, (0.1, 0.5), rng)
    assert masks.shape == (8, 16)
    counts = sorted(masks.sum(1).tolist())
    assert counts == [0, 0, 0, 0, int(16 * 0.2), int(16 * 0.3), int(16 * 0.4), int(16 * 0.5)]
    tiny = augment.block_masks(4, (1, 1), 0.5, (0.1, 0.5), rng)
    assert tiny.sum() >= 1
    batch = augment.collate([{"global": torch.zeros(2, 1, 32, 32), "local": torch.zeros(3, 1, 16, 16)}] * 2, 16,
                            tiny_config().ibot, rng)
    assert batch["global_crops"].shape == (4, 1, 32, 32) and batch["local_crops"].shape == (6, 1, 16, 16)
    assert torch.equal(batch["mask_indices"], batch["masks"].flatten().nonzero().flatten())


def test_expand_ranges():
    assert expand_ranges([[1, 3], [5, 6]]).tolist() == [1, 2, 5]


def test_streaming_verifies_each_file_once_per_version_not_on_every_read(tmp_path, monkeypatch, caplog):
    """Verifying a .nii.gz decompresses it completely, then SimpleITK decompresses it again to read it."""
    import os

    from meddinov3_nnunet import volume_io

    rng = np.random.default_rng(0)
    paths = [write_volume(tmp_path / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=3, empty_slices=0))
             for i in range(2)]
    build_corpus([Source(str(tmp_path / "ct"))], SETTINGS, tmp_path / "c.json", progress=False)
    corpus = Corpus.load(tmp_path / "c.json")
    assert [v["file_version"] for v in corpus.volumes] == [volume_io.file_version(p) for p in paths]
    verified = []
    real = volume_io.verify_file
    monkeypatch.setattr(volume_io, "verify_file", lambda path: verified.append(os.path.basename(path)) or real(path))
    stream = SliceStream(corpus, 1, identity, ids, chunk_volumes=1)
    samples = stream._samples(ShardPlan(corpus.counts, 0, 1, 1, 0), 0)

    def read_epochs(epochs):
        for _ in range(epochs * corpus.num_slices):
            next(samples)

    read_epochs(3)
    assert verified == []  # the indexing verified these versions
    size, mtime = volume_io.file_version(paths[0])
    os.utime(paths[0], ns=(mtime + 10**9, mtime + 10**9))  # a new version (rewritten in place)
    read_epochs(3)
    assert verified == ["case0.nii.gz"]  # verified once, then remembered
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:len(data) // 2])  # cut short after indexing: caught by the verification
    with caplog.at_level("WARNING"):
        read_epochs(1)
    assert verified[1:2] == ["case1.nii.gz"] and "case1.nii.gz: truncated" in caplog.text


def test_loader_workers_use_one_simpleitk_thread():
    import SimpleITK as sitk

    from meddinov3_nnunet.pretraining.train import _worker_init

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    threads = torch.get_num_threads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
    try:
        _worker_init(0)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1 and torch.get_num_threads() == 1
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
        torch.set_num_threads(threads)


def test_parallel_indexing_reads_with_one_simpleitk_thread_per_process(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from meddinov3_nnunet.pretraining import corpus as corpus_module

    rng = np.random.default_rng(0)
    for i in range(2):
        write_volume(tmp_path / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=3, empty_slices=0))
    real = corpus_module.index_volume

    def recording(*args):  # runs in the (forked) indexing processes
        return {**real(*args), "threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}

    monkeypatch.setattr(corpus_module, "index_volume", recording)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)  # what the forked processes would inherit
    try:
        manifest = build_corpus([Source(str(tmp_path / "ct"))], SETTINGS, tmp_path / "c.json", workers=2,
                                progress=False)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert [v["threads"] for v in manifest["volumes"]] == [1, 1]
