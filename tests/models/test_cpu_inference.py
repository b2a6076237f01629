"""Packed bf16 linear layers for CPU inference: same logits as plain autocast, weights repacked when they change,
training and state dicts untouched."""
import copy
import io

import pytest
import torch
from torch import nn

from meddinov3_nnunet.models import cpu_inference
from meddinov3_nnunet.models.cpu_inference import PackedLinear, packs_linears
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.volumetric import build_volumetric_network
from meddinov3_nnunet.nnunet import precision

pytestmark = pytest.mark.skipif(not cpu_inference._MKLDNN, reason="this torch build has no oneDNN linear packing")


def _net(volumetric=False):
    torch.manual_seed(0)
    net = (build_volumetric_network("vit_tiny16", 1, 3, context=1, mix_slices=True) if volumetric
           else build_network("vit_tiny16", 1, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)  # non-zero everywhere (the zero-initialised layers would hide a wrong path)
    net.autocast_dtypes = precision.autocast_dtypes("bf16")
    return net.eval()


def _both_paths(net, x, monkeypatch):
    with torch.inference_mode():
        assert packs_linears(x) is False  # outside autocast: plain F.linear
        packed = net(x)
        monkeypatch.setattr(cpu_inference, "_MKLDNN", False)
        plain = net(x)
        monkeypatch.setattr(cpu_inference, "_MKLDNN", True)
    return packed, plain


def _within_bf16_rounding(a, b):
    return (a - b).abs().max().item() <= 2 ** -7 * b.abs().max().item()


@pytest.mark.parametrize("volumetric", [False, True])
def test_packed_inference_gives_the_autocast_logits(volumetric, monkeypatch):
    net = _net(volumetric)
    x = torch.randn(2, 1, 4, 32, 48) if volumetric else torch.randn(2, 1, 32, 48)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a, _f=torch.ops.mkldnn._linear_pointwise: calls.append(1) or _f(*a))
    packed, plain = _both_paths(net, x, monkeypatch)
    assert packed.dtype == torch.float32 and packed.shape == plain.shape
    assert _within_bf16_rounding(packed, plain)
    linears = sum(isinstance(m, nn.Linear) for m in net.modules())
    assert len(calls) >= linears + 1  # every nn.Linear and the decoder's matrix products took the packed path


def test_changed_weights_are_repacked(monkeypatch):
    net = _net()
    x = torch.randn(1, 1, 32, 48)
    before, _ = _both_paths(net, x, monkeypatch)
    with torch.no_grad():  # an optimizer step / load_state_dict changes the parameters in place
        for p in net.parameters():
            p.mul_(1.5)
    after, plain = _both_paths(net, x, monkeypatch)
    assert not torch.allclose(before, after)
    assert _within_bf16_rounding(after, plain)


def test_training_state_dict_and_copies_are_untouched():
    net = _net()
    assert all(type(m) is PackedLinear for m in net.modules() if isinstance(m, nn.Linear))
    reference = build_network("vit_tiny16", 1, 3)
    assert list(net.state_dict()) == list(reference.state_dict())
    with torch.inference_mode():
        net(torch.randn(1, 1, 32, 48))  # fills the packed-weight cache
    clone = copy.deepcopy(net)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    net.train()
    x = torch.randn(2, 1, 32, 48)
    loss = net(x).square().mean()  # grad mode: autocast's own path, gradients reach the linear weights
    loss.backward()
    assert net.encoder.blocks[0].mlp.fc1.weight.grad is not None
    assert not packs_linears(x)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), net.state_dict().values()))
