"""Domain-adaptive DINOv3 pretraining on CT slices (MedDINOv3 stages 1-3). Imports models, never trainers.

config.py     the recipe schema, YAML/--set loading     configs/         one YAML per stage + tiny_cpu
config_checks.py   the checks of a loaded recipe (one ConfigError per unusable value)
corpus.py     sources, case filters -> slice manifest   volumes.py       read one volume, normalise, pick slices
stream.py     sharded, resumable slice batches          augment.py       multi-crop for grey slices, iBOT masks
losses.py     DINO/iBOT (Sinkhorn-Knopp), KoLeo, Gram   objective.py     the weighted stage loss (nn.Module)
model.py      heads, student/teacher, param groups      schedules.py     lr / wd / momentum / temperature
train.py      the stage loop and resume checks          distributed.py   ranks, device, collectives
run_checkpoint.py  the run checkpoint: format, save/load, RNG state, fingerprint, branch extraction
progress.py   metrics.jsonl and loss_curves.png         export.py        encoder.pth + MedDINOv3 teacher layout
pretrain_cmd.py / export_cmd.py                         the `meddinov3-nnunet pretrain` / `export` verbs
"""
