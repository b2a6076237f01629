"""Pretraining recipes: the shipped stage configs, --set overrides and clear errors for keys/values that do not exist."""
import math

import pytest
import yaml

from meddinov3_nnunet.pretraining.config import (CONFIG_DIR, ConfigError, all_keys, apply_overrides, available_configs,
                                                 differences, encoder_arch, flatten, load_config, resolutions)
from meddinov3_nnunet.pretraining.schedules import schedules_at


def test_every_shipped_recipe_loads_and_names_every_key():
    assert {"stage1_pretrain", "stage2_gram_anchoring", "stage3_high_resolution", "tiny_cpu"} <= set(available_configs())
    for name in available_configs():
        values = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        assert sorted(flatten(values)) == sorted(all_keys()), name  # nothing left to hidden defaults
        load_config(name)


def test_stage_recipes_carry_the_published_values():
    stage1, stage2, stage3 = (load_config(n) for n in ("stage1_pretrain", "stage2_gram_anchoring", "stage3_high_resolution"))
    # the published lrs: stage 3 reaches its lr at the end of a half-cosine ramp from 0 (DINOv3's high-res shape)
    assert (stage1.optim.lr.peak, stage2.optim.lr.peak, stage3.optim.lr.end) == (2e-4, 5e-5, 2.5e-5)
    assert (stage1.optim.iterations, stage1.optim.batch_size, stage1.model.arch) == (120000, 512, "vit_b16")
    assert not stage1.gram.enabled and stage2.gram.enabled and stage3.gram.enabled
    assert stage2.crops.gram_teacher_size == 2 * stage2.crops.global_size
    assert stage3.crops.global_size > stage2.crops.global_size and stage3.crops.local_size > stage2.crops.local_size
    assert stage1.corpus.ct_hu_window == [-1000.0, 1000.0] and stage1.corpus.ct_zscore == [65.108, 178.017]


def test_set_overrides_parse_numbers_lists_and_booleans():
    config = load_config("tiny_cpu", ["optim.lr.peak=1e-4", "crops.global_scale=[0.5, 1.0]", "gram.enabled=true",
                                      "crops.gram_teacher_size=224", "model.init=/some/where.pth"])
    assert config.optim.lr.peak == pytest.approx(1e-4)
    assert config.crops.global_scale == [0.5, 1.0]
    assert config.gram.enabled is True and config.crops.gram_teacher_size == 224
    assert config.model.init == "/some/where.pth"
    base = load_config("tiny_cpu")
    assert base.optim.lr.peak == 2e-3  # apply_overrides leaves its input alone
    assert apply_overrides(base, ["optim.lr.peak=2e-4"]).optim.lr.peak == 2e-4 and base.optim.lr.peak == 2e-3


def test_an_unknown_key_is_a_clear_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lr\.peek'.*Did you mean 'optim\.lr\.peak'"):
        load_config("tiny_cpu", ["optim.lr.peek=1e-4"])


def test_an_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("crops:\n  global_sise: 224\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown config key 'crops\.global_sise'"):
        load_config(path)


def test_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="crops.global_size must be an integer"):
        load_config("tiny_cpu", ["crops.global_size=big"])
    with pytest.raises(ConfigError, match="positive multiple of the patch size 16"):
        load_config("tiny_cpu", ["crops.global_size=100"])
    with pytest.raises(ConfigError, match=r"optim\.lr is a section.*optim\.lr\.peak"):
        load_config("tiny_cpu", ["optim.lr=1e-4"])
    with pytest.raises(ConfigError, match="gram.enabled needs the Gram-teacher crop size"):
        load_config("tiny_cpu", ["gram.enabled=true"])
    with pytest.raises(ConfigError, match="unknown config 'stage9'"):
        load_config("stage9")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("tiny_cpu", ["optim.lr.peak"])


def test_differences_lists_changed_recipe_keys_but_not_runtime_ones():
    a = load_config("tiny_cpu")
    b = apply_overrides(a, ["optim.lr.peak=1e-3", "train.checkpoint_every=7"])
    assert differences(a.to_dict(), b.to_dict()) == ["optim.lr.peak: 0.002 -> 0.001"]


