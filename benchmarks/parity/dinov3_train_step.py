"""Training-step parity fixture: 3 steps of the official DINOv3 ``SSLMetaArch`` on CPU with a tiny ViT.

Usage (the official code is never committed; extract a checkout to /tmp first)::

    mkdir -p /tmp/dinov3 && git --git-dir=<dinov3 .git> archive HEAD dinov3 | tar -x -C /tmp/dinov3
    python benchmarks/parity/dinov3_train_step.py /tmp/dinov3 [--output tests/pretraining/data/dinov3_train_step.json]

Needs ``omegaconf`` and ``termcolor`` (pip) and a C++ compiler (the official iBOT Sinkhorn-Knopp is
``torch.compile``'d; about a minute on 1 CPU thread). What runs is the official code: ``SSLMetaArch.__init__`` (heads, losses, Gram teacher),
``forward_backward`` (teacher / student / Gram outputs, ``compute_losses``, ``backward``), ``get_params_groups``,
``train.build_optimizer``, ``train.build_schedulers`` (v2, ``linear_warmup_cosine_decay`` with the
``sqrt_wrt_1024`` lr rule), ``apply_optim_scheduler``, the per-module ``clip_grad_norm_`` of ``do_train``,
``optimizer.step``, ``update_ema`` and ``gram_load_ema_teacher`` (at iteration 0), in ``do_train``'s order.

Bypassed, and why:
- launch and FSDP: no ``setup_job``, no ``prepare_for_distributed_training`` (FSDP2 + compile); the model is
  built on ``meta`` as ``train.main`` does, then materialised on the CPU in float32 (no bf16 mixed precision).
  A one-process gloo group is initialised because the iBOT Sinkhorn-Knopp calls ``all_reduce`` unguarded.
- ``.cuda()``: the batch tensors' ``.cuda()`` in ``forward_backward`` is made a no-op.
- ``init_weights``: replaced by loading this project's seeded initial weights (``build_branch`` with the
  fixture's config and seed) into the student and copying them to the EMA teacher, as ``init_weights`` does at
  its end (it would raise for a Gram teacher without ``gram.ckpt``, and a random official init could not be
  rebuilt by the project test without committing weights). The loss centres are zeroed as there.
- the data loader and augmentation: fixed random crops (``torch.randn`` from the seed) and fixed masks, collated
  in ``collate_data_and_cast``'s layout (crop-major, masks_weight 1/n per image); Gram crops = global crops.
- multi_tensor_optim is off (fused AdamW needs CUDA); drop path 0 (its random subsets cannot be matched); RoPE
  coordinate augmentation off (the default config's null values).
Records per step: every loss ``compute_losses`` returns, the schedule values, the gradient norms before
clipping, and after ``optimizer.step`` + EMA the L2 norm of every student parameter (official names) and of
each teacher module.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = ROOT / "tests" / "pretraining" / "data" / "dinov3_train_step.json"

# The scenario (shared with tests/pretraining/test_parity_official_step.py through the JSON).
SCENARIO = {
    "seed": 0,
    "steps": 3,
    "images": 4,  # B; 2 global crops and `local_number` local crops each
    "project_overrides": [  # applied to the project's tiny_cpu config
        "model.drop_path_rate=0.0", "model.layerscale_init=0.1",
        "crops.global_size=64", "crops.local_size=32", "crops.local_number=2", "crops.gram_teacher_size=64",
        "dino.head_prototypes=128", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
        "ibot.head_prototypes=96", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
        "gram.enabled=true", "gram.loss_weight=2.0", "gram.remove_negatives=none",
        "optim.iterations=10", "optim.batch_size=4",
        "optim.lr.start=0.0", "optim.lr.peak=2.5e-4", "optim.lr.end=1e-6", "optim.lr.warmup_iterations=0",
        "optim.weight_decay.start=0.04", "optim.weight_decay.peak=0.04", "optim.weight_decay.end=0.4",
        "optim.weight_decay.warmup_iterations=0",
        "optim.momentum.start=0.992", "optim.momentum.peak=0.992", "optim.momentum.end=1.0",
        "optim.momentum.warmup_iterations=0",
        "optim.teacher_temp.start=0.04", "optim.teacher_temp.peak=0.07", "optim.teacher_temp.end=0.07",
        "optim.teacher_temp.warmup_iterations=3",
        "optim.freeze_last_layer_iterations=1", "optim.layerwise_decay=0.9", "optim.patch_embed_lr_mult=0.2",
        "optim.clip_grad=3.0", "optim.adamw_betas=[0.9,0.999]",
    ],
    # official lr peak before sqrt_wrt_1024: 2.5e-4 / (4 * sqrt(4 / 1024)) = 1e-3
    "official_lr_peak": 1e-3,
    "mask_ratio": [0.1, 0.5],
}


def make_batch(step: int, images: int, local_number: int, global_size: int, local_size: int, patch: int,
               seed: int) -> dict:
    """Fixed crops and masks for ``step``: the first half of the global crops masked with rising ratios."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    global_crops = torch.randn(2 * images, 1, global_size, global_size, generator=g)
    local_crops = torch.randn(local_number * images, 1, local_size, local_size, generator=g)
    n_tokens = (global_size // patch) ** 2
    masks = torch.zeros(2 * images, n_tokens, dtype=torch.bool)
    n_masked_images = images  # mask_sample_probability 0.5 of the 2B global crops
    ratios = torch.linspace(*SCENARIO["mask_ratio"], n_masked_images + 1)[1:]
    order = torch.randperm(2 * images, generator=g)[:n_masked_images]
    for image, ratio in zip(order.tolist(), ratios.tolist()):
        count = max(1, int(n_tokens * ratio))
        masks[image, torch.randperm(n_tokens, generator=g)[:count]] = True
    return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks,
            "mask_indices": masks.flatten().nonzero().flatten(), "gram_crops": global_crops.clone()}


