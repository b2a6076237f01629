"""Where nnU-Net prediction time goes: s/case, network forwards per case and ms per forward, per network row.

    python benchmarks/predict_speed.py                                   # nnU-Net 2d vs ViT-S on 2d, 3 cases
    python benchmarks/predict_speed.py --rows nnUNetTrainer:2d MedDINOv3Trainer_S:2d:off MedDINOv3Trainer_S:2d:bf16 \\
        --cases 5 --rounds 3 --threads 2 --out predict_speed.md

Each row is ``TRAINER:CONFIGURATION[:OPTION...]``; options for the plugin's trainers: a MEDDINOV3_AMP value
(auto, bf16, fp16, off), ``conv`` (the decoder through PyTorch's transposed convolutions, for an A/B) and ``nopack``
(linear layers through autocast's per-call weight casts instead of the packed bf16 weights of
`meddinov3_nnunet.models.cpu_inference`, for an A/B). The script
plans a few shared Hippocampus cases with stock nnU-Net (fingerprint + plans, no preprocessing) and
``meddinov3-nnunet plan --preset cpu`` (configuration 2d_meddinov3) in a temporary folder, builds every row's
network through its trainer class with a fixed random initialisation, and predicts real cases with nnU-Net's
own `nnUNetPredictor.predict_single_npy_array` (preprocessing, sliding window with Gaussian weighting and
mirroring, resampling back) on the CPU. Rows are interleaved over rounds; the table gives the median s/case with
its min-max, and the share of the time spent in network forwards. ``--forward-only N`` times batch-1 forwards at
each row's patch size instead (the unit the predictor calls once per tile and mirror).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meddinov3_nnunet.atomic_io import print_and_write
from meddinov3_nnunet.models import cpu_inference

PACKING_AVAILABLE = cpu_inference._MKLDNN

REPO = Path(__file__).resolve().parents[1]


def plan_workspace(shared: Path, root: Path, plan_cases: int) -> Path:
    """Links ``plan_cases`` Hippocampus cases into a raw folder and runs nnU-Net's fingerprint + planning."""
    source = shared / "datasets" / "Dataset004_Hippocampus"
    raw = root / "raw" / "Dataset004_Hippocampus"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    names = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    for name in names[:plan_cases]:
        (raw / "imagesTr" / f"{name}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{name}_0000.nii.gz")
        (raw / "labelsTr" / f"{name}.nii.gz").symlink_to(source / "labelsTr" / f"{name}.nii.gz")
    meta = json.loads((source / "dataset.json").read_text())
    meta["numTraining"] = plan_cases
    (raw / "dataset.json").write_text(json.dumps(meta))
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"))
    bin_dir = Path(sys.executable).parent
    for command in (["nnUNetv2_extract_fingerprint", "-d", "4", "-np", "1"], ["nnUNetv2_plan_experiment", "-d", "4"]):
        subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, check=True, capture_output=True)
    # the ViT-aware configuration 2d_meddinov3 (cpu preset: 2x in-plane, patch 112 x 80), plans only
    subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", "4", "--preset", "cpu",
                    "--no-preprocess"], env=env, check=True, capture_output=True)
    return root / "preprocessed" / "Dataset004_Hippocampus"


def use_transposed_convolutions(network) -> None:
    """The decoder as plain modules (ConvTranspose2d -> LayerNorm2d -> GELU, 1x1 Conv2d): the reference path."""
    from torch import nn

    for stage in network.decoder.stages:
        stage.forward = nn.Sequential.forward.__get__(stage)
    network.decoder.forward = lambda features: network.decoder.head(network.decoder.stages(features))


def build_predictor(row: str, plans: dict, dataset_json: dict, seed: int):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from meddinov3_nnunet import trainers
    from meddinov3_nnunet.nnunet import precision

    trainer_name, configuration, *options = row.split(":")
    plans = json.loads(json.dumps(plans))
    trainer_class = nnUNetTrainer if trainer_name == "nnUNetTrainer" else getattr(trainers, trainer_name)
    if hasattr(trainer_class, "_adapt_plans"):
        trainer_class._adapt_plans(plans, configuration)  # patch size rounded to multiples of 16, as in training
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(seed)
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, 1, num_classes,
                                                       enable_deep_supervision=False)
    for option in options:
        if option == "conv":
            use_transposed_convolutions(network)
        elif option == "nopack":
            pass  # applied around each of the row's predictions (see `packing`)
        else:
            network.autocast_dtypes = precision.autocast_dtypes(option)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [network.state_dict()],
                                    dataset_json, trainer_name,
                                    inference_allowed_mirroring_axes=tuple(range(len(configuration_manager.patch_size))))
    forwards = {"count": 0, "seconds": 0.0}

    def before(module, inputs):
        forwards["start"] = time.perf_counter()

    def after(module, inputs, output):
        forwards["count"] += 1
        forwards["seconds"] += time.perf_counter() - forwards["start"]

    network.register_forward_pre_hook(before)
    network.register_forward_hook(after)
    return predictor, forwards, configuration_manager.patch_size


