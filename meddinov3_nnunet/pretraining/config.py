"""The pretraining recipe: a typed schema, YAML loading, ``--set`` overrides and run-to-run comparison.

Every hyperparameter of the three stages is a field below; the stage YAMLs in ``configs/`` name each one
with its source. Loading is strict: an unknown key (in a YAML file or a ``--set``) is an error that names the
key, the closest valid key and the file, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meddinov3_nnunet import named_files
from meddinov3_nnunet.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
YAML_SUFFIXES = (".yaml", ".yml")


class ConfigError(InputError):
    """A recipe that cannot be used; the message names the key/file at fault and the fix."""


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: str = "vit_b16"  # encoder preset (meddinov3_nnunet.models.presets)
    flavour: str = "meddinov3"  # 'meddinov3' (no qkv bias) or 'meta'
    drop_path_rate: float = 0.3
    drop_path_mode: str = "batch_subset"  # DINOv3's (same rate in every block, a random batch subset) or 'timm'
    layerscale_init: typing.Optional[float] = None  # None: the preset's 1e-5; only matters without --init
    init: typing.Optional[str] = None  # encoder/teacher/run checkpoint to start from; None = random init
    init_heads: bool = True  # also take dino_head/ibot_head from --init when it carries them
    grad_checkpointing: bool = False


@dataclass
class CorpusConfig:
    """How volumes become slices. Recorded in the corpus manifest; a manifest built with other values is
    refused (rebuild it)."""

    ct_hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    ct_zscore: list[float] = field(default_factory=lambda: [65.108, 178.017])  # (mean, std) after clipping
    ct_air_hu: float = -900.0  # CT voxels above this count as foreground (body, not air)
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # robust clip before z-score
    min_foreground_fraction: float = 0.05  # slices with less foreground are dropped
    min_slice_std: float = 0.05  # slices whose normalised intensities vary less are dropped


@dataclass
class DataConfig:
    chunk_volumes: int = 4  # volumes held in RAM per data-loader worker; slices are shuffled within a chunk
    num_workers: int = 8  # data-loader processes per rank (0: load in the training process)


@dataclass
class CropsConfig:
    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_number: int = 8
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    gram_teacher_size: typing.Optional[int] = None  # None: no Gram-teacher crops (stage 1)
    # Mixed resolutions (DINOv3's high-res stage): each step draws one (global, local, Gram-teacher) size triple
    # with these ratios. Empty: one resolution. When set, global_size / local_size / gram_teacher_size must
    # equal the first entries (one truth in the YAML).
    mixed_global_sizes: list[int] = field(default_factory=list)
    mixed_local_sizes: list[int] = field(default_factory=list)
    mixed_gram_teacher_sizes: list[int] = field(default_factory=list)
    mixed_ratios: list[float] = field(default_factory=list)
    horizontal_flip: float = 0.5
    vertical_flip: float = 0.0
    intensity_probability: float = 0.8  # replaces DINOv3's colour jitter (p 0.8) for grey CT slices
    intensity_shift: float = 0.1  # +- shift in z-score units
    intensity_scale: float = 0.1  # x (1 +- scale)
    blur_probability: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class HeadLossConfig:
    """A projection head (DINOv3 ``DINOHead``: MLP -> bottleneck -> prototypes) and its loss weight."""

    loss_weight: float = 1.0
    head_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3


@dataclass
class DinoConfig(HeadLossConfig):
    local_loss_weight: float = 1.0  # DINOv3's `reweight_dino_local_loss` (0.5 in its Gram/high-res stages)
    global_ignore_diagonal: bool = True
    koleo_loss_weight: float = 0.1
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1


@dataclass
class IBotConfig(HeadLossConfig):
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])


@dataclass
class MimConfig:
    """Masked-image reconstruction beside iBOT: a linear head on the student's masked patch tokens regresses the
    pixels of those patches (SimMIM: L1 on raw pixels; MAE: MSE on per-patch normalised pixels)."""

    enabled: bool = False
    loss_weight: float = 1.0
    norm_pixels: bool = True  # MAE's targets: each patch minus its mean, over sqrt(var + 1e-6)
    loss: str = "l1"  # 'l1' (SimMIM) | 'mse' (MAE)


MIM_LOSSES = ("l1", "mse")


@dataclass
class GramConfig:
    enabled: bool = False
    teacher: typing.Optional[str] = None  # frozen Gram teacher: a run checkpoint or an encoder checkpoint
    loss_weight: float = 2.0
    remove_negatives: str = "none"  # 'none' | 'both' | 'teacher' (DINOv3 remove_neg / remove_only_teacher_neg)
    resize_mode: str = "bicubic"  # Gram-teacher features -> student patch grid
    resize_antialias: bool = False
    # Gram-teacher refresh (DINOv3 gram.rep_update): after step s with s >= refresh_first and
    # s % refresh_every == 0 the Gram teacher becomes a copy of the EMA teacher's backbone, at most refresh_max
    # times (null: no limit). refresh_every 0: the Gram teacher stays fixed.
    refresh_every: int = 0
    refresh_first: int = 0
    refresh_max: typing.Optional[int] = None


@dataclass
class Schedule:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_iterations``, then a cosine from ``peak`` to
    ``end`` over ``cosine_iterations`` (default: the remaining iterations), then ``end`` (DINOv3's
    ``linear_warmup_cosine_decay``). ``peak`` 0 with ``end`` > 0 and no warm-up is DINOv3's half-cosine ramp."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_iterations: int = 0
    cosine_iterations: typing.Optional[int] = None  # None: the cosine spans the rest; else constant ``end`` after it


@dataclass
class OptimConfig:
    iterations: int = 120000
    batch_size: int = 512  # global (all ranks together); each rank takes batch_size / world_size
    lr: Schedule = field(default_factory=lambda: Schedule(0.0, 2e-4, 1e-6, 12000))
    weight_decay: Schedule = field(default_factory=lambda: Schedule(0.04, 0.04, 0.4, 0))
    momentum: Schedule = field(default_factory=lambda: Schedule(0.992, 0.992, 1.0, 0))
    teacher_temp: Schedule = field(default_factory=lambda: Schedule(0.04, 0.07, 0.07, 36000))
    freeze_last_layer_iterations: int = 1250
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # DINOv3's optim.scaling_rule: lr.peak and lr.end are multiplied by 4 * sqrt(batch_size / 1024)
    # ('sqrt_wrt_1024') or batch_size / 256 ('linear_wrt_256'); 'none' uses them as given.
    lr_scaling_rule: str = "none"


@dataclass
class TrainConfig:
    seed: int = 0
    checkpoint_every: int = 1000  # iterations between `checkpoint.pth` saves
    keep_every: int = 10000  # also keep `checkpoint_stepNNNNNNN.pth` every so often (Gram teachers)
    precision: str = "bf16"  # autocast dtype on CUDA ('bf16' | 'fp32'); the CPU always runs fp32
    # Gradient accumulation: each rank's share of optim.batch_size runs as this many forward/backward passes of
    # batch_size / (ranks x grad_accum_steps) images before the one optimiser step (global batch, schedules, EMA
    # and data unchanged; Sinkhorn-Knopp centring and KoLeo see one pass's images, as at that smaller batch).
    grad_accum_steps: int = 1
    log_every: int = 10  # steps between reads of the logged scalars from the device (metrics.jsonl stays per step)


@dataclass
class EvaluationConfig:
    """Linear probe of the EMA teacher's backbone during the run (`meddinov3-nnunet probe`'s protocol, as DINOv3
    evaluates its teacher), logged to ``probe.jsonl`` and drawn beside the losses. Off while probe_every is 0."""

    probe_every: int = 0  # steps between probes (0: off)
    probe_data: typing.Optional[str] = None  # nnU-Net raw dataset (dataset.json, imagesTr, labelsTr)
    probe_size: int = 112  # encoder input size, px
    probe_train_pixels: int = 20000
    probe_max_cases: typing.Optional[int] = 20  # the first N cases (null: all); every 5th is a test case


@dataclass
class PretrainConfig:
    name: str = "custom"
    stage: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBotConfig = field(default_factory=IBotConfig)
    mim: MimConfig = field(default_factory=MimConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "PretrainConfig":
        from .config_checks import check_config  # the checks read the schema: imported when first used

        check_config(self)
        return self


# Keys that describe where a run writes or how fast it goes, not what it learns: a resume may change them.
RUNTIME_KEYS = {"train.checkpoint_every", "train.keep_every", "train.log_every", "evaluation.probe_every",
                "evaluation.probe_data",
                "evaluation.probe_size", "evaluation.probe_train_pixels", "evaluation.probe_max_cases"}


def encoder_arch(config: "PretrainConfig"):
    """The encoder architecture a recipe trains (preset + flavour + LayerScale init)."""
    from meddinov3_nnunet.models.presets import preset

    arch = preset(config.model.arch, config.model.flavour)
    if config.model.layerscale_init is not None:
        arch = arch.replace(layerscale_init=config.model.layerscale_init)
    return arch


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def available_configs() -> list[str]:
    return named_files.available(CONFIG_DIR, YAML_SUFFIXES)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped recipe name (``stage1_pretrain``) or a path to a YAML file."""
    return named_files.resolve(name_or_path, CONFIG_DIR, "config", YAML_SUFFIXES, ConfigError)


