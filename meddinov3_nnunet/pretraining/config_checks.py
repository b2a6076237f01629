"""The checks of a loaded recipe (`PretrainConfig.validate`): every value a run cannot use is one `ConfigError`
that names the key and what it must be."""
from __future__ import annotations

from .config import LR_SCALING_RULES, MIM_LOSSES, ConfigError, CropsConfig, PretrainConfig, flatten, resolutions

# Fixed-length list fields: key -> length
_PAIRS = {
    "corpus.ct_hu_window": 2, "corpus.ct_zscore": 2, "corpus.mri_percentiles": 2, "crops.global_scale": 2,
    "crops.local_scale": 2, "crops.blur_probability": 3, "crops.blur_sigma": 2, "ibot.mask_ratio_min_max": 2,
    "optim.adamw_betas": 2,
}


def check_config(config: PretrainConfig) -> None:
    """Raises one `ConfigError` naming the first value that cannot be used and the fix."""
    from meddinov3_nnunet.models.presets import FLAVOURS, SIZES

    def fail(key, message):
        raise ConfigError(f"config value {key}: {message}")

    flat = flatten(config.to_dict())
    for key, length in _PAIRS.items():
        if len(flat[key]) != length:
            fail(key, f"needs {length} numbers, got {flat[key]}")
    if config.model.arch not in SIZES:
        fail("model.arch", f"unknown preset {config.model.arch!r}; choose one of {sorted(SIZES)}")
    if config.model.layerscale_init is not None and config.model.layerscale_init <= 0:
        fail("model.layerscale_init", "must be positive (or null for the preset's value)")
    if config.model.flavour not in FLAVOURS:
        fail("model.flavour", f"choose one of {sorted(FLAVOURS)}")
    for key in ("crops.global_size", "crops.local_size"):
        if flat[key] <= 0 or flat[key] % 16:
            fail(key, f"{flat[key]} must be a positive multiple of the patch size 16")
    if config.crops.gram_teacher_size is not None and (config.crops.gram_teacher_size % 16 or
                                                       config.crops.gram_teacher_size < config.crops.global_size):
        fail("crops.gram_teacher_size", "must be a multiple of 16 and at least crops.global_size")
    if config.gram.enabled and config.crops.gram_teacher_size is None:
        fail("crops.gram_teacher_size", "gram.enabled needs the Gram-teacher crop size (e.g. 2 x crops.global_size)")
    if config.gram.remove_negatives not in ("none", "both", "teacher"):
        fail("gram.remove_negatives", "choose 'none', 'both' or 'teacher'")
    if config.gram.resize_mode not in ("bicubic", "bilinear", "nearest", "area"):
        fail("gram.resize_mode", "choose bicubic, bilinear, nearest or area")
    if config.crops.local_number < 1:
        fail("crops.local_number", "DINOv3's multi-crop needs at least one local crop")
    for key in ("crops.global_scale", "crops.local_scale", "ibot.mask_ratio_min_max"):
        low, high = flat[key]
        lowest_ok = low >= 0 if key.startswith("ibot") else low > 0
        if not (lowest_ok and low <= high <= 1):
            fail(key, f"needs 0 < min <= max <= 1, got {flat[key]}")
    for key in ("optim.iterations", "optim.batch_size", "train.checkpoint_every", "train.keep_every",
                "train.grad_accum_steps", "train.log_every", "dino.head_prototypes", "ibot.head_prototypes",
                "data.chunk_volumes"):
        if flat[key] < 1:
            fail(key, f"must be at least 1, got {flat[key]}")
    if config.optim.batch_size % config.train.grad_accum_steps:
        fail("train.grad_accum_steps", f"{config.train.grad_accum_steps} does not divide optim.batch_size "
                                       f"{config.optim.batch_size} (the global batch is kept; each pass takes a share)")
    if config.data.num_workers < 0:
        fail("data.num_workers", "must be 0 or more")
    if config.evaluation.probe_every < 0:
        fail("evaluation.probe_every", "must be 0 (off) or a number of steps")
    if config.evaluation.probe_every and not config.evaluation.probe_data:
        fail("evaluation.probe_data", "evaluation.probe_every needs an nnU-Net raw dataset to probe on, e.g. "
                                      "--set evaluation.probe_data=nnUNet_raw/Dataset004_Hippocampus")
    if config.evaluation.probe_size <= 0 or config.evaluation.probe_size % 16:
        fail("evaluation.probe_size", f"{config.evaluation.probe_size} must be a positive multiple of the patch size 16")
    if config.train.precision not in ("bf16", "fp32"):
        fail("train.precision", "choose 'bf16' or 'fp32'")
    if config.dino.head_layers < 1 or config.ibot.head_layers < 1:
        fail("dino.head_layers", "heads need at least one layer")
    if config.model.drop_path_mode not in ("batch_subset", "timm"):
        fail("model.drop_path_mode", "choose 'batch_subset' (DINOv3) or 'timm'")
    if config.optim.lr_scaling_rule not in LR_SCALING_RULES:
        fail("optim.lr_scaling_rule", f"choose one of {sorted(LR_SCALING_RULES)}")
    for key in ("lr", "weight_decay", "momentum", "teacher_temp"):
        schedule = getattr(config.optim, key)
        used = schedule.warmup_iterations + (schedule.cosine_iterations or 0)
        too_long = used > config.optim.iterations
        if schedule.cosine_iterations is not None and (schedule.cosine_iterations < 1 or too_long):
            fail(f"optim.{key}.cosine_iterations", f"must be at least 1 and, with the warm-up, at most "
                                                   f"optim.iterations ({config.optim.iterations})")
    mim = config.mim
    if mim.loss_weight < 0:
        fail("mim.loss_weight", f"must be 0 or more, got {mim.loss_weight}")
    if mim.loss not in MIM_LOSSES:
        fail("mim.loss", f"unknown loss {mim.loss!r}; choose 'l1' (SimMIM) or 'mse' (MAE)")
    if mim.enabled and (config.ibot.mask_sample_probability <= 0 or config.ibot.mask_ratio_min_max[1] <= 0):
        fail("mim.enabled", "the masked-pixel objective reconstructs the patches iBOT masks, but this recipe masks "
                            f"none (ibot.mask_sample_probability {config.ibot.mask_sample_probability}, "
                            f"ibot.mask_ratio_min_max {config.ibot.mask_ratio_min_max}); set both above 0")
    gram = config.gram
    if gram.refresh_every < 0 or gram.refresh_first < 0 or (gram.refresh_max is not None and gram.refresh_max < 0):
        fail("gram.refresh_every", "refresh_every, refresh_first and refresh_max must not be negative")
    _validate_mixed_crops(config.crops, config.gram.enabled, fail)


