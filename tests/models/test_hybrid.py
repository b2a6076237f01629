"""The hybrid: a convolutional pyramid beside the ViT, fused into a U-Net decoder (2D and 3D), and its ablation
without the ViT's tokens."""
import pytest
import torch

from meddinov3_nnunet.models.decoder import ConvPath, HybridDecoder
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.volumetric import build_volumetric_network

ANISOTROPIC_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
ANISOTROPIC_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def first_convs(decoder: HybridDecoder):
    return [stage.convs[0].conv for stage in decoder.pyramid.stages]


def test_2d_hybrid_sees_every_input_channel_and_leaves_the_encoder_layout_unchanged():
    torch.manual_seed(0)
    plain = build_network("vit_tiny16", in_channels=2, num_classes=3)
    hybrid = build_network("vit_tiny16", in_channels=2, num_classes=3, decoder="hybrid")
    convs = first_convs(hybrid.decoder)
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (2, 32, (1, 1)), (32, 64, (2, 2)), (64, 128, (2, 2)), (128, 256, (2, 2))]  # raw channels, before the adapter
    assert hybrid.decoder.up[-1].in_channels == 4 * 96  # the concatenated taps enter below level 3
    assert hybrid.encoder.state_dict().keys() == plain.encoder.state_dict().keys()
    assert {k: v.shape for k, v in hybrid.encoder.state_dict().items()} == \
        {k: v.shape for k, v in plain.encoder.state_dict().items()}
    hybrid.encoder.load_state_dict(plain.encoder.state_dict(), strict=True)  # every checkpoint loads as before
    pyramid_ids = {id(p) for p in hybrid.decoder.pyramid.parameters()}
    assert pyramid_ids <= {id(p) for p in hybrid.decoder_parameters()}  # trained at the decoder's learning rate
    # every input channel reaches the logits through the conv path
    x = torch.zeros(1, 2, 32, 32, requires_grad=True)
    hybrid.eval()(x)[:, :, 16, 16].sum().backward()
    assert (x.grad[0].abs().sum(dim=(1, 2)) > 0).all()


@pytest.mark.parametrize("size", [(16, 16), (48, 80), (112, 32)])
def test_2d_hybrid_on_odd_patch_sizes(size):
    net = build_network("vit_tiny16", in_channels=1, num_classes=3, decoder="hybrid")
    assert net(torch.randn(2, 1, *size)).shape == (2, 3, *size)


def test_2d_hybrid_refuses_images_its_tokens_do_not_tile():
    net = build_network("vit_tiny16", in_channels=1, num_classes=3, decoder="hybrid")
    with pytest.raises(ValueError, match="multiple"):
        net(torch.randn(1, 1, 40, 32))
    with pytest.raises(ValueError, match="no image skip"):
        build_network("vit_tiny16", decoder="hybrid", image_skip=True)
    with pytest.raises(ValueError, match="needs the input image"):
        net.decoder(torch.randn(1, 4 * 96, 2, 2))


def test_patch8_hybrid_has_three_levels():
    from meddinov3_nnunet.models.presets import preset

    net = build_network(preset("vit_tiny16", patch_size=8), decoder="hybrid")
    assert net.decoder.path.widths == (32, 64, 128) and net.decoder.path.total_stride == (4, 4)
    assert net(torch.randn(1, 1, 24, 40)).shape == (1, 2, 24, 40)


def test_conv_path_from_anisotropic_plans_keeps_depth_strides_and_kernels():
    path = ConvPath.from_plans(16, ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES, [32, 64, 128, 256, 320])
    assert path.kernels == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert path.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    assert path.total_stride == (4, 8, 8) and path.widths == (32, 64, 128, 256)
    # a plan that pools an in-plane axis later still halves it at each level, so that it meets the ViT decoder
    late = ConvPath.from_plans(16, [[3, 3, 3]] * 4, [[1, 1, 1], [2, 1, 2], [2, 2, 2], [2, 2, 2]])
    assert late.strides[1] == (2, 2, 2)
    with pytest.raises(ValueError, match="the plans have 3 stages; the conv path of a patch-16 ViT needs 4"):
        ConvPath.from_plans(16, [[3, 3, 3]] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 2)