def load_config(name_or_path: str | Path = "stage1_pretrain", overrides: typing.Sequence[str] = ()) -> PretrainConfig:
    """Recipe from a YAML file (every key checked against the schema), then ``key=value`` overrides."""
    path = resolve_config_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(values).__name__}")
    config = from_dict(values, origin=str(path))
    return apply_overrides(config, overrides)


def from_dict(values: dict, origin: str = "config") -> PretrainConfig:
    config = PretrainConfig()
    _merge(config, values, prefix="", origin=origin)
    return config.validate()


def apply_overrides(config: PretrainConfig, overrides: typing.Sequence[str]) -> PretrainConfig:
    """``["optim.lr.peak=1e-4", "crops.local_number=4"]`` -> a new, validated config."""
    config = from_dict(config.to_dict(), origin="config")  # a deep copy; the caller's config stays as it was
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr.peak=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(config, nested, prefix="", origin=f"--set {item}")
    return config.validate()


def _valid_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_valid_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def all_keys() -> list[str]:
    return _valid_keys(PretrainConfig())


def _merge(target, values: dict, prefix: str, origin: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            candidates = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(dotted, all_keys(), n=1) or difflib.get_close_matches(dotted, candidates, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{origin}: unknown config key {dotted!r}.{hint} Valid keys in "
                              f"{prefix.rstrip('.') or 'the top level'}: {sorted(candidates)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                leaves = [k for k in all_keys() if k.startswith(dotted + ".")]
                raise ConfigError(f"{origin}: {dotted} is a section, not a value; set its keys instead: "
                                  f"{', '.join(leaves)}")
            _merge(current, value, prefix=f"{dotted}.", origin=origin)
        else:
            setattr(target, key, _coerce(value, hints[key], dotted, origin))


def _coerce(value, annotation, key: str, origin: str):
    origin_type = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin_type is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
        return _coerce(value, annotation, key, origin)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if annotation is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, (int, str)):
                return int(float(value)) if isinstance(value, str) and float(value).is_integer() else int(value)
            raise TypeError
        if annotation is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation is str:
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
        if origin_type is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce(v, args[0], key, origin) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {key} must be {_type_name(annotation)}, got {value!r}") from None
    raise ConfigError(f"{origin}: {key} has an unsupported type {annotation}")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


LR_SCALING_RULES = {"none": None, "sqrt_wrt_1024": "4 * sqrt(B / 1024)", "linear_wrt_256": "B / 256"}


def lr_scale(optim: "OptimConfig") -> float:
    """The factor DINOv3's ``optim.scaling_rule`` applies to the lr schedule's peak and end at the global batch."""
    if optim.lr_scaling_rule == "sqrt_wrt_1024":
        return 4.0 * (optim.batch_size / 1024.0) ** 0.5
    if optim.lr_scaling_rule == "linear_wrt_256":
        return optim.batch_size / 256.0
    return 1.0


def resolutions(crops: "CropsConfig") -> list[tuple[int, int, int | None]]:
    """The (global, local, Gram-teacher) crop sizes a run draws from; one entry without mixed resolutions."""
    if not crops.mixed_global_sizes:
        return [(crops.global_size, crops.local_size, crops.gram_teacher_size)]
    grams = crops.mixed_gram_teacher_sizes or [None] * len(crops.mixed_global_sizes)
    return list(zip(crops.mixed_global_sizes, crops.mixed_local_sizes, grams))


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: dict, current: dict, ignore: typing.Iterable[str] = RUNTIME_KEYS) -> list[str]:
    """``key: saved -> current`` for every recipe key that differs (runtime-only keys ignored)."""
    a, b = flatten(saved), flatten(current)
    keys = sorted((set(a) | set(b)) - set(ignore))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys if a.get(k) != b.get(k)]


def dump_yaml(config: PretrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