def _validate_mixed_crops(crops: "CropsConfig", gram_enabled: bool, fail) -> None:
    lists = {"crops.mixed_global_sizes": crops.mixed_global_sizes, "crops.mixed_local_sizes": crops.mixed_local_sizes,
             "crops.mixed_ratios": crops.mixed_ratios}
    if gram_enabled or crops.mixed_gram_teacher_sizes:
        lists["crops.mixed_gram_teacher_sizes"] = crops.mixed_gram_teacher_sizes
    if not any(lists.values()):
        return
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1:
        fail("crops.mixed_global_sizes", f"{', '.join(lists)} need one entry per resolution each, got "
                                         f"{', '.join(str(len(v)) for v in lists.values())} entries")
    if any(r <= 0 for r in crops.mixed_ratios):
        fail("crops.mixed_ratios", f"ratios must be positive, got {crops.mixed_ratios}")
    for key in lists:
        if key != "crops.mixed_ratios" and any(size <= 0 or size % 16 for size in lists[key]):
            fail(key, f"{lists[key]}: every size must be a positive multiple of the patch size 16")
    first = resolutions(crops)[0]
    single = (crops.global_size, crops.local_size, crops.gram_teacher_size)
    if single != first:
        fail("crops.global_size", f"with mixed resolutions, global_size / local_size / gram_teacher_size must equal "
                                  f"the first entries {first}, got {single}")
    if any(g is not None and g < size for size, _, g in resolutions(crops)):
        fail("crops.mixed_gram_teacher_sizes", "each Gram-teacher size must be at least its global size")
