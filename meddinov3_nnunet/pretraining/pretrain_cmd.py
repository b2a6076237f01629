"""`meddinov3-nnunet pretrain`: build a slice corpus and run one pretraining stage (see README, "Pretraining")."""
from __future__ import annotations

import argparse
import os


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  meddinov3-nnunet pretrain --config tiny_cpu --data nnUNet_raw/Dataset004_Hippocampus -o runs/tiny\n"
        "  meddinov3-nnunet pretrain --config stage1_pretrain --data ct=/data/ct --init dinov3_vitb16.pth -o runs/s1\n"
        "  meddinov3-nnunet pretrain --resume -o runs/s1\n"
        "  torchrun --nproc_per_node 8 -m meddinov3_nnunet.cli pretrain --config stage1_pretrain "
        "--manifest corpus.json -o runs/s1")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--config", default=None,
                        help="stage1_pretrain, stage2_gram_anchoring, stage3_high_resolution, tiny_cpu, or a YAML "
                             "path (default: stage1_pretrain; with --resume: the run's saved config)")
    recipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr.peak=1e-4 (repeatable)")
    recipe.add_argument("--init", default=None,
                        help="start from this checkpoint: Meta's DINOv3 / MedDINOv3 / exported encoder, or a run "
                             "checkpoint (its teacher, with heads); sets model.init")
    recipe.add_argument("--gram-teacher", default=None,
                        help="frozen Gram teacher for stages 2-3 (an earlier run checkpoint); sets gram.teacher")
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", default=[], metavar="[ct=|mri=]PATH",
                      help="nnU-Net raw dataset, folder of NIfTI/NRRD/MHA volumes and DICOM series, or one volume "
                           "(repeatable); prefix ct= or mri= to fix the modality")
    data.add_argument("--manifest", default=None, help="use an existing corpus manifest instead of --data")
    data.add_argument("--channels", default=None,
                      help="nnU-Net channel indices to use, e.g. 0 or 0,1 (default: all channels)")
    data.add_argument("--include-cases", action="append", default=[], metavar="FILE|ID,ID",
                      help="keep only these case identifiers (file: JSON list or one per line)")
    data.add_argument("--exclude-cases", action="append", default=[], metavar="FILE|ID,ID",
                      help="leave these case identifiers out")
    data.add_argument("--nnunet-split", default=None, metavar="splits_final.json",
                      help="keep only the training cases of --fold in this nnU-Net split file")
    data.add_argument("--fold", type=int, default=None, help="fold for --nnunet-split")
    data.add_argument("--corpus-workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="processes reading volumes while indexing (default: %(default)s)")
    data.add_argument("--corpus-only", action="store_true", help="build OUTPUT/corpus.json and stop")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("-o", "--output", required=True, help="run folder")
    run_group.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    run_group.add_argument("--stop-at-step", type=int, default=None,
                           help="stop (with a checkpoint) after this many steps; the schedules still span the "
                                "config's optim.iterations, so --resume continues the same run")
    run_group.add_argument("--time-limit-minutes", type=float, default=None,
                           help="stop (with a checkpoint) after this much wall time")
    run_group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import logging

    from . import config as config_module
    from .corpus import CorpusError, Source, build_corpus, make_case_filter, parse_source, settings_from_config
    from .distributed import DistContext
    from .run_checkpoint import CHECKPOINT_NAME, load_run_checkpoint
    from .train import PretrainingRun, ResumeError

    # one process per GPU under torchrun: rank 0 prints the run's progress, the others only their warnings
    # (e.g. a volume their data shard could not read)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(message)s")
    output = args.output
    checkpoint = os.path.join(output, CHECKPOINT_NAME)
    if args.resume:
        if args.data or args.manifest:
            raise ResumeError("--resume continues with the run's own corpus; leave out --data/--manifest")
        if not os.path.isfile(checkpoint):
            raise ResumeError(f"--resume: {checkpoint} does not exist; nothing to resume. Start the run "
                              f"without --resume.")
        saved_run = load_run_checkpoint(checkpoint)  # read once: PretrainingRun takes it over
        saved = config_module.from_dict(saved_run["config"], origin=checkpoint)
        # without --config the saved recipe is the base; --set/--init/--gram-teacher must then not change it
        config = _recipe(config_module, args, base=None if args.config else saved)
    else:
        saved_run = None
        config = _recipe(config_module, args)
    sources: list[Source] = [parse_source(spec) for spec in args.data]
    if not args.resume and not args.manifest and not sources:
        raise CorpusError("no data: pass --data PATH (repeatable) or --manifest corpus.json")
    if args.manifest and sources:
        raise CorpusError("pass either --data (build a corpus) or --manifest (use one), not both")
    if sources:
        from .corpus import check_sources_exist

        check_sources_exist(sources)
    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    case_filter = make_case_filter(args.include_cases, args.exclude_cases, args.nnunet_split, args.fold)

    if args.corpus_only:
        if not sources:
            raise CorpusError("--corpus-only needs --data")
        manifest_path = os.path.join(output, "corpus.json")
        manifest = build_corpus(sources, settings_from_config(config), manifest_path, case_filter, channels,
                                args.corpus_workers, progress=not args.no_progress)
        _print_corpus(manifest, manifest_path)
        return 0

    context = DistContext.from_env(args.device)
    manifest_path = args.manifest or os.path.join(output, "corpus.json")
    run_ = PretrainingRun(config, manifest_path, output, resume=args.resume, progress=not args.no_progress,
                          context=context, checkpoint=saved_run)
    del saved_run  # the run drops the checkpoint once its weights are in the modules
    run_.check()  # recipe, resume, --init and Gram teacher: before any data is read
    if sources:
        def index() -> None:
            manifest = build_corpus(sources, settings_from_config(config), manifest_path, case_filter, channels,
                                    args.corpus_workers, progress=not args.no_progress)
            _print_corpus(manifest, manifest_path)

        context.run_on_main(index, "indexing the corpus")  # may take hours: no collective waits meanwhile
    run_.prepare()
    summary = run_.run(stop_at_step=args.stop_at_step, time_limit_minutes=args.time_limit_minutes)
    context.close()
    if context.is_main:
        print(f"{summary['status']}: step {summary['step']}/{summary['total_steps']} "
              f"({summary['steps_this_run']} steps in {summary['seconds']} s, {summary['images_per_s']} slices/s); "
              f"checkpoint {summary['checkpoint']}")
        if summary["status"] == "completed":
            print(f"export the encoder with: meddinov3-nnunet export {output}")
        else:
            print(f"continue with: meddinov3-nnunet pretrain --resume -o {output}")
    return 0


def _recipe(config_module, args, base=None):
    overrides = list(args.overrides)
    if args.init:  # absolute, so that a resume from another folder finds the same files
        overrides.append(f"model.init={os.path.abspath(args.init)}")
    if args.gram_teacher:
        overrides.append(f"gram.teacher={os.path.abspath(args.gram_teacher)}")
    if base is not None:
        return config_module.apply_overrides(base, overrides)
    return config_module.load_config(args.config or "stage1_pretrain", overrides)


def _print_corpus(manifest: dict, path: str) -> None:
    totals = manifest["totals"]
    print(f"corpus {path}: {totals['volumes']} volumes, {totals['slices']} slices, {totals['skipped']} skipped")
    for source in manifest["sources"]:
        print(f"  {source['path']} ({source['kind']}): {source['volumes']} volumes, {source['slices']} slices, "
              f"{source['skipped']} skipped, modalities {source['modalities']}")
    for item in manifest["skipped"][:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    if len(manifest["skipped"]) > 10:
        print(f"  ... {len(manifest['skipped']) - 10} more skipped files listed in {path}")
