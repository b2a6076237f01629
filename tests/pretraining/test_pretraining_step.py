"""One optimiser step of the pretraining loop: gradient accumulation (`train.grad_accum_steps`) and the host syncs
of a step (its logged scalars are read once per `train.log_every` steps)."""
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meddinov3_nnunet.models.checkpoints import save_encoder
from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.pretraining import augment
from meddinov3_nnunet.pretraining import train as train_module
from meddinov3_nnunet.pretraining.config import encoder_arch
from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint
from meddinov3_nnunet.pretraining.schedules import schedules_at
from meddinov3_nnunet.pretraining.train import PretrainingRun

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import tiny_config, tiny_ct_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_ct_manifest(tmp_path_factory.mktemp("step"))


def built(config, manifest, output):
    run = PretrainingRun(config, manifest, output, device="cpu", progress=False)
    run.build()
    return run


def test_split_batch_cuts_a_crop_major_batch_into_passes_each_with_its_own_masks(manifest, tmp_path):
    run = built(tiny_config("optim.batch_size=8", "train.grad_accum_steps=2", "crops.global_size=64",
                            "ibot.mask_ratio_min_max=[0.2, 0.5]"), manifest, tmp_path)
    batch = next(iter(run.loader))
    passes = augment.split_batch(batch, 8, 2)
    for k, part in enumerate(passes):
        for key, crops in (("global_crops", 2), ("local_crops", 2), ("masks", 2)):
            whole = batch[key].unflatten(0, (crops, 8))
            assert torch.equal(part[key], whole[:, 4 * k:4 * k + 4].flatten(0, 1)), key  # crop-major, images k*4..
        assert torch.equal(part["mask_indices"], part["masks"].flatten().nonzero().flatten())
        assert int(part["masks"].any(-1).sum()) == 4  # one block_masks draw per pass: int(8 crops x 0.5) masked
    assert augment.split_batch(batch, 8, 1) == [batch]


def test_accumulated_passes_give_the_whole_batchs_gradient_for_a_per_image_loss(manifest, tmp_path):
    """The Gram loss is a mean of per-image terms, so two half-batch passes with halved losses must give the
    gradient of one whole-batch pass (DINO/iBOT centring and KoLeo are batch-level and may not)."""
    config = tiny_config("model.drop_path_rate=0")
    gram_teacher = DINOv3Encoder(encoder_arch(config))
    save_encoder(gram_teacher, tmp_path / "gram.pth")
    only_gram = ["model.drop_path_rate=0", "dino.loss_weight=0", "ibot.loss_weight=0", "dino.koleo_loss_weight=0",
                 "gram.enabled=true", f"gram.teacher={tmp_path / 'gram.pth'}", "crops.gram_teacher_size=48"]
    whole = built(tiny_config(*only_gram), manifest, tmp_path / "whole")
    halves = built(tiny_config(*only_gram, "train.grad_accum_steps=2"), manifest, tmp_path / "halves")
    batch = next(iter(halves.loader))  # masks drawn per pass: each half masks a patch
    values = schedules_at(whole.config.optim, 3)
    stats_whole = whole._train_step([batch], values)
    stats_halves = halves._train_step(augment.split_batch(batch, 4, 2), values)
    names = whole._stat_names
    assert names == halves._stat_names and "gram" in names
    for name in ("gram", "total", "grad_norm_backbone"):
        i = names.index(name)
        assert stats_halves[i].item() == pytest.approx(stats_whole[i].item(), rel=1e-5), name
    assert stats_whole[names.index("grad_norm_backbone")] > 0
    for (name, a), b in zip(whole.student.named_parameters(), halves.student.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-9, msg=name)
    assert torch.isfinite(stats_halves).all()  # the batch-level terms differ, but are computed