def project_config(overrides=()):
    from meddinov3_nnunet.pretraining.config import load_config
    return load_config("tiny_cpu", list(SCENARIO["project_overrides"]) + list(overrides))


def project_initial_branch(config):
    """The project's student at its seeded initialisation (what the project's run builds first)."""
    from meddinov3_nnunet.pretraining.model import build_branch
    torch.manual_seed(config.train.seed)
    return build_branch(config)


def _official_cfg(config, arch):
    from dinov3.configs import get_default_config
    from omegaconf import OmegaConf
    cfg = get_default_config()
    o = config.optim
    updates = {
        "student": {"arch": "vit_parity", "patch_size": arch.patch_size, "drop_path_rate": 0.0,
                    "layerscale": config.model.layerscale_init, "qkv_bias": arch.qkv_bias,
                    "mask_k_bias": arch.qkv_bias, "n_storage_tokens": arch.num_register_tokens,
                    "pos_embed_rope_base": arch.rope_base, "pos_embed_rope_dtype": arch.rope_dtype,
                    "ffn_ratio": arch.mlp_ratio},
        "dino": {"head_n_prototypes": config.dino.head_prototypes, "head_hidden_dim": config.dino.head_hidden_dim,
                 "head_bottleneck_dim": config.dino.head_bottleneck_dim, "head_nlayers": config.dino.head_layers,
                 "koleo_loss_weight": config.dino.koleo_loss_weight, "loss_weight": config.dino.loss_weight},
        "ibot": {"head_n_prototypes": config.ibot.head_prototypes, "head_hidden_dim": config.ibot.head_hidden_dim,
                 "head_bottleneck_dim": config.ibot.head_bottleneck_dim, "head_nlayers": config.ibot.head_layers,
                 "loss_weight": config.ibot.loss_weight},
        "gram": {"use_loss": True, "loss_weight": config.gram.loss_weight, "ema_teacher": False, "ckpt": None,
                 "it_load_ema_teacher": 0, "rep_update": False, "normalized": True, "img_level": True,
                 "remove_neg": False, "remove_only_teacher_neg": False, "tokens_used": "all"},
        "crops": {"local_crops_number": config.crops.local_number, "global_crops_size": config.crops.global_size,
                  "local_crops_size": config.crops.local_size,
                  "gram_teacher_crops_size": config.crops.gram_teacher_size},
        "train": {"batch_size_per_gpu": SCENARIO["images"], "OFFICIAL_EPOCH_LENGTH": 1, "compile": False},
        "optim": {"epochs": o.iterations, "clip_grad": o.clip_grad, "scaling_rule": "sqrt_wrt_1024",
                  "patch_embed_lr_mult": o.patch_embed_lr_mult, "layerwise_decay": o.layerwise_decay,
                  "multi_tensor_optim": False, "adamw_beta1": o.adamw_betas[0], "adamw_beta2": o.adamw_betas[1]},
        "schedules": {
            "lr": {"start": o.lr.start, "peak": SCENARIO["official_lr_peak"], "end": o.lr.end / o.lr.peak
                   * SCENARIO["official_lr_peak"], "warmup_epochs": o.lr.warmup_iterations,
                   "freeze_last_layer_epochs": o.freeze_last_layer_iterations},
            "weight_decay": _schedule(o.weight_decay), "momentum": _schedule(o.momentum),
            "teacher_temp": _schedule(o.teacher_temp)},
    }
    return OmegaConf.merge(cfg, OmegaConf.create(updates))


def _schedule(s):
    return {"start": s.start, "peak": s.peak, "end": s.end, "warmup_epochs": s.warmup_iterations}


def _register_tiny_vit(arch):
    from functools import partial

    import dinov3.models.vision_transformer as vits
    vits.vit_parity = partial(vits.DinoVisionTransformer, embed_dim=arch.embed_dim, depth=arch.depth,
                              num_heads=arch.num_heads)