def test_3d_hybrid_with_anisotropic_strides_predicts_every_voxel_of_the_patch():
    torch.manual_seed(0)
    path = ConvPath.from_plans(16, ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES)
    net = build_volumetric_network("vit_tiny16", in_channels=2, num_classes=3, context=0, decoder="hybrid",
                                   conv_path=path)
    convs = first_convs(net.decoder)
    assert [(c.in_channels, c.kernel_size, c.stride) for c in convs] == [
        (2, (1, 3, 3), (1, 1, 1)), (32, (1, 3, 3), (1, 2, 2)), (64, (3, 3, 3), (2, 2, 2)), (128, (3, 3, 3), (2, 2, 2))]
    assert net.decoder.token_depth_pool == 4  # one token map per slice, averaged to the last level's depth
    x = torch.randn(1, 2, 12, 32, 48, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 3, 12, 32, 48)
    # depth enters at the pixel level: a voxel's logits depend on the neighbouring slices through the 3D convs
    out[0, :, 6, 16, 16].sum().backward()
    assert x.grad[0, :, 5].abs().sum() > 0 and x.grad[0, :, 7].abs().sum() > 0
    assert (x.grad[0].abs().sum(dim=(1, 2, 3)) > 0).all()  # every input channel
    with pytest.raises(ValueError, match=r"patch size \[10, 32, 48\] is not divisible by the conv path's total "
                                         r"stride \[4, 8, 8\]"):
        net(torch.randn(1, 2, 10, 32, 48))
    with pytest.raises(ValueError, match="needs a 3D conv path"):
        build_volumetric_network("vit_tiny16", decoder="hybrid")


def test_3d_hybrid_leaves_the_encoder_layout_unchanged():
    plain = build_volumetric_network("vit_tiny16", num_classes=3)
    hybrid = build_volumetric_network("vit_tiny16", num_classes=3, context=0, decoder="hybrid",
                                      conv_path=ConvPath.default(16, ndim=3))
    assert hybrid.encoder.state_dict().keys() == plain.encoder.state_dict().keys()
    hybrid.encoder.load_state_dict(plain.encoder.state_dict(), strict=True)


@pytest.mark.parametrize("volumetric", [False, True])
def test_ablation_without_the_vit_ignores_the_encoder_and_trains_only_the_conv_path(volumetric):
    torch.manual_seed(0)
    if volumetric:
        net = build_volumetric_network("vit_tiny16", num_classes=3, context=0, decoder="hybrid",
                                       conv_path=ConvPath.default(16, ndim=3), vit_tokens=False)
        x = torch.randn(1, 1, 8, 32, 32)
    else:
        net = build_network("vit_tiny16", num_classes=3, decoder="hybrid", vit_tokens=False)
        x = torch.randn(2, 1, 32, 32)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    before = net(x)
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    after = net(x)
    assert torch.equal(before, after)  # zeros in the tokens' place: the encoder's weights cannot matter
    after.sum().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())


