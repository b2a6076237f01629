"""The `meddinov3-nnunet` console script.

Each sub-command lives in its own module exposing `configure_parser(parser)` and `run(args) -> int`;
those modules keep heavy imports (torch, nnunetv2) inside `run`, so `--help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Adding a sub-command is one line here plus its module.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect-checkpoint": ("meddinov3_nnunet.models.inspect_cmd",
                           "detect a checkpoint's format and architecture"),
    "demo": ("meddinov3_nnunet.demo", "run plan -> fine-tune -> predict -> evaluate on a small (synthetic) dataset"),
    "benchmark": ("meddinov3_nnunet.evaluation.cli_benchmark", "train, evaluate and tabulate several trainer rows under one budget"),
    "evaluate": ("meddinov3_nnunet.evaluation.cli_evaluate", "DSC / NSD / HD95 of predicted label maps, per case and class"),
    "doctor": ("meddinov3_nnunet.nnunet.doctor", "check versions, nnU-Net paths, trainer discovery and weights"),
    "plan": ("meddinov3_nnunet.nnunet.plan_cmd", "add a ViT-aware 2D configuration to nnU-Net's plans and preprocess it"),
    "pretrain": ("meddinov3_nnunet.pretraining.pretrain_cmd", "pretrain a DINOv3 encoder on CT/MRI slices (MedDINOv3 stages 1-3)"),
    "export": ("meddinov3_nnunet.pretraining.export_cmd", "export a pretraining run's encoder for the trainers and in MedDINOv3's layout"),
    "features": ("meddinov3_nnunet.probing.features_cmd", "picture of a slice and the PCA of its patch tokens (see an encoder)"),
    "probe": ("meddinov3_nnunet.probing.probe_cmd", "frozen-encoder linear probe Dice of checkpoints on an nnU-Net raw dataset"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddinov3-nnunet", description=__doc__.splitlines()[0])
    from meddinov3_nnunet import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb. A `UserError` becomes one `error: ...` line on stderr and its exit code; every other
    exception is a bug and keeps its traceback."""
    from meddinov3_nnunet.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