def _official_student_state(branch, arch) -> dict:
    from meddinov3_nnunet.models.checkpoints import to_official_layout
    state = {f"backbone.{k}": v for k, v in to_official_layout(branch.backbone.state_dict(), arch).items()}
    for head in ("dino_head", "ibot_head"):
        state.update({f"{head}.{k}": v for k, v in getattr(branch, head).official_state_dict().items()})
    return state


def _official_batch(batch: dict) -> dict:
    masks = batch["masks"]
    return {
        "collated_global_crops": batch["global_crops"].expand(-1, 3, -1, -1).contiguous(),
        "collated_local_crops": batch["local_crops"].expand(-1, 3, -1, -1).contiguous(),
        "collated_gram_teacher_crops": batch["gram_crops"].expand(-1, 3, -1, -1).contiguous(),
        "collated_masks": masks,
        "mask_indices_list": batch["mask_indices"],
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
        "upperbound": int(masks.sum()),
        "n_masked_patches": torch.full((1,), fill_value=int(batch["mask_indices"].numel()), dtype=torch.long),
        "global_batch_size": SCENARIO["images"],
    }


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def run_official(official_dir: str) -> dict:
    sys.path.insert(0, str(Path(official_dir).resolve()))
    import torch.distributed as dist
    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(delete=False)
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    from dinov3.train import train as official_train
    from dinov3.train.ssl_meta_arch import SSLMetaArch

    config = project_config()
    branch = project_initial_branch(config)
    arch = branch.backbone.arch
    _register_tiny_vit(arch)
    cfg = _official_cfg(config, arch)
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        missing, unexpected = model.student.load_state_dict(_official_student_state(branch, arch), strict=False)
        if missing or unexpected:
            raise SystemExit(f"official student does not take the project's weights: missing {missing}, "
                             f"unexpected {unexpected}")
        model.model_ema.load_state_dict(model.student.state_dict())
        model.dino_loss.init_weights()
        model.ibot_patch_loss.init_weights()
        model.gram_teacher.requires_grad_(False)
    model.train()

    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run: forward_backward's .cuda() calls become no-ops
    optimizer = official_train.build_optimizer(cfg, model.get_params_groups())
    lr_s, wd_s, mom_s, temp_s, last_s = official_train.build_schedulers(cfg)
    records = []
    for it in range(SCENARIO["steps"]):
        batch = make_batch(it, SCENARIO["images"], config.crops.local_number, config.crops.global_size,
                           config.crops.local_size, arch.patch_size, SCENARIO["seed"])
        if model.gram_it_load_ema_teacher == it:
            model.gram_load_ema_teacher()
        official_train.apply_optim_scheduler(optimizer, lr_s[it], wd_s[it], last_s[it])
        optimizer.zero_grad(set_to_none=True)
        total, metrics = model.forward_backward(_official_batch(batch), teacher_temp=temp_s[it], iteration=it)
        grad_norms = {k: float(torch.nn.utils.clip_grad_norm_(v.parameters(), max_norm=cfg.optim.clip_grad))
                      for k, v in model.student.items()}
        optimizer.step()
        model.update_ema(mom_s[it])
        records.append({
            "step": it,
            "losses": {**{k: float(metrics[k].detach()) for k in ("dino_local_crops_loss", "dino_global_crops_loss",
                                                                   "koleo_loss", "ibot_loss", "gram_loss")},
                       "total": float(total.detach())},
            "schedules": {"lr": float(lr_s[it]), "last_layer_lr": float(last_s[it]), "weight_decay": float(wd_s[it]),
                          "momentum": float(mom_s[it]), "teacher_temp": float(temp_s[it])},
            "grad_norms": grad_norms,
            "student_param_norms": {k: _norm(p) for k, p in model.student.named_parameters()},
            "teacher_module_norms": {k: _norm(torch.cat([p.flatten() for p in m.parameters()]))
                                     for k, m in model.teacher.items()},
        })
    return {"scenario": SCENARIO, "arch": arch.to_dict(), "torch": torch.__version__, "steps": records,
            "crop_checksums": [float(make_batch(i, SCENARIO["images"], config.crops.local_number,
                                                config.crops.global_size, config.crops.local_size, arch.patch_size,
                                                SCENARIO["seed"])["global_crops"].double().sum())
                               for i in range(SCENARIO["steps"])]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official_dir", help="folder holding the official `dinov3` package (a checkout or archive)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if not (Path(args.official_dir) / "dinov3" / "train" / "ssl_meta_arch.py").is_file():
        parser.error(f"{args.official_dir} has no dinov3/train/ssl_meta_arch.py; pass the folder that contains the "
                     f"official `dinov3` package")
    torch.set_num_threads(1)
    result = run_official(args.official_dir)
    result["official_commit"] = os.environ.get("DINOV3_COMMIT", "unknown")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    for record in result["steps"]:
        print(record["step"], {k: round(v, 6) for k, v in record["losses"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