def test_3d_conv_blocks_give_stable_weight_gradients_at_depth_2_under_cpu_bf16():
    """torch's CPU bf16 Conv3d weight gradient at input depth 2 changes from call to call (up to 1e35 or NaN); the
    hybrid's 3D convolutions run those in fp32, so repeated backward passes agree and stay finite."""
    from meddinov3_nnunet.models.decoder import nnunet_conv_blocks

    torch.manual_seed(0)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = nnunet_conv_blocks(32, 32, ndim=3)
        x = torch.randn(2, 32, 2, 8, 8)
        grads = []
        for _ in range(4):
            blocks.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = blocks(x)
            out.float().square().sum().backward()
            grads.append(blocks.convs[0].conv.weight.grad.clone())
    finally:
        torch.set_num_threads(torch_threads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.parametrize("patch_size", [16, 8])
def test_token_injection_starts_as_the_plain_hybrid_and_then_feeds_the_encoder(patch_size):
    from meddinov3_nnunet.models.presets import preset

    arch = preset("vit_tiny16", patch_size=patch_size)
    torch.manual_seed(0)
    plain = build_network(arch, in_channels=2, num_classes=3, decoder="hybrid")
    injecting = build_network(arch, in_channels=2, num_classes=3, decoder="hybrid", token_injection=True)
    assert injecting.encoder.state_dict().keys() == plain.encoder.state_dict().keys()
    missing, unexpected = injecting.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.injection.") for k in missing)
    injection_ids = {id(p) for p in injecting.decoder.injection.parameters()}
    assert injection_ids <= {id(p) for p in injecting.decoder_parameters()}
    x = torch.randn(2, 2, 32, 48)
    plain.eval(), injecting.eval()
    torch.testing.assert_close(injecting(x), plain(x), rtol=0, atol=0)  # the projection starts at zero
    # the zero projection gets a gradient, so the conv features reach the tokens after one step
    injecting.train()(x).square().mean().backward()
    grad = injecting.decoder.injection.project.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        injecting.decoder.injection.project.weight.sub_(grad.sign() * 1e-2)
    injecting.eval()
    assert not torch.allclose(injecting(x), plain(x))
    tokens = injecting.decoder.injection(injecting.decoder.conv_features(x)[-1])
    assert tokens.shape == (2, 32 // patch_size, 48 // patch_size, arch.embed_dim)


def test_token_injection_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="needs the hybrid decoder"):
        build_network("vit_tiny16", token_injection=True)
    with pytest.raises(ValueError, match="cannot go with vit_tokens=False"):
        build_network("vit_tiny16", decoder="hybrid", token_injection=True, vit_tokens=False)
    from meddinov3_nnunet.models.decoder import TokenInjection

    with pytest.raises(ValueError, match="2D hybrid only"):
        TokenInjection(ConvPath.default(16, ndim=3), 96)
    from meddinov3_nnunet.models.encoder import build_encoder

    encoder = build_encoder("vit_tiny16")
    with pytest.raises(ValueError, match="patch grid's shape"):
        encoder.prepare_tokens(torch.randn(1, 3, 32, 32), patch_offset=torch.zeros(1, 3, 2, 96))


@pytest.mark.parametrize("volumetric", [False, True])
def test_deep_supervision_heads_give_every_level_its_logits_while_enabled(volumetric):
    torch.manual_seed(0)
    if volumetric:  # anisotropic: level 1 keeps the depth
        net = build_volumetric_network("vit_tiny16", num_classes=3, context=0, decoder="hybrid",
                                       conv_path=ConvPath.from_plans(16, ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES))
        shape = (12, 32, 48)
    else:
        net = build_network("vit_tiny16", num_classes=3, decoder="hybrid")
        shape = (32, 48)
    x = torch.randn(2, 1, *shape)
    plain = net(x)
    encoder_state = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    net.decoder.add_supervision_heads(3)
    assert net.encoder.state_dict().keys() == encoder_state.keys()
    assert len(net.decoder.supervision_heads) == 3 and "supervision_heads.2.weight" in net.decoder.state_dict()
    assert torch.equal(net(x), plain)  # off (nnU-Net's validation and prediction): the logits as before

    net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled(True) does
    outputs = net(x)
    scales = net.decoder.supervision_scales()
    expected = [[1, 1, 1], [1, 1 / 2, 1 / 2], [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 8, 1 / 8]] if volumetric else \
        [[1, 1], [1 / 2, 1 / 2], [1 / 4, 1 / 4], [1 / 8, 1 / 8]]
    assert scales == expected
    assert [tuple(o.shape) for o in outputs] == [(2, 3, *(int(s * f) for s, f in zip(shape, scale)))
                                                 for scale in scales]
    assert torch.equal(outputs[0], plain) and all(o.dtype == torch.float32 for o in outputs)
    sum(o.mean() for o in outputs[1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder.supervision_heads.parameters())
