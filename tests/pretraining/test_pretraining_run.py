"""Pretraining runs on tiny data: resume equality, progress files, bad input, NaN stop, Gram stage, export round trip."""
import json
import os

import numpy as np
import pytest
import torch

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.models.checkpoints import (CheckpointError, encoder_state, load_into, read_checkpoint,
                                                 save_encoder, to_official_layout)
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.presets import preset
from meddinov3_nnunet.pretraining import objective as objective_module
from meddinov3_nnunet.pretraining.corpus import Source, build_corpus, settings_from_config
from meddinov3_nnunet.pretraining.export import export_run
from meddinov3_nnunet.pretraining.model import initialise_branch, read_starting_point
from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint
from meddinov3_nnunet.pretraining.schedules import schedules_at
from meddinov3_nnunet.pretraining.train import NonFiniteLossError, PretrainingRun, ResumeError, gram_refresh_due

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import TINY_TEST_OVERRIDES, ct_volume, tiny_config, write_volume
from meddinov3_nnunet.pretraining.config import load_config


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_volume(root / f"case{i}.nii.gz", ct_volume(rng, slices=4, empty_slices=0))
    return root


@pytest.fixture(scope="module")
def manifest(ct_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "corpus.json"
    build_corpus([Source(str(ct_folder))], settings_from_config(tiny_config()), path, progress=False)
    return path


def run(config, manifest, output, **kwargs):
    stop = kwargs.pop("stop_at_step", None)
    return PretrainingRun(config, manifest, output, progress=False, device="cpu", **kwargs).run(stop_at_step=stop)


@pytest.fixture(scope="module")
def straight_run(manifest, tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    summary = run(tiny_config(), manifest, output)
    return output, summary


def states(checkpoint_path):
    checkpoint = load_run_checkpoint(checkpoint_path)
    return checkpoint["student"], checkpoint["teacher"], checkpoint


@pytest.mark.slow  # a pretraining run
def test_stop_and_resume_reproduce_the_weights_of_an_uninterrupted_run(straight_run, manifest, tmp_path):
    straight_dir, summary = straight_run
    assert summary["status"] == "completed" and summary["step"] == 6
    first = run(tiny_config(), manifest, tmp_path, stop_at_step=3)
    assert first["status"] == "stopped" and load_run_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3
    second = run(tiny_config(), manifest, tmp_path, resume=True)
    assert second["status"] == "completed" and second["steps_this_run"] == 3
    student_a, teacher_a, checkpoint_a = states(straight_dir / "checkpoint.pth")
    student_b, teacher_b, checkpoint_b = states(tmp_path / "checkpoint.pth")
    for a, b in ((student_a, student_b), (teacher_a, teacher_b)):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert checkpoint_b["optimizer"]["state"].keys() == checkpoint_a["optimizer"]["state"].keys()
    # the resumed metrics log reads as one run
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


@pytest.mark.slow  # a pretraining run
def test_a_run_logs_every_loss_schedules_and_speed_and_plots_them(straight_run):
    output, summary = straight_run
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    for key in ("total", "dino", "dino_global", "dino_local", "ibot", "koleo", "lr", "momentum", "teacher_temp",
                "weight_decay", "images_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(tiny_config().optim.lr.peak)
    assert records[0]["last_layer_lr"] == 0.0 and records[1]["last_layer_lr"] > 0  # frozen last layer, 1 step
    assert records[0]["teacher_temp"] == 0.04 and records[-1]["teacher_temp"] == pytest.approx(0.07)
    assert records[-1]["momentum"] == pytest.approx(1.0)
    total = records[0]["dino"] + 0.1 * 2 * records[0]["koleo"] + records[0]["ibot"]
    assert records[0]["total"] == pytest.approx(total, rel=1e-5)
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "name: tiny_cpu" in (output / "config.yaml").read_text()
    assert summary["images_per_s"] > 0


def test_the_momentum_and_lr_schedules_follow_dinov3s_warmup_cosine():
    optim = tiny_config("optim.iterations=100", "optim.lr.warmup_iterations=10").optim
    assert schedules_at(optim, 0)["lr"] == 0.0
    assert schedules_at(optim, 5)["lr"] == pytest.approx(optim.lr.peak / 2)
    assert schedules_at(optim, 10)["lr"] == pytest.approx(optim.lr.peak)
    assert schedules_at(optim, 99)["lr"] == pytest.approx(optim.lr.end)
    assert schedules_at(optim, 0)["momentum"] == pytest.approx(0.99)


@pytest.mark.slow  # a pretraining run
def test_resuming_with_another_config_or_nothing_to_resume_is_refused(straight_run, manifest, tmp_path):
    output, _ = straight_run
    with pytest.raises(ResumeError, match=r"(?s)config differs.*optim\.lr\.peak: 0\.002 -> 0\.001"):
        PretrainingRun(tiny_config("optim.lr.peak=1e-3"), manifest, output, resume=True, device="cpu").check()
    with pytest.raises(ResumeError, match="nothing to resume"):
        PretrainingRun(tiny_config(), manifest, tmp_path / "empty", resume=True, device="cpu").check()
    with pytest.raises(ResumeError, match="already holds a run.*--resume"):
        PretrainingRun(tiny_config(), manifest, output, device="cpu").check()


def test_init_from_meta_dinov3_weights_loads_the_backbone(manifest, tmp_path):
    torch.manual_seed(1)
    source = build_encoder(preset("vit_tiny16", "meddinov3"))
    torch.save(to_official_layout(encoder_state(source), source.arch), tmp_path / "dinov3_vittiny16_pretrain.pth")
    config = tiny_config(f"model.init={tmp_path / 'dinov3_vittiny16_pretrain.pth'}")
    pretraining = PretrainingRun(config, manifest, tmp_path / "run", device="cpu")
    pretraining.build()
    for key, value in source.state_dict().items():
        assert torch.equal(pretraining.student.backbone.state_dict()[key], value), key
        assert torch.equal(pretraining.teacher.backbone.state_dict()[key], value), key


def test_init_with_another_architecture_fails_before_any_work(manifest, tmp_path):
    other = build_encoder(preset("vit_tiny16").replace(depth=2))
    save_encoder(other, tmp_path / "shallow.pth")
    config = tiny_config(f"model.init={tmp_path / 'shallow.pth'}")
    with pytest.raises(CheckpointError, match=r"(?s)shallow\.pth.*cannot be used as --init.*depth 2.*depth 4"):
        PretrainingRun(config, manifest, tmp_path / "run", device="cpu").check()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a pretraining run
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(manifest, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = objective_module.koleo_loss

    def koleo_turning_nan(features):
        calls["n"] += 1
        value = real(features)
        return value * float("nan") if calls["n"] > 2 * 3 else value  # two global crops per step: NaN from step 3

    monkeypatch.setattr(objective_module, "koleo_loss", koleo_turning_nan)
    with pytest.raises(NonFiniteLossError, match=r"(?s)non-finite loss at step 3 .*checkpoint .* \(after step 2\) is kept"):
        run(tiny_config("train.checkpoint_every=2"), manifest, tmp_path)
    assert load_run_checkpoint(tmp_path / "checkpoint.pth")["step"] == 2
    calls["n"] = 0
    code = main(["pretrain", "--config", "tiny_cpu", *sum([["--set", o] for o in TINY_TEST_OVERRIDES], []),
                 "--set", "train.checkpoint_every=2", "--manifest", str(manifest), "-o", str(tmp_path / "cli"),
                 "--device", "cpu", "--no-progress"])
    assert code == 3 and "non-finite loss at step 3" in capsys.readouterr().err


@pytest.mark.slow  # a pretraining run
def test_stage2_continues_from_a_run_with_a_frozen_gram_teacher_at_twice_the_resolution(straight_run, manifest, tmp_path):
    stage1, _ = straight_run
    checkpoint = stage1 / "checkpoint.pth"
    config = tiny_config(f"model.init={checkpoint}", "gram.enabled=true", f"gram.teacher={checkpoint}",
                         "crops.gram_teacher_size=64", "optim.iterations=2", "name=tiny_stage2", "stage=2")
    pretraining = PretrainingRun(config, manifest, tmp_path, device="cpu", progress=False)
    pretraining.build()
    saved_teacher = load_run_checkpoint(checkpoint)["teacher"]
    for key, value in pretraining.student.state_dict().items():  # student and heads start from the stage-1 teacher
        assert torch.equal(value, saved_teacher[key]), key
    gram_weights = pretraining.gram_teacher.state_dict()
    assert all(torch.equal(v, saved_teacher["backbone." + k]) for k, v in gram_weights.items())
    features = torch.randn(3, 16, pretraining.arch.embed_dim)  # a 4x4 Gram-teacher grid -> the 2x2 student grid
    assert pretraining._to_student_grid(features, 32).shape == (3, 4, pretraining.arch.embed_dim)
    summary = pretraining.run()
    assert summary["status"] == "completed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gram"] > 0 and np.isfinite(r["gram"]) and r["gram_weight"] == 2.0 for r in records)
    assert all(torch.equal(v, gram_weights[k]) for k, v in pretraining.gram_teacher.state_dict().items())  # frozen
    with pytest.raises(Exception, match="needs a Gram teacher"):
        PretrainingRun(tiny_config("gram.enabled=true", "crops.gram_teacher_size=64"), manifest, tmp_path / "x",
                       device="cpu").check()


@pytest.mark.slow  # a pretraining run
def test_export_gives_the_fine_tuning_network_exactly_the_pretrained_teacher(straight_run, tmp_path, monkeypatch):
    output, _ = straight_run
    written = export_run(output, tmp_path)
    teacher = load_run_checkpoint(output / "checkpoint.pth")["teacher"]
    backbone = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    for path, fmt in ((written["encoder"], "meddinov3_nnunet"), (written["meddinov3_teacher"], "meddinov3_teacher")):
        checkpoint = read_checkpoint(path)
        assert checkpoint.format == fmt
        network = build_network("vit_tiny16", in_channels=1, num_classes=3)  # as the trainer loads it
        load_into(network.encoder, checkpoint)
        for key, value in network.encoder.state_dict().items():
            assert torch.equal(value, backbone[key]), (fmt, key)
    layout = torch.load(written["meddinov3_teacher"], weights_only=True)["teacher"]
    assert {"dino_head.mlp.0.weight", "dino_head.last_layer.weight", "ibot_head.mlp.4.bias"} <= set(layout)
    assert torch.equal(layout["dino_head.last_layer.weight"], teacher["dino_head.last_layer.weight"])
    # and through the fine-tuning trainer's own weight loading
    from meddinov3_nnunet.trainers import MedDINOv3Trainer_smoke

    trainer = MedDINOv3Trainer_smoke.__new__(MedDINOv3Trainer_smoke)
    trainer.network = MedDINOv3Trainer_smoke.build_network_architecture(None, None, 1, 3)
    trainer._fresh_encoder_marker = trainer.network.encoder.cls_token.detach().clone()
    trainer.print_to_log_file = lambda *args, **kwargs: None
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", written["encoder"])
    trainer.load_encoder_weights()
    for key, value in trainer.network.encoder.state_dict().items():
        assert torch.equal(value, backbone[key]), key


@pytest.mark.slow  # a pretraining run
def test_init_from_a_teacher_layout_file_restores_backbone_and_heads(straight_run, tmp_path):
    output, _ = straight_run
    written = export_run(output, tmp_path)
    point = read_starting_point(written["meddinov3_teacher"])
    pretraining = PretrainingRun(tiny_config(), "unused.json", tmp_path / "run", device="cpu")
    from meddinov3_nnunet.pretraining.model import build_branch

    branch = build_branch(pretraining.config)
    initialise_branch(branch, point, with_heads=True)
    teacher = load_run_checkpoint(output / "checkpoint.pth")["teacher"]
    for key, value in branch.state_dict().items():
        assert torch.equal(value, teacher[key]), key
    with pytest.raises(CheckpointError, match="dino_head does not fit.*model.init_heads=false"):
        initialise_branch(build_branch(tiny_config("dino.head_prototypes=32")), point, with_heads=True)


@pytest.mark.slow  # a pretraining run
def test_cli_pretrain_then_export(ct_folder, tmp_path, capsys):
    overrides = sum([["--set", o] for o in TINY_TEST_OVERRIDES + ["optim.iterations=2"]], [])
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_cpu", *overrides, "--data", f"ct={ct_folder}", "-o", str(out),
                 "--corpus-workers", "1", "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "4 volumes, 16 slices, 0 skipped" in text and "completed: step 2/2" in text
    assert json.loads((out / "corpus.json").read_text())["totals"]["volumes"] == 4
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "encoder.pth").is_file() and (out / "export" / "meddinov3_teacher.pth").is_file()
    assert read_checkpoint(out / "export" / "encoder.pth").meta["step"] == 2


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr.peek=1"], "unknown config key 'optim.lr.peek'"),
    (["--data", "/no/such/folder"], "data path(s) not found: /no/such/folder"),
    (["--resume"], "nothing to resume"),
    (["--init", "/no/such/weights.pth"], "no such file"),
])
def test_cli_bad_input_is_one_clear_error_and_exit_code_2(ct_folder, tmp_path, capsys, args, message):
    base = ["pretrain", "--config", "tiny_cpu", "-o", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    if "--data" not in args and "--resume" not in args:
        base += ["--data", str(ct_folder)]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_cli_empty_corpus_is_a_clear_error(tmp_path, capsys):
    write_volume(tmp_path / "air" / "air.nii.gz", np.full((3, 16, 16), -1000, np.int16))
    assert main(["pretrain", "--config", "tiny_cpu", "--data", str(tmp_path / "air"), "-o", str(tmp_path / "run"),
                 "--corpus-workers", "1", "--no-progress"]) == 2
    assert "the corpus is empty" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")


def test_the_gram_teacher_is_refreshed_from_the_ema_teacher_on_dinov3s_steps(straight_run, manifest, tmp_path):
    gram = tiny_config("gram.refresh_every=2", "gram.refresh_first=2", "gram.refresh_max=2").gram
    assert [s for s in range(1, 10) if gram_refresh_due(gram, s)] == [2, 4]  # at most refresh_max times
    assert [s for s in range(1, 10) if gram_refresh_due(tiny_config().gram, s)] == []  # 0: the teacher stays fixed
    stage1, _ = straight_run
    checkpoint = stage1 / "checkpoint.pth"
    extra = (f"model.init={checkpoint}", "gram.enabled=true", f"gram.teacher={checkpoint}", "crops.gram_teacher_size=32",
             "optim.iterations=3", "gram.refresh_every=2", "gram.refresh_first=2", "name=tiny_stage2", "stage=2")
    pretraining = PretrainingRun(tiny_config(*extra), manifest, tmp_path / "run", device="cpu", progress=False)
    pretraining.build()
    original = {k: v.clone() for k, v in pretraining.gram_teacher.state_dict().items()}
    pretraining.run(stop_at_step=2)  # refreshed after step 2, then saved
    refreshed = load_run_checkpoint(tmp_path / "run" / "checkpoint.pth")
    teacher_backbone = {k[len("backbone."):]: v for k, v in refreshed["teacher"].items() if k.startswith("backbone.")}
    assert all(torch.equal(v, teacher_backbone[k]) for k, v in refreshed["gram_teacher"].items())
    assert any(not torch.equal(v, original[k]) for k, v in refreshed["gram_teacher"].items())
    resumed = PretrainingRun(tiny_config(*extra), manifest, tmp_path / "run", resume=True, device="cpu", progress=False)
    resumed.build()  # a resume continues with the refreshed Gram teacher, not the --gram-teacher file
    assert all(torch.equal(v, refreshed["gram_teacher"][k]) for k, v in resumed.gram_teacher.state_dict().items())


def test_mixed_resolutions_give_each_step_one_size_triple_with_the_configured_ratios(manifest, tmp_path):
    config = tiny_config("crops.mixed_global_sizes=[32, 48]", "crops.mixed_local_sizes=[16, 32]",
                         "crops.mixed_ratios=[0.75, 0.25]", "optim.iterations=4")
    pretraining = PretrainingRun(config, manifest, tmp_path, device="cpu", progress=False)
    pretraining.build()
    iterator = iter(pretraining.loader)
    sizes = [(b["global_crops"].shape[-1], b["local_crops"].shape[-1], b["masks"].shape[-1])
             for b in (next(iterator) for _ in range(40))]
    assert set(sizes) == {(32, 16, 4), (48, 32, 9)}  # masks follow the global crop's patch grid
    assert 0.6 < sizes.count((32, 16, 4)) / len(sizes) < 0.9
    del iterator
    assert pretraining.run()["status"] == "completed"  # the loop and the losses take either size


def test_pretraining_uses_dinov3s_drop_path_same_rate_in_every_block_on_a_batch_subset():
    from meddinov3_nnunet.models.encoder import BatchSubsetDropPathBlock
    from meddinov3_nnunet.pretraining.model import build_branch

    backbone = build_branch(load_config("stage1_pretrain", ["model.arch=vit_tiny16"])).backbone
    assert all(isinstance(b, BatchSubsetDropPathBlock) and b.drop_path_rate == 0.3 for b in backbone.blocks)
    assert backbone.blocks[0].subset_size(512) == 358  # int(512 x 0.7) samples go through each residual branch
    timm_form = build_branch(tiny_config("model.drop_path_mode=timm", "model.drop_path_rate=0.3")).backbone
    assert not any(isinstance(b, BatchSubsetDropPathBlock) for b in timm_form.blocks)
    assert timm_form.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)  # timm: rising to the rate at the end


@pytest.mark.slow  # a pretraining run
def test_a_resume_reads_the_run_checkpoint_once(straight_run, tmp_path, monkeypatch):
    from meddinov3_nnunet.pretraining import run_checkpoint

    output, _ = straight_run
    (tmp_path / "checkpoint.pth").write_bytes((output / "checkpoint.pth").read_bytes())
    reads = []
    real = run_checkpoint.load_torch_file
    monkeypatch.setattr(run_checkpoint, "load_torch_file", lambda path: reads.append(str(path)) or real(path))
    assert main(["pretrain", "--resume", "-o", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    assert reads == [str(tmp_path / "checkpoint.pth")]  # a ViT-B run checkpoint is a few GB, on every rank
