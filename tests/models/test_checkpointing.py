"""Activation checkpointing (models/checkpointing.py): which modules, same state dict, same gradients, less memory."""
import pytest
import torch
from torch import nn

from meddinov3_nnunet.models.checkpointing import (ENV_VAR, apply_activation_checkpointing, checkpoint_targets,
                                                   requested, summary)
from meddinov3_nnunet.models.decoder import ConvPath
from meddinov3_nnunet.models.memory import SavedTensors
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.volumetric import build_volumetric_network

BLOCKS = [f"encoder.blocks.{i}" for i in range(4)]
STAGES = [f"decoder.stages.{i}" for i in range(4)]
DESIGNS = {
    "2d": (lambda: build_network("vit_tiny16", drop_path_rate=0.2), (2, 1, 64, 64), BLOCKS + STAGES),
    "skip": (lambda: build_network("vit_tiny16", in_channels=2, image_skip=True, drop_path_rate=0.2), (2, 2, 64, 64),
             BLOCKS + STAGES + ["decoder.image_skip.image_convs", "decoder.image_skip.fuse"]),
    "projected": (lambda: build_network("vit_tiny16", decoder="projected", drop_path_rate=0.2), (2, 1, 64, 64),
                  BLOCKS + [f"decoder.upsample.stages.{i}" for i in range(4)]),
    # the conv path's two highest resolutions (full, half): its stages there and the fusion blocks there
    "hybrid": (lambda: build_network("vit_tiny16", decoder="hybrid", drop_path_rate=0.2), (2, 1, 64, 64),
               BLOCKS + ["decoder.pyramid.stages.0", "decoder.pyramid.stages.1", "decoder.fuse.0", "decoder.fuse.1"]),
    "3d": (lambda: build_volumetric_network("vit_tiny16", mix_slices=True, drop_path_rate=0.2), (1, 1, 4, 64, 64),
           BLOCKS + STAGES),
    "3d_hybrid": (lambda: build_volumetric_network("vit_tiny16", decoder="hybrid", drop_path_rate=0.2,
                                                   conv_path=ConvPath.default(16, ndim=3)), (1, 1, 8, 64, 64),
                  BLOCKS + ["decoder.pyramid.stages.0", "decoder.pyramid.stages.1", "decoder.fuse.0",
                            "decoder.fuse.1"]),
}


@pytest.mark.parametrize("design", DESIGNS)
def test_encoder_blocks_and_the_top_resolution_decoder_stages_are_wrapped(design):
    build, _, expected = DESIGNS[design]
    torch.manual_seed(0)
    network = build()
    rng = torch.get_rng_state()
    assert sorted(name for name, _ in checkpoint_targets(network)) == sorted(expected)
    assert torch.equal(torch.get_rng_state(), rng)  # the fake probe forward draws no random numbers


def test_modules_marked_checkpointable_are_wrapped_once():
    network = build_network("vit_tiny16")
    network.decoder.checkpointable = True
    assert [name for name, _ in checkpoint_targets(network)] == BLOCKS + ["decoder"]  # the stages are inside it
    names = apply_activation_checkpointing(network)
    assert summary(names) == "4 encoder blocks, decoder"
    assert apply_activation_checkpointing(network) == names  # again: classes are not wrapped twice
    assert type(network.decoder).__mro__[1].__name__ == "TokenAggregationDecoder"


def step(network, shape, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    torch.manual_seed(seed + 1)  # the drop path draws from here on
    with SavedTensors(exclude=network) as saved:
        loss = network(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}, saved.bytes


@pytest.mark.parametrize("design", DESIGNS)
def test_same_state_dict_same_gradients_less_saved(design):
    build, shape, expected = DESIGNS[design]
    torch.manual_seed(0)
    eager = build().train()
    torch.manual_seed(0)
    wrapped = build().train()
    keys = list(wrapped.state_dict())
    assert sorted(apply_activation_checkpointing(wrapped)) == sorted(expected)
    assert list(wrapped.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), wrapped.state_dict().values()))
    wrapped.load_state_dict(eager.state_dict())  # and loads the unwrapped network's checkpoint
    loss, grads, saved = step(eager, shape)
    loss_w, grads_w, saved_w = step(wrapped, shape)
    assert torch.equal(loss, loss_w)
    assert grads.keys() == grads_w.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(grads_w[name], grads[name], rtol=0, atol=0, msg=name)
    assert saved_w < 0.6 * saved


def test_without_gradients_nothing_is_recomputed():
    torch.manual_seed(0)
    network = build_network("vit_tiny16").eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = network(x)
        apply_activation_checkpointing(network)
        with SavedTensors() as saved:
            assert torch.equal(network(x), expected)
    assert saved.tensors == 0


@pytest.mark.parametrize("value,default,expected", [
    (None, False, False), (None, True, True), ("1", False, True), ("on", False, True), ("0", True, False),
    ("", True, True),
])
def test_the_environment_variable_overrides_the_trainer_attribute(monkeypatch, value, default, expected):
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    enabled, reason = requested(default)
    assert enabled is expected
    assert (ENV_VAR in reason) == bool(value)


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='maybe': use 1"):
        requested(False)


def test_a_network_of_unknown_layout_gets_its_marked_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.GELU())
            self.body.checkpointable = True
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.body(x))

    network = Net()
    x = torch.randn(3, 4)
    with SavedTensors(exclude=network) as eager:
        network(x).sum().backward()
    assert apply_activation_checkpointing(network) == ["body"]
    with SavedTensors(exclude=network) as checkpointed:
        network(x).sum().backward()
    tensor = 3 * 4 * 4
    assert eager.bytes == 3 * tensor  # linear input, GELU input, head input
    assert checkpointed.bytes == 2 * tensor  # the body's input (kept for the recompute), head input


def test_a_compiled_checkpointed_network_gives_the_eager_gradients():
    """nnU-Net compiles the network on CUDA: dynamo traces the checkpointed modules (aot_eager: dynamo and AOT
    autograd without code generation), drop path included."""
    torch.manual_seed(0)
    eager = build_network("vit_tiny16", drop_path_rate=0.2).train()
    wrapped = build_network("vit_tiny16", drop_path_rate=0.2).train()
    wrapped.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(wrapped)
    compiled = torch.compile(wrapped, backend="aot_eager")
    x = torch.randn(4, 1, 64, 64)
    losses = []
    for network in (eager, compiled):
        torch.manual_seed(5)
        loss = network(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    grads = dict(wrapped.named_parameters())
    for name, param in eager.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=0, atol=0, msg=name)
