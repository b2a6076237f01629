"""`meddinov3-nnunet inspect-checkpoint PATH`: what a weights file is, without building anything big.

It runs the strict check of training (`checkpoints.check_checkpoint`: size, missing / unexpected / wrongly shaped
keys, non-finite values) against the file's own architecture, or against ``--preset``; a failure exits 2 with the
list of keys."""
from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="encoder checkpoint (.pth) in any supported layout")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--preset", help="check against this encoder size (vit_tiny16, vit_s16, vit_b16, vit_l16) "
                                         "instead of the file's own")
    parser.add_argument("--num-heads", type=int, help="attention heads, for a file without RoPE periods whose size "
                                                      "is no preset")


def run(args: argparse.Namespace) -> int:
    from .checkpoints import check_checkpoint, read_checkpoint
    from .presets import SIZES

    ckpt = read_checkpoint(args.path, num_heads=args.num_heads)
    target = None
    if args.preset:
        if args.preset not in SIZES:
            from ..errors import InputError

            raise InputError(f"--preset {args.preset!r}: choose one of {', '.join(SIZES)}")
        dim, depth, heads = SIZES[args.preset]
        target = ckpt.arch.replace(embed_dim=dim, depth=depth, num_heads=heads)
    check_checkpoint(ckpt, target)
    info = {
        "path": ckpt.path,
        "format": ckpt.format,
        "architecture": ckpt.arch.to_dict(),
        "parameters": ckpt.num_parameters,
        "tensors": len(ckpt.state_dict),
        "ignored_keys": len(ckpt.ignored_keys),
        "meta": ckpt.meta,
    }
    if args.json:
        import json

        print(json.dumps(info, indent=1, default=str))
        return 0
    arch = ckpt.arch
    print(f"file:          {ckpt.path}")
    print(f"format:        {ckpt.format}")
    print(f"architecture:  ViT/{arch.patch_size} dim {arch.embed_dim}, depth {arch.depth}, heads {arch.num_heads}, "
          f"registers {arch.num_register_tokens}, mlp x{arch.mlp_ratio:g}, qkv bias {arch.qkv_bias}, "
          f"norm eps {arch.norm_eps:g}, RoPE base {arch.rope_base:g} ({arch.rope_dtype})")
    print(f"parameters:    {ckpt.num_parameters:,} (encoder)")
    print(f"keys:          {len(ckpt.state_dict)} encoder tensors"
          + (f", {len(ckpt.ignored_keys)} ignored ({', '.join(sorted({k.split('.')[0] for k in ckpt.ignored_keys}))})"
             if ckpt.ignored_keys else ""))
    for key, value in ckpt.meta.items():
        print(f"meta.{key}: {value}")
    return 0