def test_accumulation_makes_its_passes_then_one_optimiser_step_ema_update_and_schedule_step(manifest, tmp_path,
                                                                                           monkeypatch):
    counts = {"passes": 0, "optimiser": 0, "ema": 0, "images": []}
    real_step, real_ema = PretrainingRun._step, train_module.update_momentum

    def counting_step(self, batch, values):
        counts["passes"] += 1
        counts["images"].append(batch["global_crops"].shape[0] // 2)
        assert batch["mask_indices"].numel() > 0  # each pass masks at least one patch (its own draw)
        return real_step(self, batch, values)

    def counting_ema(*args):
        counts["ema"] += 1
        return real_ema(*args)

    monkeypatch.setattr(PretrainingRun, "_step", counting_step)
    monkeypatch.setattr(train_module, "update_momentum", counting_ema)
    records = {}
    for accum in (1, 2):
        counts.update(passes=0, optimiser=0, ema=0, images=[])
        run = built(tiny_config(f"train.grad_accum_steps={accum}", "optim.iterations=3"), manifest, tmp_path / str(accum))
        optimiser_step = run.optimizer.step

        def counting_optimiser_step(*args, **kwargs):
            counts["optimiser"] += 1
            return optimiser_step(*args, **kwargs)

        run.optimizer.step = counting_optimiser_step
        assert run.run()["status"] == "completed"
        assert counts["passes"] == 3 * accum and counts["images"] == [4 // accum] * (3 * accum)
        assert counts["optimiser"] == 3 and counts["ema"] == 3
        records[accum] = [json.loads(line) for line in (tmp_path / str(accum) / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(records[1], records[2], strict=True):
        for key in ("step", "lr", "last_layer_lr", "weight_decay", "momentum", "teacher_temp"):
            assert two[key] == one[key], key  # schedules advance once per optimiser step
        assert all(np.isfinite(two[k]) for k in ("total", "dino", "ibot", "koleo", "grad_norm_backbone"))
    assert load_run_checkpoint(tmp_path / "2" / "checkpoint.pth")["config"]["train"]["grad_accum_steps"] == 2


def test_accumulation_must_divide_each_ranks_batch():
    from meddinov3_nnunet.pretraining.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: 3 does not divide optim\.batch_size 4"):
        tiny_config("train.grad_accum_steps=3")


@pytest.mark.slow  # two pretraining runs
def test_a_resumed_run_with_accumulation_reproduces_the_uninterrupted_one(manifest, tmp_path):
    config = tiny_config("train.grad_accum_steps=2", "optim.iterations=4")
    PretrainingRun(config, manifest, tmp_path / "straight", device="cpu", progress=False).run()
    PretrainingRun(config, manifest, tmp_path / "resumed", device="cpu", progress=False).run(stop_at_step=2)
    PretrainingRun(config, manifest, tmp_path / "resumed", resume=True, device="cpu", progress=False).run()
    a = load_run_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    b = load_run_checkpoint(tmp_path / "resumed" / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    for branch in ("student", "teacher"):
        for key in a[branch]:
            torch.testing.assert_close(b[branch][key], a[branch][key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------------
# host syncs
# ---------------------------------------------------------------------------------------------------------------
class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for a GPU: a tensor read as a Python number (``item``,
    ``float``, ``bool``), ``nonzero`` and boolean indexing (output size), ``equal``, and (patched) ``tolist``."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
             "aten.is_nonzero.default", "aten.masked_select.default"}

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = str(func) == "aten.index.Tensor" and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if not self.paused and (str(func) in self.READS or boolean_index):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_never_waits_for_the_device(manifest, tmp_path):
    run = built(tiny_config("train.grad_accum_steps=2"), manifest, tmp_path)
    passes = augment.split_batch(next(iter(run.loader)), 4, 2)  # data side: CPU tensors before they move
    with HostSyncs() as syncs:
        stats = run._train_step(passes, schedules_at(run.config.optim, 2))
    assert syncs.count == 0
    assert torch.isfinite(stats).all()


def test_the_loop_reads_its_logged_scalars_once_per_log_interval(manifest, tmp_path, monkeypatch):
    run = built(tiny_config("train.log_every=3", "optim.iterations=6"), manifest, tmp_path)
    iterator = iter(run.loader)
    run.loader = [next(iterator) for _ in range(6)]  # data side, read before counting
    del iterator
    run.save_checkpoint = lambda step: None  # compares rank fingerprints: once per checkpoint, not per step
    syncs = HostSyncs()
    optimiser_step = run.optimizer.step

    def uncounted_optimiser_step(*args, **kwargs):  # CPU AdamW reads its step counter, a CPU tensor on GPUs too
        syncs.paused = True
        try:
            return optimiser_step(*args, **kwargs)
        finally:
            syncs.paused = False

    run.optimizer.step = uncounted_optimiser_step
    real_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        syncs.count += not syncs.paused
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with syncs:
        assert run.run()["status"] == "completed"
    assert syncs.count == 2  # steps 1-3 and 4-6: one read each
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6)) and all(np.isfinite(r["total"]) for r in records)