def packing(row: str) -> bool:
    """Whether the row predicts with packed bf16 linear weights (the default) or autocast's casts (``nopack``)."""
    return "nopack" not in row.split(":")[2:]


def forward_table(rows: dict, args) -> int:
    import torch

    times = {row: [] for row in rows}
    with torch.inference_mode():
        for entry in rows.values():
            entry["input"] = torch.randn(1, 1, *entry["patch"])
            entry["predictor"].network.eval()(entry["input"])  # warm-up
        for round_index in range(args.rounds):
            for row in (list(rows) if round_index % 2 == 0 else list(rows)[::-1]):
                network, x = rows[row]["predictor"].network, rows[row]["input"]
                cpu_inference._MKLDNN = packing(row) and PACKING_AVAILABLE
                start = time.perf_counter()
                for _ in range(args.forward_only):
                    network(x)
                times[row].append(1000 * (time.perf_counter() - start) / args.forward_only)
    lines = [f"Batch-1 forward at the patch size (inference_mode, CPU, {args.threads} thread(s)), "
             f"{args.forward_only} forwards x {args.rounds} interleaved rounds.", "",
             "| row | patch | ms / forward (median, min-max) |", "|---|---|---|"]
    for row, values in times.items():
        lines.append(f"| {row} | {'x'.join(map(str, rows[row]['patch']))} | {statistics.median(values):.1f} "
                     f"({min(values):.1f}-{max(values):.1f}) |")
    print_and_write("\n".join(lines) + "\n", args.out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["nnUNetTrainer:2d", "MedDINOv3Trainer_S:2d"])
    parser.add_argument("--cases", type=int, default=3, help="cases predicted per round (cases 100, 101, ...)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-mirroring", action="store_true")
    parser.add_argument("--forward-only", type=int, metavar="N", default=0,
                        help="instead of predicting cases, time N batch-1 forwards at each row's patch size per round "
                             "(the unit nnU-Net's predictor calls: one tile, one mirror)")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("MEDDINOV3_SHARED", REPO.parent / "shared")))
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    os.environ["nnUNet_def_n_proc"] = str(args.threads)  # nnU-Net sets torch's threads to this while predicting

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        preprocessed = plan_workspace(args.shared, Path(tmp), plan_cases=10)
        plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    images = sorted((args.shared / "datasets" / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    cases = [SimpleITKIO().read_images([str(path)]) for path in images[100:100 + args.cases]]
    rows = {}
    for row in args.rows:
        predictor, forwards, patch = build_predictor(row, plans, dataset_json, seed=0)
        predictor.use_mirroring = not args.no_mirroring
        rows[row] = dict(predictor=predictor, forwards=forwards, patch=patch, seconds=[], forward_seconds=0.0,
                         count=0)
    if args.forward_only:
        return forward_table(rows, args)
    for round_index in range(args.rounds):
        for row, entry in rows.items():
            cpu_inference._MKLDNN = packing(row) and PACKING_AVAILABLE
            for image, properties in cases:
                entry["forwards"].update(count=0, seconds=0.0)
                start = time.perf_counter()
                entry["predictor"].predict_single_npy_array(image, properties)
                entry["seconds"].append(time.perf_counter() - start)
                entry["forward_seconds"] += entry["forwards"]["seconds"]
                entry["count"] += entry["forwards"]["count"]
            print(f"round {round_index + 1}: {row} {statistics.median(entry['seconds'][-len(cases):]):.2f} s/case",
                  file=sys.stderr, flush=True)
    lines = [f"nnU-Net prediction on the CPU ({args.threads} thread(s), torch {torch.__version__}), "
             f"{args.cases} Hippocampus cases x {args.rounds} interleaved rounds, mirroring "
             f"{'off' if args.no_mirroring else 'on (4 passes in 2D, 8 in 3D)'}, random weights.", "",
             "| row | patch | s / case (median, min-max) | forwards / case | ms / forward | forward share |",
             "|---|---|---|---|---|---|"]
    for row, entry in rows.items():
        seconds = entry["seconds"]
        runs = len(seconds)
        lines.append(f"| {row} | {'x'.join(map(str, entry['patch']))} | {statistics.median(seconds):.2f} "
                     f"({min(seconds):.2f}-{max(seconds):.2f}) | {entry['count'] / runs:.0f} | "
                     f"{1000 * entry['forward_seconds'] / max(entry['count'], 1):.1f} | "
                     f"{entry['forward_seconds'] / sum(seconds):.0%} |")
    print_and_write("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
