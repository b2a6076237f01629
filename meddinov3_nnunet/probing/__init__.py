"""Looking at encoders: `features` (PCA maps of patch tokens) and `probe` (frozen-encoder linear probe Dice).

`encoders` opens a checkpoint (or a random initialisation) and turns normalised slices into patch-token maps;
`features_cmd` and `probe_cmd` are the verbs; `linear_probe` holds the probe itself, which the pretraining loop
and `benchmarks/pretraining/linear_probe.py` also call. Imports models and the pretraining corpus rules, never
trainers.
"""
