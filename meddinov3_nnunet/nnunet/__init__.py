"""The nnU-Net glue: ViT-aware planning and its command, `doctor`, training budgets, the fine-tuning recipe
and helpers for nnU-Net's environment. The trainer classes themselves live in `meddinov3_nnunet.trainers`."""
