"""`meddinov3-nnunet plan -d DATASET`: add a ViT-aware 2D configuration to nnU-Net's plans and preprocess it."""
from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (after nnUNetv2_plan_and_preprocess)")
    from meddinov3_nnunet.plans import available_presets

    parser.add_argument("--preset", default="default", choices=available_presets(),
                        help="planning preset in plans/ (default: the paper's rule; cpu: small, for CPU machines)")
    parser.add_argument("--target-size", type=int, help="target in-plane size in pixels (preset: 896 / 128)")
    parser.add_argument("--max-scale", type=float, help="largest in-plane upsampling factor (preset: 4 / 2)")
    parser.add_argument("--batch-size", type=int, help="batch size instead of the token and memory budgets (a warning "
                                                       "when it does not fit --gpu-memory)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="GPU memory per GPU in GiB: the batch is the largest up to the token budget whose training "
                             "step fits (estimated without a GPU; preset: 80 / none for cpu; 0: no memory budget)")
    parser.add_argument("--trainer", default="MedDINOv3Trainer",
                        help="the trainer whose step --gpu-memory fits (default MedDINOv3Trainer)")
    parser.add_argument("--trainer-3d", default="MedDINOv3Trainer_3d",
                        help="the same for 3d_meddinov3 (default MedDINOv3Trainer_3d)")
    parser.add_argument("-c", "--configuration-name", help="name of the new configuration (default 2d_meddinov3)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--weights", help="encoder weights to fine-tune from, stored in the plans "
                                          "(MEDDINOV3_WEIGHTS wins over it at training time)")
    parser.add_argument("--no-preprocess", action="store_true", help="only write the plans")
    parser.add_argument("--no-3d", action="store_true", help="do not add 3d_meddinov3 (derived from 3d_fullres when "
                                                             "the plans have it; for the 3D trainers)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")


def run(args: argparse.Namespace) -> int:
    from meddinov3_nnunet.nnunet.planning import plan

    dataset_name, vit = plan(args.dataset, args.preset, args.plans, args.target_size, args.max_scale,
                             args.batch_size, args.configuration_name, args.weights,
                             preprocess=not args.no_preprocess, num_processes=args.num_processes,
                             volumetric=not args.no_3d, gpu_memory=args.gpu_memory, trainer=args.trainer,
                             trainer_3d=args.trainer_3d)
    print(f"{dataset_name}: configuration {vit.configuration_name!r} — spacing {vit.spacing}, patch {vit.patch_size} "
          f"({vit.tokens_per_patch} tokens), batch {vit.batch_size}, in-plane upsampling x{vit.scale:g}")
    if vit.memory is not None:
        print(f"  {vit.memory.describe()}")
    print(f"train with: nnUNetv2_train {dataset_name} {vit.configuration_name} FOLD -tr {args.trainer}")
    if vit.volumetric is not None:
        v = vit.volumetric
        print(f"{dataset_name}: configuration {v.configuration_name!r} — spacing {v.spacing}, patch {v.patch_size} "
              f"({v.tokens_per_patch} tokens), batch {v.batch_size}; for the 3D trainers: "
              f"nnUNetv2_train {dataset_name} {v.configuration_name} FOLD -tr {args.trainer_3d}")
        if v.memory is not None:
            print(f"  {v.memory.describe()}")
    return 0
