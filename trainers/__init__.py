"""nnU-Net trainer classes of meddinov3-nnunet (installed as `meddinov3_nnunet.trainers`).

nnU-Net finds them through `nnUNet_extTrainer` pointing at `meddinov3_nnunet.ext_trainer_dir()`, whose module
star-imports this package. `TRAINER_NAMES` (also `__all__`) is derived, not kept by hand: every `nnUNetTrainer`
subclass defined in a module of this package, except bases for variants (names ending in ``Base``). A new trainer
is therefore a class in any module here.
"""
import importlib
import inspect
import pkgutil

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _trainer_classes() -> dict[str, type]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda item: item.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, nnUNetTrainer) and value.__module__ == module.__name__
                    and not name.endswith("Base")):
                found[name] = value
    return found


_TRAINERS = _trainer_classes()
globals().update(_TRAINERS)
TRAINER_NAMES = list(_TRAINERS)
__all__ = TRAINER_NAMES
