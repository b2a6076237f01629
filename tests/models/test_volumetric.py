"""3D (2.5D, slice mixing), patch-8 and projected-decoder networks: neighbour order, identity at start, exact
weight loading from every supported checkpoint layout, and the patch-embedding resample."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddinov3_nnunet.models.checkpoints import load_into, read_checkpoint, save_encoder
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.network import MedDINOv3Net
from meddinov3_nnunet.models.patch_size import PATCH_EMBED_KEY, with_patch_size
from meddinov3_nnunet.models.presets import preset
from meddinov3_nnunet.models.network import ProjectedMedDINOv3Net
from meddinov3_nnunet.models.volumetric import (SliceInput, build_volumetric_network,
                                                slices_with_neighbours)

FIXTURES = ("official_dinov3_layout.pth", "meddinov3_teacher_layout.pth")


def index_volume(batch=2, channels=1, depth=5, size=(32, 16)):
    """Slice z of channel c holds the value z + 100 c everywhere."""
    z = torch.arange(depth, dtype=torch.float32).view(1, 1, depth, 1, 1)
    c = 100 * torch.arange(channels, dtype=torch.float32).view(1, channels, 1, 1, 1)
    return (z + c).expand(batch, channels, depth, *size).clone()


def test_25d_stem_sees_previous_current_next_slice_as_rgb_with_edges_repeated():
    stem = SliceInput(in_channels=1, context=1)(index_volume())  # (B*D, 3, H, W)
    values = stem[:, :, 0, 0].view(2, 5, 3)
    expected = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]], dtype=torch.float32)
    assert torch.equal(values[0], expected) and torch.equal(values[1], expected)
    assert sum(p.numel() for p in SliceInput(1, 1).parameters()) == 0


def test_25d_multichannel_rule_is_channel_mean_of_each_neighbour_and_wider_context_keeps_rgb_order():
    stem = SliceInput(in_channels=2, context=1)(index_volume(channels=2))
    values = stem[:, :, 0, 0].view(2, 5, 3)[0]
    expected = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]], dtype=torch.float32) + 50
    assert torch.allclose(values, expected)
    wide = SliceInput(in_channels=1, context=2)(index_volume())[:, :, 0, 0].view(2, 5, 3)[0]
    assert torch.allclose(wide[2], torch.tensor([1.0, 2.0, 3.0]))  # 5 slices in, still z-1, z, z+1 at the start
    raw = slices_with_neighbours(index_volume(channels=2), context=1)[:, :, 0, 0].view(2, 5, 6)[0, 2]
    assert raw.tolist() == [1, 2, 3, 101, 102, 103]  # channel-major, then slice offset


def two_d_twin(net3d, in_channels):
    """The 2D network with the same encoder and decoder weights."""
    net2d = MedDINOv3Net(net3d.encoder, in_channels, net3d.decoder.head.out_channels, tap_blocks=net3d.tap_blocks)
    net2d.decoder.load_state_dict(net3d.decoder.state_dict())
    return net2d.eval()


def test_slice_mixing_starts_as_the_2d_network_and_then_mixes_neighbouring_slices():
    torch.manual_seed(0)
    net = build_volumetric_network("vit_tiny16", in_channels=1, num_classes=3, context=0, mix_slices=True).eval()
    x = torch.randn(2, 1, 4, 32, 16)
    with torch.no_grad():
        out = net(x)
        reference = torch.stack([two_d_twin(net, 1)(x[:, :, z]) for z in range(4)], dim=2)
    assert out.shape == (2, 3, 4, 32, 16)
    assert torch.allclose(out, reference, atol=1e-5)
    for mixer in net.mixers.values():  # after some training the last layer is no longer zero
        torch.nn.init.normal_(mixer.proj.weight, std=0.05)
    changed = x.clone()
    changed[:, :, 3] += 1.0
    with torch.no_grad():
        delta = (net(changed) - net(x)).abs().amax(dim=(0, 1, 3, 4))
    assert delta[2] > 1e-4 and delta[0] > 1e-6  # slice 2 sees slice 3 directly, slice 0 through four mixers
    unmixed = build_volumetric_network("vit_tiny16", in_channels=1, num_classes=3, context=0).eval()
    with torch.no_grad():
        assert torch.equal(unmixed(changed)[:, :, :3], unmixed(x)[:, :, :3])  # no mixing: slices independent


def test_25d_network_per_slice_equals_2d_network_on_the_neighbour_stack():
    torch.manual_seed(0)
    net = build_volumetric_network("vit_tiny16", in_channels=1, num_classes=2, context=1).eval()
    x = torch.randn(1, 1, 3, 32, 32)
    twin = two_d_twin(net, 3)
    twin.channel_adapter.projection = None
    twin.channel_adapter.forward = lambda images: images  # the three slices go to the stem as they are
    with torch.no_grad():
        assert torch.allclose(net(x)[:, :, 1], twin(x[:, 0]), atol=1e-5)


def test_3d_networks_reject_2d_input_and_untileable_sizes():
    net = build_volumetric_network("vit_tiny16", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=r"expected a 3D patch batch \(B, C, D, H, W\)"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="cannot be split into 16x16 patches"):
        net(torch.zeros(1, 1, 2, 40, 32))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_released_layouts_load_unchanged_into_the_3d_and_patch8_networks(shared_dir, fixture):
    checkpoint = read_checkpoint(shared_dir / "fixtures" / "dinov3_parity" / fixture)
    net = build_volumetric_network(checkpoint.arch, in_channels=1, num_classes=2, mix_slices=True)
    load_into(net.encoder, checkpoint)
    state = net.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint.state_dict.items())
    patch8 = build_volumetric_network(checkpoint.arch.replace(patch_size=8), in_channels=1, num_classes=2)
    load_into(patch8.encoder, with_patch_size(checkpoint, 8))
    state8 = patch8.encoder.state_dict()
    assert state8[PATCH_EMBED_KEY].shape[-2:] == (8, 8)
    assert all(torch.equal(state8[k], v) for k, v in checkpoint.state_dict.items() if k != PATCH_EMBED_KEY)
    assert patch8(torch.zeros(1, 1, 2, 24, 16)).shape == (1, 2, 2, 24, 16)  # 3 upsampling stages


def test_project_export_loads_unchanged_into_the_3d_smoke_trainer_network(tmp_path):
    from meddinov3_nnunet.trainers import MedDINOv3Trainer_3d_smoke

    torch.manual_seed(3)
    encoder = build_encoder("vit_tiny16")
    save_encoder(encoder, tmp_path / "encoder.pth")
    net = MedDINOv3Trainer_3d_smoke.build_plain_network(2, 3)
    load_into(net.encoder, read_checkpoint(tmp_path / "encoder.pth"))
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in encoder.state_dict().items())


def smooth_images(size=64, count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(count):
        angles = torch.rand(6, generator=generator) * 2 * math.pi
        images.append(sum(torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + a)
                          for f, a in zip((0.5, 1, 1.5, 2, 2.5, 3), angles)))
    return torch.stack(images)[:, None].expand(-1, 3, -1, -1).contiguous()


def test_patch8_resample_keeps_the_patch_embedding_output(shared_dir):
    """FlexiViT's guarantee: an 8x8 patch gives the token its 16x16 version gave. Exact for 16x16 patches in the
    range of the resize's adjoint; on smooth images (bicubic 2x) within 12 % relative error (measured 10 % with
    the fixture's random, mostly high-frequency kernels; 0.87 on white noise), cosine > 0.99."""
    checkpoint = read_checkpoint(shared_dir / "fixtures" / "dinov3_parity" / "meddinov3_teacher_layout.pth")
    resampled = with_patch_size(checkpoint, 8)
    assert resampled.meta["resampled_patch_size"] == [16, 8] and with_patch_size(checkpoint, 16) is checkpoint
    w16, w8 = checkpoint.state_dict[PATCH_EMBED_KEY], resampled.state_dict[PATCH_EMBED_KEY]
    basis = torch.eye(256).view(256, 1, 16, 16)
    resize = F.interpolate(basis, size=(8, 8), mode="bicubic", antialias=True).view(256, 64).T  # R: 16x16 -> 8x8
    y = torch.randn(10, 64, dtype=torch.float64)
    x16 = y @ resize.double()  # patches R^T y
    tokens16 = x16.float() @ w16.flatten(2).transpose(1, 2)  # (3, 10, D) per stem channel
    tokens8 = (x16 @ resize.double().T).float() @ w8.flatten(2).transpose(1, 2)
    assert torch.allclose(tokens16, tokens8, rtol=1e-3, atol=1e-4 * tokens16.abs().max().item())

    e16, e8 = build_encoder(checkpoint.arch), build_encoder(resampled.arch)
    load_into(e16, checkpoint)
    load_into(e8, resampled)
    x8 = smooth_images()
    bias = e16.patch_embed.proj.bias
    with torch.no_grad():
        d16 = e16.patch_embed(F.interpolate(x8, scale_factor=2, mode="bicubic")) - bias
        d8 = e8.patch_embed(x8) - bias
    assert d16.shape == d8.shape == (4, 8, 8, 96)
    assert ((d16 - d8).norm() / d16.norm()).item() < 0.12
    assert F.cosine_similarity(d16.flatten(), d8.flatten(), dim=0).item() > 0.99


def test_projected_decoder_projects_taps_to_the_embedding_width():
    encoder = build_encoder(preset("vit_tiny16"))
    net = ProjectedMedDINOv3Net(encoder, in_channels=1, num_classes=3)
    projection = net.decoder.projection[0]
    assert (projection.in_channels, projection.out_channels) == (4 * 96, 96)
    assert net(torch.zeros(2, 1, 32, 16)).shape == (2, 3, 32, 16)
    paper = MedDINOv3Net(encoder, 1, 3)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(net.decoder) < count(paper.decoder) / 4
    assert np.isclose(count(net.decoder.projection), 4 * 96 * 96 + 2 * 96)


def test_3d_network_autocasts_itself_like_the_2d_one():
    torch.manual_seed(0)
    net = build_volumetric_network("vit_tiny16", in_channels=1, num_classes=2, mix_slices=True).eval()
    x = torch.randn(1, 1, 3, 32, 16)
    with torch.no_grad():
        reference = net(x)
        net.autocast_dtypes = {"cpu": torch.bfloat16}
        low = net(x)
    assert low.dtype == torch.float32 and not torch.equal(low, reference)
    assert torch.allclose(low, reference, atol=0.1 * reference.abs().max().item())
