"""Pretraining on several ranks (gloo, spawned as torchrun would): work only rank 0 does (indexing the corpus, the
probe, writing a checkpoint) never leaves the other ranks in a collective that can time out, a failure there
stops them all, and only rank 0 prints the run's log lines."""
import json
import sys
import time

import numpy as np
import pytest

from meddinov3_nnunet.errors import InputError

from pretraining_helpers import TINY_TEST_OVERRIDES, ct_volume, run_ranks, tiny_config, write_volume

TIMEOUT_S = 8  # the default group's collective timeout in these tests (NCCL's is 10 minutes)
SLOW_S = 12  # rank 0's work lasts longer than that


def _wait_for_slow_main(rank, out_dir):
    from meddinov3_nnunet.pretraining.distributed import DistContext, MainRankError

    ctx = DistContext.from_env("cpu")
    started = time.time()
    assert ctx.run_on_main(lambda: time.sleep(SLOW_S) or "done", "sleeping") == ("done" if rank == 0 else None)
    waited = time.time() - started

    def failing():
        raise InputError("the corpus is empty: 0 volumes")

    try:
        ctx.run_on_main(failing, "indexing the corpus")
        outcome = "no error"
    except MainRankError as err:
        outcome = f"MainRankError {err.exit_code}: {err}"
    except InputError as err:
        outcome = f"InputError: {err}"
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"waited": waited, "outcome": outcome}))


def test_the_other_ranks_wait_for_rank_0_past_the_collective_timeout_and_share_its_failure(tmp_path):
    run_ranks(_wait_for_slow_main, 2, (tmp_path,), collective_timeout_s=TIMEOUT_S)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["waited"] >= SLOW_S - 0.5 > TIMEOUT_S
    assert rank0["outcome"] == "InputError: the corpus is empty: 0 volumes"
    assert rank1["outcome"] == ("MainRankError 2: rank 0 failed while indexing the corpus (InputError: the corpus is "
                                "empty: 0 volumes)")


def _pretrain_with_slow_main_work(rank, data, probe_data, init, output, logs):
    """`meddinov3-nnunet pretrain --data ...` under 2 ranks with rank 0's indexing and probe slower than the
    collective timeout; each rank's stdout/stderr go to logs/rankN.txt."""
    from meddinov3_nnunet.cli import main
    from meddinov3_nnunet.pretraining import corpus
    from meddinov3_nnunet.probing import linear_probe

    real_build = corpus.build_corpus

    def slow_build(*args, **kwargs):
        time.sleep(SLOW_S)
        return real_build(*args, **kwargs)

    def slow_probe(name, *args, **kwargs):
        time.sleep(SLOW_S)
        return {"dice_mean": 0.5, "dice": {"bone": 0.5}, "pixel_accuracy": 0.9, "seconds": SLOW_S}

    corpus.build_corpus, linear_probe.run_probe = slow_build, slow_probe
    sys.stdout = sys.stderr = open(logs / f"rank{rank}.txt", "w", buffering=1)
    overrides = TINY_TEST_OVERRIDES + ["optim.iterations=2", "train.grad_accum_steps=2", "evaluation.probe_every=2",
                                       f"evaluation.probe_data={probe_data}", "evaluation.probe_size=32"]
    code = main(["pretrain", "--config", "tiny_cpu", *sum([["--set", o] for o in overrides], []), "--data", str(data),
                 "--init", str(init), "-o", str(output), "--corpus-workers", "1", "--device", "cpu", "--no-progress"])
    print(f"exit code {code}")


@pytest.mark.slow  # two spawned ranks, 24 s of rank-0 work
def test_pretrain_under_two_ranks_indexes_and_probes_on_rank_0_longer_than_a_collective_may_wait(tmp_path):
    from meddinov3_nnunet.models.checkpoints import save_encoder
    from meddinov3_nnunet.models.encoder import DINOv3Encoder
    from meddinov3_nnunet.pretraining.config import encoder_arch
    from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint
    from test_pretraining_probe import labelled_dataset

    rng = np.random.default_rng(0)
    for i in range(4):
        write_volume(tmp_path / "ct" / f"case{i}.nii.gz", ct_volume(rng, slices=4, empty_slices=0))
    probe_data = labelled_dataset(tmp_path / "Dataset902_Bone")
    save_encoder(DINOv3Encoder(encoder_arch(tiny_config())), tmp_path / "init.pth")
    (tmp_path / "logs").mkdir()
    run_ranks(_pretrain_with_slow_main_work, 2, (tmp_path / "ct", probe_data, tmp_path / "init.pth", tmp_path / "run",
                                                 tmp_path / "logs"), collective_timeout_s=TIMEOUT_S)
    rank0, rank1 = ((tmp_path / "logs" / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.endswith("exit code 0\n") and rank1.endswith("exit code 0\n"), rank0[-2000:] + rank1[-2000:]
    assert "4 volumes, 16 slices" in rank0 and "completed: step 2/2" in rank0 and "init: backbone from" in rank0
    assert not any(line in rank1 for line in ("init: backbone", "corpus ", "completed:"))  # rank 0's lines only
    probes = [json.loads(line) for line in (tmp_path / "run" / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [1]
    checkpoint = load_run_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["step"] == 2 and checkpoint["world_size"] == 2
    assert (checkpoint["rank_fingerprints"][0] == checkpoint["rank_fingerprints"][1]).all()  # in sync with no_sync
