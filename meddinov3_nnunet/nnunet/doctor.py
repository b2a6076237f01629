"""`meddinov3-nnunet doctor`: where nnU-Net finds the trainers, which versions run, and what is missing."""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import os
import platform

from meddinov3_nnunet.autoregister import OPT_OUT, PTH_NAME, discovery_source
from meddinov3_nnunet.nnunet.environment import WEIGHTS_VARIABLES

DISCOVERY_WAYS = {"auto": f"automatic registration (the start-up file {PTH_NAME}; {OPT_OUT}=1 turns it off)",
                  "user": "your nnUNet_extTrainer setting",
                  "off": f"nothing: {OPT_OUT} is set and nnUNet_extTrainer does not list the trainer folder",
                  "missing": "nothing: nnUNet_extTrainer does not list the trainer folder"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", default="MedDINOv3Trainer", help="trainer name to look up (default MedDINOv3Trainer)")
    parser.add_argument("--trainer-dir", action="store_true",
                        help='print only the folder for nnUNet_extTrainer: export nnUNet_extTrainer="$(meddinov3-nnunet '
                             'doctor --trainer-dir)"')


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _reads(trainer, variable: str) -> bool:
    return trainer is not None and getattr(trainer, "weights_env_var", None) == variable


def check_weights(path: str, trainer=None) -> str:
    """The strict check of training (size, keys, non-finite values) on a weights file, against ``trainer``'s
    encoder when given (else the file's own architecture); returns a one-line description, raises
    `CheckpointError`, naming the trainer of the file's size when the size is wrong."""
    from meddinov3_nnunet.models.checkpoints import SizeMismatchError, check_checkpoint, read_checkpoint
    from meddinov3_nnunet.models.key_layouts import describe_arch

    checkpoint, arch = read_checkpoint(path), None
    if trainer is not None:
        from meddinov3_nnunet.models.patch_size import with_patch_size

        checkpoint = with_patch_size(checkpoint, trainer.encoder_patch_size)
        arch = trainer.encoder_arch()
    try:
        check_checkpoint(checkpoint, arch)
    except SizeMismatchError as err:
        names = trainer.trainer_names(lambda t: t.encoder_preset == err.checkpoint_preset
                                      and t.encoder_weights != "none") if trainer is not None else []
        raise SizeMismatchError(f"{err}" + (f"; for these weights use {names[0]} instead of {trainer.__name__}"
                                            if names else ""), err.checkpoint_preset) from None
    return f"{checkpoint.format}, {describe_arch(checkpoint.arch)}" + (
        f"; fits {trainer.__name__}" if trainer is not None else "")


def run(args: argparse.Namespace) -> int:
    import meddinov3_nnunet

    ext_dir = meddinov3_nnunet.ext_trainer_dir()
    if args.trainer_dir:
        print(ext_dir)
        return 0
    missing: list[str] = []
    print("versions")
    print(f"  python            {platform.python_version()}")
    for package in ("meddinov3-nnunet", "nnunetv2", "torch", "timm", "lightly", "monai"):
        print(f"  {package:<17} {_version(package)}")
    nnunet_version = _version("nnunetv2")
    if not nnunet_version.startswith("2.8"):
        missing.append(f"nnunetv2 {nnunet_version} installed; this plugin needs nnunetv2>=2.8,<2.9 "
                       f"(pip install 'nnunetv2>=2.8,<2.9')")

    import torch

    cuda = torch.cuda.is_available()
    devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    print(f"  CUDA devices      {devices}" + ("" if cuda else " (train and predict with -device cpu)"))

    print("nnU-Net paths")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(name)
        state = "not set" if not value else ("" if os.path.isdir(value) else "(folder does not exist yet)")
        print(f"  {name:<20} {value or ''} {state}".rstrip())
        if not value:
            missing.append(f"export {name}=/path/to/{name} (see nnU-Net's documentation/setting_up_paths.md)")
        elif name == "nnUNet_raw" and not os.path.isdir(value):  # the others nnU-Net creates; this one holds the data
            missing.append(f"nnUNet_raw={value} does not exist: create it and put the datasets there "
                           f"(DatasetXXX_Name/imagesTr, labelsTr, dataset.json)")

    trainer = None
    print("trainer discovery")
    print(f"  trainer folder    {ext_dir}")
    configured = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    print(f"  nnUNet_extTrainer {os.pathsep.join(configured) or 'not set'}")
    source = discovery_source(ext_dir)
    print(f"  found by          {DISCOVERY_WAYS[source]}")
    if source in ("off", "missing"):
        missing.append(f'export nnUNet_extTrainer="{ext_dir}"  (add it with "{os.pathsep}" if the variable '
                       f"already lists other folders)" + ("" if source == "off" else
                       f", or reinstall with pip, whose start-up file {PTH_NAME} does this in every Python"))
    else:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = recursive_find_trainer_class_by_name(args.trainer)
            print(f"  {args.trainer} found: {trainer.__module__}.{trainer.__qualname__}")
        except Exception as err:  # nnU-Net raises RuntimeError; a broken module in another folder anything
            missing.append(f"nnU-Net cannot load {args.trainer}: {str(err).splitlines()[0]}")

    print("encoder weights")
    for variable in WEIGHTS_VARIABLES:
        path = os.environ.get(variable)
        if not path:
            print(f"  {variable:<17} not set (or use `meddinov3-nnunet plan --weights`)")
            continue
        from meddinov3_nnunet.models.checkpoints import CheckpointError

        try:
            print(f"  {variable:<17} {path}: {check_weights(path, trainer if _reads(trainer, variable) else None)}")
        except CheckpointError as err:
            missing.append(f"{variable}: {err}")

    if missing:
        print("missing")
        for item in missing:
            print(f"  - {item}")
        return 1
    print("all set")
    return 0
