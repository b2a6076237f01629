"""Domain-adaptive DINOv3 pretraining on CT slices (MedDINOv3 stages 1-3). Imports models, never trainers."""
