"""Domain-adaptive DINOv3 pretraining on CT slices (MedDINOv3 stages 1-3). Imports models, never trainers.

config.py    the recipe schema, YAML/--set loading    configs/    one YAML per stage + tiny_cpu
corpus.py    volumes -> slice manifest                stream.py   sharded, resumable slice batches
augment.py   multi-crop for grey slices, iBOT masks   losses.py   DINO/iBOT (Sinkhorn-Knopp), KoLeo, Gram
model.py     heads, student/teacher, param groups     train.py    the stage loop, DDP, checkpoints, resume
progress.py  metrics.jsonl and loss_curves.png        export.py   encoder.pth + MedDINOv3 teacher layout
pretrain_cmd.py / export_cmd.py                       the `meddinov3-nnunet pretrain` / `export` verbs
"""
