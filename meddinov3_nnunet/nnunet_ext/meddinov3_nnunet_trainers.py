# The folder holding this file is what `nnUNet_extTrainer` points at (see meddinov3_nnunet.ext_trainer_dir()).
# nnU-Net imports every module of that folder as a top-level module and looks for the trainer by name; this
# one module re-exports the real classes, so each trainer exists once, in meddinov3_nnunet.trainers.
from meddinov3_nnunet.trainers import *  # noqa: F401,F403
