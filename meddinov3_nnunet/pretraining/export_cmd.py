"""`meddinov3-nnunet export RUN`: a pretraining run's encoder for the trainers and in MedDINOv3's layout."""
from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="pretraining run folder (its checkpoint.pth) or a checkpoint*.pth of a run")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="where encoder.pth and meddinov3_teacher.pth go (default: RUN/export)")
    parser.add_argument("--student", action="store_true",
                        help="export the student instead of the EMA teacher (the default, as DINO releases)")


def run(args: argparse.Namespace) -> int:
    from .export import export_run

    written = export_run(args.run, args.output_dir, "student" if args.student else "teacher")
    print(f"exported the {written['weights']} of {written['source']} (step {written['step']}/{written['total_steps']}, "
          f"recipe {written['recipe']}):")
    print(f"  {written['encoder']}  (trainer format: MEDDINOV3_WEIGHTS=... or `meddinov3-nnunet plan --weights`)")
    print(f"  {written['meddinov3_teacher']}  (MedDINOv3 layout: {{'teacher': {{backbone.*, dino_head.*, ibot_head.*}}}})")
    return 0
