"""Drop path as DINOv3's ``SelfAttentionBlock`` does it, and the decoder initialisation of ``Primus_Multiscale``."""
import math

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from meddinov3_nnunet.models.decoder import TokenAggregationDecoder
from meddinov3_nnunet.models.encoder import BatchSubsetDropPathBlock, build_encoder, set_drop_path
from meddinov3_nnunet.models.network import build_network


def tiny(rate=0.0, mode="batch_subset"):
    torch.manual_seed(0)
    return build_encoder("vit_tiny16", drop_path_rate=rate, drop_path_mode=mode)


def test_same_rate_in_every_block_and_state_dict_unchanged():
    encoder = tiny(0.3)
    assert [type(b) for b in encoder.blocks] == [BatchSubsetDropPathBlock] * 4
    assert [b.drop_path_rate for b in encoder.blocks] == [0.3] * 4
    assert all(isinstance(b.drop_path1, nn.Identity) and isinstance(b.drop_path2, nn.Identity) for b in encoder.blocks)
    assert encoder.state_dict().keys() == tiny(0.0).state_dict().keys()


def test_timm_mode_rises_linearly_over_depth():
    encoder = tiny(0.3, mode="timm")
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(b.drop_path_rate == 0.0 for b in encoder.blocks)


@pytest.mark.parametrize("rate, batch, kept", [(0.2, 10, 8), (0.3, 10, 7), (0.2, 2, 1), (0.5, 1, 1), (0.4, 5, 3)])
def test_branches_run_on_the_official_subset_size(rate, batch, kept):
    encoder = tiny(rate).train()
    seen = []
    for block in encoder.blocks:
        block.norm1.register_forward_hook(lambda m, i, o: seen.append(("attn", i[0].shape[0])))
        block.norm2.register_forward_hook(lambda m, i, o: seen.append(("mlp", i[0].shape[0])))
    encoder.forward_features(torch.randn(batch, 3, 32, 32))
    assert seen == [("attn", kept), ("mlp", kept)] * 4


def _block_with_one_branch(branch):
    torch.manual_seed(1)
    block = tiny(0.4).blocks[0]
    with torch.no_grad():  # LayerScale of the other branch set to zero, so only `branch` adds a residual
        (block.gamma_2 if branch == "attn" else block.gamma_1).zero_()
        (block.gamma_1 if branch == "attn" else block.gamma_2).fill_(0.5)
    return block


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_residual_is_added_to_the_subset_scaled_by_batch_over_subset(branch):
    block = _block_with_one_branch(branch)
    x = torch.randn(5, 1 + 4 + 4, 96)  # 5 samples, CLS + 4 registers + 2x2 patches
    rope = build_encoder("vit_tiny16").rope.get_embed(shape=(2, 2))
    with torch.no_grad():
        full_residual = block.eval()(x, rope=rope) - x  # per-sample branch output, no drop
        out = block.train()(x, rope=rope)
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert changed.sum().item() == 3  # max(int(5 * 0.6), 1)
    torch.testing.assert_close(out[changed] - x[changed], full_residual[changed] * 5 / 3, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[~changed], x[~changed])


def test_attention_and_mlp_subsets_are_drawn_independently():
    block = tiny(0.5).blocks[0].train()
    picked = {"attn": [], "mlp": []}
    block.attn.register_forward_hook(lambda m, i, o: picked["attn"].append(i[0].detach().clone()))
    x = torch.randn(8, 9, 96)
    rope = build_encoder("vit_tiny16").rope.get_embed(shape=(2, 2))
    torch.manual_seed(3)
    draws = [torch.randperm(8)[:4] for _ in range(2)]
    torch.manual_seed(3)
    with torch.no_grad():
        block(x, rope=rope)
    torch.testing.assert_close(picked["attn"][0], block.norm1(x[draws[0]]))
    assert not torch.equal(draws[0], draws[1])  # the MLP branch uses the second, different draw


@pytest.mark.parametrize("mode", ["batch_subset", "timm"])
def test_eval_forward_is_identical_to_no_drop_path(mode):
    x = torch.randn(3, 3, 32, 48)
    reference = tiny(0.0).eval()
    dropped = tiny(0.4, mode).eval()
    dropped.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert torch.equal(dropped.forward_features(x)["x_prenorm"], reference.forward_features(x)["x_prenorm"])
        assert not torch.equal(dropped.train().forward_features(x)["x_prenorm"],
                               reference.forward_features(x)["x_prenorm"])


def test_gradient_checkpointing_replays_the_same_subsets():
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        encoder = tiny(0.5).train()
        encoder.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        encoder.forward_features(x)["x_prenorm"].square().mean().backward()
        grads.append(encoder.blocks[2].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_mode_or_rate_is_a_clear_error():
    with pytest.raises(ValueError, match="drop path mode 'linear'"):
        tiny(0.1, mode="linear")
    with pytest.raises(ValueError, match=r"rate 1.0 must be in \[0, 1\)"):
        set_drop_path(tiny(), 1.0)


def test_finetuning_trainer_uses_the_official_rate_and_form():
    from meddinov3_nnunet.trainers.base import MedDINOv3Trainer
    net = MedDINOv3Trainer.build_network_architecture(None, None, 1, 3)
    assert [(type(b), b.drop_path_rate) for b in net.encoder.blocks] == [(BatchSubsetDropPathBlock, 0.2)] * 12


def test_decoder_is_initialised_like_primus_multiscale():
    torch.manual_seed(0)
    decoder = TokenAggregationDecoder(in_channels=4 * 96, num_classes=5)
    convs = [m for m in decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 5  # four 2x2 transposed convs + the 1x1 head
    gain = math.sqrt(2.0 / (1 + 1e-2 ** 2))  # kaiming_normal_, a=1e-2, fan_in (dim 1 x kernel for both kinds)
    for conv in convs:
        fan_in = conv.weight.shape[1] * conv.weight[0, 0].numel()
        assert conv.weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.08)
        assert abs(conv.weight.mean().item()) < 0.2 * gain / math.sqrt(fan_in)
        assert torch.count_nonzero(conv.bias) == 0
    # PyTorch's default (kaiming_uniform, a=sqrt(5)) would give std 1/sqrt(3 fan_in), 2.4x smaller
    big = convs[0]
    assert big.weight.std().item() > 2 / math.sqrt(3 * big.weight.shape[1] * 4)
    norms = [m for m in decoder.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(torch.equal(n.weight, torch.ones_like(n.weight)) and
                         torch.count_nonzero(n.bias) == 0 for n in norms)


def test_network_decoder_uses_the_official_init():
    net = build_network("vit_tiny16", in_channels=1, num_classes=2)
    assert torch.count_nonzero(net.decoder.head.bias) == 0
    assert all(torch.count_nonzero(stage[0].bias) == 0 for stage in net.decoder.stages)
