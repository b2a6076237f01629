"""Two CPU ranks launched with torchrun (DDP over gloo) train the same weights."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint

from pretraining_helpers import TINY_TEST_OVERRIDES, ct_volume, write_volume


@pytest.mark.slow  # two torchrun processes
def test_two_cpu_ranks_under_torchrun_stay_in_sync(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        write_volume(tmp_path / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=4, empty_slices=0))
    overrides = sum([["--set", o] for o in TINY_TEST_OVERRIDES + ["optim.iterations=4", "train.checkpoint_every=2",
                                                             "train.keep_every=2"]], [])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "meddinov3_nnunet.cli", "pretrain", "--config", "tiny_cpu", *overrides,
               "--data", str(tmp_path / "ct"), "-o", str(tmp_path / "run"), "--corpus-workers", "1",
               "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("completed: step 4/4") == 1  # printed by rank 0 only

    checkpoint = load_run_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 4
    rank0, rank1 = checkpoint["rank_fingerprints"]
    assert torch.equal(rank0, rank1)  # student and teacher identical on both ranks after 4 steps
    # each rank kept its own randomness (drop path), so the equality above is DDP's doing, not a copy
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    halfway = load_run_checkpoint(tmp_path / "run" / "checkpoint_step0000002.pth")
    assert torch.equal(halfway["rank_fingerprints"][0], halfway["rank_fingerprints"][1])
    assert not torch.equal(halfway["rank_fingerprints"][0], rank0)  # and the weights did move in between
