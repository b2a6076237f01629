"""The fine-tuning recipe: two AdamW groups and the per-epoch warm-up / linear-decay schedule."""
import pytest
import torch

from meddinov3_nnunet.nnunet.finetune import FinetuneRecipe, WarmupLinearDecay, build_optimizer
from meddinov3_nnunet.models.network import build_network


def test_optimizer_has_decoder_and_encoder_groups_covering_every_parameter_once():
    net = build_network("vit_tiny16", in_channels=2, num_classes=3)
    optimizer = build_optimizer(net, FinetuneRecipe())
    decoder, encoder = optimizer.param_groups
    assert (decoder["name"], decoder["lr"], encoder["name"], encoder["lr"]) == ("decoder", 3e-4, "encoder", 3e-5)
    assert decoder["betas"] == (0.9, 0.98) and encoder["weight_decay"] == 0.05
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert {id(p) for p in net.channel_adapter.parameters()} <= {id(p) for p in decoder["params"]}
    assert {id(p) for p in encoder["params"]} == {id(p) for p in net.encoder.parameters()}


def test_frozen_mask_token_stays_in_its_group_unchanged_so_earlier_optimizer_states_still_load():
    net = build_network("vit_tiny16", num_classes=3)
    with torch.no_grad():
        net.encoder.mask_token.fill_(1.0)
    optimizer = build_optimizer(net, FinetuneRecipe())
    # the state an nnU-Net checkpoint holds from before the mask token was frozen (resumed with --c)
    earlier = build_network("vit_tiny16", num_classes=3)
    earlier.encoder.mask_token.requires_grad_(True)
    optimizer.load_state_dict(build_optimizer(earlier, FinetuneRecipe()).state_dict())
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        net(torch.randn(2, 1, 32, 32)).square().mean().backward()
        optimizer.step()
    assert torch.equal(net.encoder.mask_token.detach(), torch.ones_like(net.encoder.mask_token))  # no weight decay


def test_linear_decay_without_warmup_steps_down_by_one_over_epochs():
    optimizer = build_optimizer(build_network("vit_tiny16"), FinetuneRecipe())
    schedule = WarmupLinearDecay(optimizer, num_epochs=4)
    lrs = []
    for epoch in range(4):
        schedule.step(epoch)
        lrs += [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([3e-4, 3e-5, 2.25e-4, 2.25e-5, 1.5e-4, 1.5e-5, 0.75e-4, 0.75e-5])


def test_warmup_then_decay_and_resume_from_epoch_alone():
    optimizer = build_optimizer(build_network("vit_tiny16"), FinetuneRecipe(decoder_lr=1.0, encoder_lr=0.1))
    schedule = WarmupLinearDecay(optimizer, num_epochs=6, warmup_epochs=2)
    factors = [schedule.factor(e) for e in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    resumed = WarmupLinearDecay(optimizer, num_epochs=6, warmup_epochs=2)
    resumed.step(4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])


def test_schedule_rejects_impossible_lengths():
    optimizer = build_optimizer(build_network("vit_tiny16"), FinetuneRecipe())
    with pytest.raises(ValueError, match="warmup_epochs < num_epochs"):
        WarmupLinearDecay(optimizer, num_epochs=3, warmup_epochs=3)
