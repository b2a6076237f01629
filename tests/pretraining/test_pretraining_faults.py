"""Fault injection for pretraining: bad volumes in the corpus, temporaries of killed writes, a damaged checkpoint.pth
on --resume, and a kill during run-checkpoint writes."""
import json
import os

import numpy as np
import pytest
import torch

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.models.checkpoints import CheckpointError
from meddinov3_nnunet.pretraining import run_checkpoint
from meddinov3_nnunet.pretraining.corpus import Source, build_corpus, settings_from_config
from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint, remove_interrupted_writes
from meddinov3_nnunet.pretraining.train import PretrainingRun

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import ct_volume, tiny_config, write_volume
from process_helpers import kill_writer_after


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_corpus_skips_counts_and_names_cut_empty_and_2d_files(tmp_path):
    """SimpleITK alone indexed the cut file as a good volume with zero-filled slices."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "ct"
    for name in ("good", "cut", "empty"):
        write_volume(folder / f"{name}.nii.gz", ct_volume(rng, slices=8, empty_slices=0))
    truncate(folder / "cut.nii.gz")
    (folder / "empty.nii.gz").write_bytes(b"")
    write_volume(folder / "slice.nii.gz", ct_volume(rng, slices=1, empty_slices=0)[0])
    manifest = build_corpus([Source(str(folder))], settings_from_config(tiny_config()), tmp_path / "c.json",
                            progress=False)
    assert [v["case"] for v in manifest["volumes"]] == ["good"] and manifest["volumes"][0]["n_slices"] == 8
    reasons = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "cut.nii.gz": "unreadable: truncated (the gzip stream ends before its end marker); the file was cut short "
                      "while being written or copied; write or copy it again",
        "empty.nii.gz": "unreadable: empty file (0 bytes); write or copy it again",
        "slice.nii.gz": "unreadable: a 2D image (48x40); a 3D volume is needed here",
    }
    assert manifest["totals"]["skipped"] == 3 and manifest["sources"][0]["skipped"] == 3
    assert json.loads((tmp_path / "c.json").read_text())["totals"] == manifest["totals"]


def test_temporaries_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    leftovers = [".checkpoint.pth.k2f_9x.tmp", ".loss_curves.png.a8Qz1p.tmp", ".metrics.jsonl.zz0011.tmp"]
    kept = ["checkpoint.pth", "checkpoint_step0000004.pth", "loss_curves.png", "notes.tmp", ".hidden"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_interrupted_writes(tmp_path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_interrupted_writes(tmp_path / "absent") == []


def save_run_checkpoints(run_dir, steps):
    for step in steps:
        run_checkpoint.save({"step": step, "weights": torch.full((4,), float(step))}, run_dir / "checkpoint.pth",
                            run_dir / run_checkpoint.kept_name(step))


def test_a_damaged_checkpoint_points_to_the_newest_intact_kept_copy(tmp_path):
    save_run_checkpoints(tmp_path, (2, 4, 6))
    truncate(tmp_path / "checkpoint.pth")
    truncate(tmp_path / "checkpoint_step0000006.pth")  # the newest kept copy is damaged too
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: cannot be read as a PyTorch checkpoint .* The "
                                              r"newest intact kept copy is .*checkpoint_step0000004\.pth \(step 4\)"):
        load_run_checkpoint(tmp_path / "checkpoint.pth")
    # following the advice resumes from step 4
    intact = run_checkpoint.newest_intact_kept(tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(intact.read_bytes())
    assert load_run_checkpoint(tmp_path / "checkpoint.pth")["step"] == 4


def test_resume_on_a_damaged_checkpoint_is_exit_2_with_the_pointer(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_run_checkpoints(run_dir, (3,))
    (run_dir / "checkpoint.pth").write_bytes(b"")
    assert main(["pretrain", "--config", "tiny_cpu", "-o", str(run_dir), "--resume", "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "checkpoint_step0000003.pth (step 3)" in err and "cp " in err


@pytest.mark.slow  # a pretraining run (two steps)
def test_a_run_start_removes_temporaries_left_by_a_killed_run(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        write_volume(tmp_path / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=4, empty_slices=0))
    build_corpus([Source(str(tmp_path / "ct"))], settings_from_config(tiny_config()), tmp_path / "c.json",
                 progress=False)
    out = tmp_path / "run"
    out.mkdir()
    for name in (".checkpoint.pth.x1y2z3.tmp", ".loss_curves.png.q9w8e7.tmp"):
        (out / name).write_bytes(os.urandom(1024))
    summary = PretrainingRun(tiny_config("optim.iterations=2"), tmp_path / "c.json", out, progress=False,
                             device="cpu").run()
    assert summary["status"] == "completed"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


WRITER = """
import sys, torch
from pathlib import Path
from meddinov3_nnunet.pretraining import run_checkpoint
run_dir = Path(sys.argv[1])
print("ready", flush=True)
step = 0
while True:
    step += 1
    run_checkpoint.save({"step": step, "weights": torch.full((4_000_000,), float(step))}, run_dir / "checkpoint.pth",
                        run_dir / run_checkpoint.kept_name(step) if step % 3 == 0 else None)
"""


@pytest.mark.slow  # kills three writer processes
def test_kill_during_run_checkpoint_writes_loses_no_saved_step(tmp_path):
    """SIGKILL a process that writes 16 MB run checkpoints in a loop: checkpoint.pth always loads and is
    self-consistent; the temporaries it leaves are what `remove_interrupted_writes` removes at the next start."""
    for delay in (1.0, 1.7, 2.4):
        kill_writer_after(WRITER, tmp_path, delay)
        saved = load_run_checkpoint(tmp_path / "checkpoint.pth")
        assert float(saved["weights"][-1]) == saved["step"]
        remove_interrupted_writes(tmp_path)
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        for kept in tmp_path.glob("checkpoint_step*.pth"):
            assert load_run_checkpoint(kept)["step"] == int(kept.stem[len("checkpoint_step"):])