def test_the_tiny_preset_starts_layerscale_at_one_and_the_stage_recipes_keep_dinov3s_value():
    assert encoder_arch(load_config("tiny_cpu")).layerscale_init == 1.0
    stage1 = encoder_arch(load_config("stage1_pretrain"))
    assert stage1.layerscale_init == 1e-5 and (stage1.embed_dim, stage1.depth, stage1.qkv_bias) == (768, 12, False)
    with pytest.raises(ConfigError, match="model.layerscale_init"):
        load_config("tiny_cpu", ["model.layerscale_init=0"])


def test_dinov3s_sqrt_lr_rule_scales_the_configured_lr_by_the_global_batch():
    stage1, stage2, stage3 = (load_config(n) for n in ("stage1_pretrain", "stage2_gram_anchoring", "stage3_high_resolution"))
    assert stage1.optim.lr_scaling_rule == "sqrt_wrt_1024"
    # 2e-4 x 4 sqrt(512 / 1024) at the end of the warm-up; DINOv3's unscaled min_lr 1e-6 at the end
    assert schedules_at(stage1.optim, 12000)["lr"] == pytest.approx(2e-4 * 4 * (512 / 1024) ** 0.5)
    assert schedules_at(stage1.optim, 119999)["lr"] == pytest.approx(1e-6, rel=1e-4)
    assert schedules_at(stage2.optim, 5000)["lr"] == pytest.approx(5e-5 * 2 ** 1.5)
    none = apply_overrides(stage1, ["optim.lr_scaling_rule=none"])
    assert schedules_at(none.optim, 12000)["lr"] == pytest.approx(2e-4)
    linear = apply_overrides(stage1, ["optim.lr_scaling_rule=linear_wrt_256"])
    assert schedules_at(linear.optim, 12000)["lr"] == pytest.approx(4e-4)
    with pytest.raises(ConfigError, match="optim.lr_scaling_rule"):
        apply_overrides(stage1, ["optim.lr_scaling_rule=sqrt"])
    # stage 3: DINOv3's half-cosine ramp from 0 to 2.5e-5 x 2 (batch 256) over 4000 steps, then constant
    ramp = [schedules_at(stage3.optim, s)["lr"] for s in (0, 1000, 2000, 3999, 4000, 11999)]
    assert ramp[0] == 0 and ramp[2] == pytest.approx(2.5e-5, rel=1e-3) and ramp[3] == pytest.approx(5e-5)
    assert ramp[1] == pytest.approx(5e-5 * (1 - math.cos(math.pi * 1000 / 3999)) / 2)
    assert ramp[4] == ramp[5] == pytest.approx(5e-5)


def test_stage_2_and_3_take_dinov3s_gram_and_high_res_optimiser_and_refresh_values():
    stage2, stage3 = load_config("stage2_gram_anchoring"), load_config("stage3_high_resolution")
    for stage in (stage2, stage3):
        assert (stage.optim.layerwise_decay, stage.optim.adamw_betas, stage.optim.clip_grad) == (0.98, [0.9, 0.99], 30.0)
        assert stage.model.drop_path_mode == "batch_subset"
    assert (stage2.gram.refresh_every, stage2.gram.refresh_first, stage2.gram.refresh_max) == (10000, 10000, 3)
    assert stage3.gram.refresh_every == 0
    assert resolutions(stage3.crops) == [(512, 112, 768), (768, 112, 1152), (768, 160, 1152), (768, 224, 1152),
                                         (768, 336, 1152)]
    assert stage3.crops.mixed_ratios == [0.3, 0.3, 0.3, 0.05, 0.05]
    assert resolutions(stage2.crops) == [(224, 96, 448)]


def test_mixed_resolutions_are_checked():
    base = ["crops.global_size=32", "crops.local_size=16"]
    with pytest.raises(ConfigError, match="one entry per resolution"):
        load_config("tiny_cpu", base + ["crops.mixed_global_sizes=[32, 48]", "crops.mixed_local_sizes=[16]",
                                        "crops.mixed_ratios=[1, 1]"])
    with pytest.raises(ConfigError, match="must equal the first entries"):
        load_config("tiny_cpu", base + ["crops.mixed_global_sizes=[48, 32]", "crops.mixed_local_sizes=[16, 16]",
                                        "crops.mixed_ratios=[1, 1]"])
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        load_config("tiny_cpu", base + ["crops.mixed_global_sizes=[32, 40]", "crops.mixed_local_sizes=[16, 16]",
                                        "crops.mixed_ratios=[1, 1]"])
