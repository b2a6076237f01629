"""The masked-pixel objective (`mim`, SimMIM/MAE-style pixel targets beside DINO/iBOT): its loss against a hand-made
reference in the encoder's token order, nothing changed while it is off, a fixed batch it overfits, its config
checks, and its pixel head through a run checkpoint, a resume and an export."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddinov3_nnunet.models.encoder import DINOv3Encoder
from meddinov3_nnunet.models.checkpoints import read_checkpoint
from meddinov3_nnunet.pretraining.config import CONFIG_DIR, ConfigError, available_configs, encoder_arch, load_config
from meddinov3_nnunet.pretraining.export import export_run
from meddinov3_nnunet.pretraining.losses import masked_pixel_loss, patch_pixels
from meddinov3_nnunet.pretraining.model import build_branch, param_groups, trained_modules
from meddinov3_nnunet.pretraining.objective import PretrainingObjective
from meddinov3_nnunet.pretraining.run_checkpoint import load_run_checkpoint
from meddinov3_nnunet.pretraining.train import PretrainingRun, ResumeError

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import tiny_config, tiny_ct_manifest

# 64 px global crops: a 4 x 4 token grid; every global crop masked, 30-50 % of its tokens
MIM = ["mim.enabled=true", "crops.global_size=64", "ibot.mask_sample_probability=1.0",
       "ibot.mask_ratio_min_max=[0.3, 0.5]", "model.drop_path_rate=0"]


# ---------------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------------
def coded_images() -> torch.Tensor:
    """2 images 1 x 32 x 32, patch 16 (a 2 x 2 grid): every pixel of image b, patch row i, column j is
    100 b + 10 (2 i + j) plus its position inside the patch / 100 (so a patch is not constant)."""
    images = torch.zeros(2, 1, 32, 32)
    inside = torch.arange(256, dtype=torch.float32).reshape(16, 16) / 100
    for b in range(2):
        for i in range(2):
            for j in range(2):
                images[b, 0, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = 100 * b + 10 * (2 * i + j) + inside
    return images


def test_patches_follow_the_encoders_token_order():
    """A patch embedding set up to read pixels (channel 0: the patch mean, 1: its pixel (0, 0), 2: its pixel
    (3, 5)) gives, token for token, what `patch_pixels` holds at those places."""
    encoder = DINOv3Encoder(encoder_arch(tiny_config()))
    proj = encoder.patch_embed.proj
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.zero_()
        proj.weight[0, 0] = 1 / 256
        proj.weight[1, 0, 0, 0] = 1
        proj.weight[2, 0, 3, 5] = 1
        images = coded_images()
        tokens = encoder.patch_embed(images.expand(-1, 3, -1, -1)).flatten(1, 2)  # (B, N, D), as the encoder
    patches = patch_pixels(images, 16)
    assert patches.shape == (2, 4, 256)
    torch.testing.assert_close(tokens[..., 0], patches.mean(-1))
    assert torch.equal(tokens[..., 1], patches[..., 0]) and torch.equal(tokens[..., 2], patches[..., 3 * 16 + 5])
    # token n of image b is patch n = 2 i + j of the code
    assert torch.equal(patches[..., 0], torch.tensor([[0.0, 10, 20, 30], [100, 110, 120, 130]]))


@pytest.mark.parametrize("norm_pixels", [False, True])
@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_masked_pixel_loss_matches_a_hand_computed_reference(norm_pixels, kind):
    images = coded_images()
    mask_indices = torch.tensor([1, 2, 7])  # image 0 tokens 1, 2 (row 0 col 1, row 1 col 0); image 1 token 3
    places = [(0, 0, 1), (0, 1, 0), (1, 1, 1)]
    target = torch.stack([images[b, 0, 16 * i:16 * i + 16, 16 * j:16 * j + 16].reshape(-1) for b, i, j in places])
    assert torch.equal(target[:, 0], torch.tensor([10.0, 20.0, 130.0]))  # the code of each masked patch
    if norm_pixels:
        target = torch.stack([(t - t.mean()) / torch.sqrt(t.var() + 1e-6) for t in target])
        assert target.mean(-1).abs().max() < 1e-4 and torch.allclose(target.std(-1), torch.ones(3), atol=1e-4)
    pred = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # cast to fp32 inside
    reference = F.l1_loss(pred.float(), target) if kind == "l1" else F.mse_loss(pred.float(), target)
    loss = masked_pixel_loss(pred, images, mask_indices, 16, norm_pixels=norm_pixels, kind=kind)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    if not norm_pixels:  # raw pixels: large codes, so a wrong patch would be off by >= 10
        assert loss.item() > 5
    with pytest.raises(ValueError, match="kind must be 'l1' or 'mse'"):
        masked_pixel_loss(pred, images, mask_indices, 16, kind="huber")


# ---------------------------------------------------------------------------------------------------------------
# off: nothing changes; on: the objective adds the term
# ---------------------------------------------------------------------------------------------------------------
def fake_batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.crops.global_size
    global_crops = torch.randn(2 * config.optim.batch_size, 1, size, size, generator=g)
    local_crops = torch.randn(config.crops.local_number * config.optim.batch_size, 1, config.crops.local_size,
                              config.crops.local_size, generator=g)
    masks = torch.zeros(global_crops.shape[0], (size // 16) ** 2, dtype=torch.bool)
    masks[0, [1, 5, 6]] = masks[3, [0, 15]] = masks[6, [2]] = True
    return global_crops, local_crops, masks, masks.flatten().nonzero().flatten()


def test_off_leaves_the_branch_optimiser_and_objective_as_they_were():
    off, on = tiny_config(*MIM[1:]), tiny_config(*MIM)
    assert off.mim.enabled is False and on.mim.enabled is True
    torch.manual_seed(0)
    plain = build_branch(off)
    torch.manual_seed(0)
    with_head = build_branch(on)
    assert plain.pixel_head is None and trained_modules(plain) == ("backbone", "dino_head", "ibot_head")
    assert {k.split(".")[0] for k in plain.state_dict()} == {"backbone", "dino_head", "ibot_head"}
    extra = set(with_head.state_dict()) - set(plain.state_dict())
    assert extra == {"pixel_head.weight", "pixel_head.bias"} and set(plain.state_dict()) < set(with_head.state_dict())
    assert tuple(with_head.pixel_head.weight.shape) == (16 * 16, 96)  # embed 96 -> p x p grey pixels
    for key, value in plain.state_dict().items():  # the head is drawn after the others: same initial weights
        assert torch.equal(value, with_head.state_dict()[key]), key
    # optimiser: the pixel head at the full lr, in the heads' groups
    groups_off = param_groups(plain, 0.9, 0.2)
    groups_on = param_groups(with_head, 0.9, 0.2)
    assert sum(len(g["params"]) for g in groups_off) == len(list(plain.parameters()))
    assert sum(len(g["params"]) for g in groups_on) == len(list(with_head.parameters()))
    head_groups = [g for g in groups_on if any(p is with_head.pixel_head.weight for p in g["params"])]
    assert len(head_groups) == 1 and head_groups[0]["lr_multiplier"] == 1.0 and head_groups[0]["wd_multiplier"] == 1.0
    # objective: same parts, same total while off; with it on, + weight x mim
    global_crops, local_crops, masks, mask_indices = fake_batch(on)
    with torch.no_grad():
        student = with_head(global_crops, local_crops, masks, mask_indices)
        teacher = with_head.teacher_forward(global_crops, mask_indices)
        student_plain = plain(global_crops, local_crops, masks, mask_indices)
    assert "masked_pixel_pred" not in student_plain and student["masked_pixel_pred"].shape == (6, 256)
    objective_off = PretrainingObjective(off, gram_enabled=False)
    total_off, parts_off = objective_off(student_plain, teacher, masks, mask_indices, 0.04)
    same, parts_same = objective_off(student, teacher, masks, mask_indices, 0.04, images=global_crops)
    assert list(parts_off) == ["dino", "dino_global", "dino_local", "ibot", "koleo", "total"]
    assert torch.equal(total_off, same) and parts_same.keys() == parts_off.keys()
    assert all(torch.equal(parts_off[k], parts_same[k]) for k in parts_off)
    parts = {k: v.item() for k, v in parts_off.items()}
    assert parts["total"] == pytest.approx(parts["dino"] + 0.1 * 2 * parts["koleo"] + parts["ibot"], rel=1e-6)
    weighted = tiny_config(*MIM, "mim.loss_weight=0.5", "mim.loss=mse")
    total_on, parts_on = PretrainingObjective(weighted, gram_enabled=False)(student, teacher, masks, mask_indices, 0.04,
                                                                            images=global_crops)
    assert list(parts_on) == ["dino", "dino_global", "dino_local", "ibot", "koleo", "mim", "total"]
    expected = masked_pixel_loss(student["masked_pixel_pred"], global_crops, mask_indices, 16, True, "mse")
    assert torch.equal(parts_on["mim"], expected) and expected > 0
    assert torch.equal(total_on, total_off + 0.5 * expected)
    with pytest.raises(ValueError, match="needs the student's masked_pixel_pred"):
        PretrainingObjective(on, gram_enabled=False)(student, teacher, masks, mask_indices, 0.04)


def test_config_checks_name_the_mim_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"config value mim\.loss: unknown loss 'huber'; choose 'l1' \(SimMIM\) or "
                                          r"'mse' \(MAE\)"):
        tiny_config("mim.loss=huber")
    with pytest.raises(ConfigError, match=r"config value mim\.loss_weight: must be 0 or more, got -1\.0"):
        tiny_config("mim.loss_weight=-1")
    for no_masks in ("ibot.mask_sample_probability=0", "ibot.mask_ratio_min_max=[0, 0]"):
        with pytest.raises(ConfigError, match=r"config value mim\.enabled: the masked-pixel objective reconstructs the "
                                              r"patches iBOT masks, but this recipe masks none"):
            tiny_config("mim.enabled=true", no_masks)
        tiny_config(no_masks)  # without mim nothing changes
    with pytest.raises(ConfigError, match="mim.enabled must be true/false"):
        tiny_config("mim.enabled=maybe")
    for name in available_configs():  # shipped off everywhere; small_data names it as its issue-22 candidate
        config = load_config(name)
        assert (config.mim.enabled, config.mim.loss, config.mim.norm_pixels) == (False, "l1", True), name
    assert "issue 22" in (CONFIG_DIR / "small_data.yaml").read_text().split("\nmim:")[1].split("\ngram:")[0]
    assert load_config("small_data", ["mim.enabled=true"]).mim.enabled  # the switch the comment gives


# ---------------------------------------------------------------------------------------------------------------
# in the loop: it learns, logs, checkpoints, resumes and stays out of the export
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_ct_manifest(tmp_path_factory.mktemp("mim"))


STEPS = 120  # ~5 s single-threaded


@pytest.fixture(scope="module")
def overfit_run(manifest, tmp_path_factory):
    """120 steps of the real loop on one fixed batch (the loader replaced by that batch, as the step tests do)."""
    output = tmp_path_factory.mktemp("overfit")
    run = PretrainingRun(tiny_config(*MIM, f"optim.iterations={STEPS}"), manifest, output, device="cpu",
                         progress=False)
    run.build()
    batch = next(iter(run.loader))
    run.loader = [batch] * STEPS
    summary = run.run()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return run, output, summary, records, batch


def test_a_fixed_batch_is_overfit_and_the_mim_loss_is_logged_and_plotted(overfit_run):
    run, output, summary, records, batch = overfit_run
    assert summary["status"] == "completed" and len(records) == STEPS
    assert batch["mask_indices"].numel() >= 8 * 4  # 8 global crops, 30-50 % of 16 tokens each
    assert "grad_norm_pixel_head" in run._stat_names and all(r["grad_norm_pixel_head"] > 0 for r in records)
    for r in records:
        assert np.isfinite(r["mim"]) and r["total"] == pytest.approx(
            r["dino"] + 0.1 * 2 * r["koleo"] + r["ibot"] + r["mim"], rel=1e-5)
    first = np.mean([r["mim"] for r in records[:3]])
    last = np.mean([r["mim"] for r in records[-3:]])
    assert 0.5 < first < 1.2  # L1 of a near-zero prediction on unit-variance (normalised) targets: ~0.8
    assert last < 0.8 * first, (first, last)  # measured: 0.759 -> 0.498 (-34 %; -11 % after 30 steps)
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_restores_the_pixel_head_bit_exactly_and_the_export_leaves_it_out(overfit_run, manifest, tmp_path):
    run, output, _, _, _ = overfit_run
    saved = load_run_checkpoint(output / "checkpoint.pth")
    assert {"pixel_head.weight", "pixel_head.bias"} <= set(saved["student"]) & set(saved["teacher"])
    resumed = PretrainingRun(load_config(output / "config.yaml"), manifest, output, resume=True, device="cpu",
                             progress=False)
    resumed.build()
    for name in ("weight", "bias"):
        trained = getattr(run.student.pixel_head, name)
        assert torch.equal(getattr(resumed.student.pixel_head, name), trained)
        assert torch.equal(getattr(resumed.student.pixel_head, name), saved["student"][f"pixel_head.{name}"])
        assert torch.equal(getattr(resumed.teacher.pixel_head, name), saved["teacher"][f"pixel_head.{name}"])
        state = resumed.optimizer.state[getattr(resumed.student.pixel_head, name)]
        assert torch.equal(state["exp_avg"], run.optimizer.state[trained]["exp_avg"])  # AdamW moments too
    written = export_run(output, tmp_path / "export")
    layout = torch.load(written["meddinov3_teacher"], weights_only=True)["teacher"]
    assert not any("pixel_head" in k for k in layout) and any(k.startswith("ibot_head.") for k in layout)
    backbone = {k[len("backbone."):]: v for k, v in saved["teacher"].items() if k.startswith("backbone.")}
    exported = read_checkpoint(written["encoder"]).state_dict
    assert exported.keys() == backbone.keys() and all(torch.equal(exported[k], v) for k, v in backbone.items())


def test_a_checkpoint_from_before_mim_resumes_unchanged_and_refuses_to_switch_it_on(manifest, tmp_path):
    PretrainingRun(tiny_config(), manifest, tmp_path, device="cpu", progress=False).run(stop_at_step=0)
    checkpoint = load_run_checkpoint(tmp_path / "checkpoint.pth")
    assert not any(k.startswith("pixel_head") for k in checkpoint["student"])
    del checkpoint["config"]["mim"]  # as written before the section existed
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    resumed = PretrainingRun(tiny_config(), manifest, tmp_path, resume=True, device="cpu", progress=False)
    resumed.build()
    assert resumed.student.pixel_head is None and resumed.start_step == 0
    with pytest.raises(ResumeError, match=r"(?s)config differs.*mim\.enabled: False -> True"):
        PretrainingRun(tiny_config("mim.enabled=true"), manifest, tmp_path, resume=True, device="cpu").check()
