"""Benchmark rows that a comparison pairs differ only in what the comparison claims."""
import pytest
import torch

from meddinov3_nnunet import trainers
from meddinov3_nnunet.pretraining.config import load_config


@pytest.mark.parametrize("pretrained, scratch", [
    (trainers.MedDINOv3Trainer_S_hybrid_3d_enclr3e4, trainers.MedDINOv3Trainer_S_hybrid_3d_scratch_ls01),
    (trainers.MedDINOv3Trainer_S_enclr3e4, trainers.MedDINOv3Trainer_S_scratch_ls01),
], ids=["3d_hybrid", "2d_paper_design"])
def test_the_small_data_pretraining_rows_differ_only_in_the_encoders_initialisation(pretrained, scratch):
    assert (pretrained.encoder_weights, scratch.encoder_weights) == ("required", "none")
    assert pretrained.recipe == scratch.recipe and pretrained.recipe.encoder_lr == 3e-4
    # the random encoder's LayerScale starts where the small_data pretraining starts its own
    assert scratch.layerscale_init == load_config("small_data").model.layerscale_init == 0.1
    assert scratch.encoder_arch().replace(layerscale_init=None) == \
        pretrained.encoder_arch().replace(layerscale_init=None)
    shared = ("decoder", "multiscale", "tap_blocks", "drop_path_rate", "encoder_patch_size", "context", "mix_slices",
              "deep_supervision", "vit_tokens", "image_skip", "token_injection")
    assert [getattr(pretrained, name, None) for name in shared] == [getattr(scratch, name, None) for name in shared]
    assert pretrained.build_plain_network.__func__ is scratch.build_plain_network.__func__
    torch.manual_seed(0)
    keys = scratch.build_plain_network(1, 3).state_dict().keys()
    assert pretrained.build_plain_network(1, 3).state_dict().keys() == keys
