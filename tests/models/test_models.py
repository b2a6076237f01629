"""The network issue's promises: official parity, shapes, parameter counts, checkpoint formats and errors."""
import json
import subprocess
import sys

import pytest
import torch

from meddinov3_nnunet import build_network, load_encoder, read_checkpoint
from meddinov3_nnunet.models.checkpoints import (CheckpointError, load_into, save_encoder, save_teacher_layout,
                                                 to_official_layout)
from meddinov3_nnunet.models.encoder import build_encoder, count_parameters
from meddinov3_nnunet.models.presets import default_tap_blocks, preset

PARITY_LAYOUTS = ["official_dinov3_layout", "meddinov3_teacher_layout"]


@pytest.fixture(scope="module")
def parity_dir(shared_dir):
    return shared_dir / "fixtures" / "dinov3_parity"


def max_abs_diff_against_official(encoder, expected) -> float:
    """Largest absolute difference over every output the official implementation produced."""
    with torch.no_grad():
        layers = encoder.get_intermediate_layers(expected["input"], n=4, reshape=True, return_class_token=True)
        features = encoder.forward_features(expected["input"])
    diffs = []
    for (patches, cls), ref_patches, ref_cls in zip(layers, expected["intermediate_patch_tokens"],
                                                     expected["intermediate_cls_tokens"]):
        diffs += [(patches - ref_patches).abs().max(), (cls - ref_cls).abs().max()]
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        diffs.append((features[key] - expected[key]).abs().max())
    return float(max(diffs))


@pytest.mark.parametrize("layout", PARITY_LAYOUTS)
def test_load_encoder_matches_official_dinov3_within_1e4(parity_dir, layout):
    encoder = load_encoder(parity_dir / f"{layout}.pth").eval()
    expected = torch.load(parity_dir / f"{layout}.expected.pt", map_location="cpu", weights_only=True)
    assert max_abs_diff_against_official(encoder, expected) < 1e-4


@pytest.mark.parametrize("layout", PARITY_LAYOUTS)
def test_architecture_is_inferred_from_weights(parity_dir, layout):
    configs = json.loads((parity_dir / "configs.json").read_text())[layout]
    arch = read_checkpoint(parity_dir / f"{layout}.pth").arch
    assert (arch.embed_dim, arch.depth, arch.num_heads) == (configs["embed_dim"], configs["depth"], configs["num_heads"])
    assert arch.num_register_tokens == configs["n_storage_tokens"]
    assert arch.qkv_bias == configs["qkv_bias"]
    assert arch.norm_eps == (1e-5 if configs["norm_layer"] == "layernormbf16" else 1e-6)
    assert arch.rope_dtype == configs["pos_embed_rope_dtype"]


def test_detected_formats_and_ignored_heads(parity_dir):
    meta = read_checkpoint(parity_dir / "official_dinov3_layout.pth")
    teacher = read_checkpoint(parity_dir / "meddinov3_teacher_layout.pth")
    assert meta.format == "meta_dinov3" and teacher.format == "meddinov3_teacher"
    assert teacher.ignored_keys and all(k.startswith(("dino_head.", "ibot_head.")) for k in teacher.ignored_keys)


def test_trained_mask_token_is_kept(parity_dir):
    raw = torch.load(parity_dir / "meddinov3_teacher_layout.pth", weights_only=True)["teacher"]["backbone.mask_token"]
    encoder = load_encoder(parity_dir / "meddinov3_teacher_layout.pth")
    assert torch.equal(encoder.mask_token.detach(), raw)


def test_heads_override(parity_dir):
    # with the wrong head count the RoPE periods no longer fit: a clear error, not silent garbage
    with pytest.raises(ValueError, match="RoPE periods"):
        read_checkpoint_arch_override(parity_dir / "official_dinov3_layout.pth", num_heads=6)
    assert load_encoder(parity_dir / "official_dinov3_layout.pth", num_heads=3).arch.num_heads == 3


def read_checkpoint_arch_override(path, **overrides):
    from meddinov3_nnunet.models.key_layouts import check_rope_periods

    ckpt = read_checkpoint(path)
    periods = torch.load(path, weights_only=True)["rope_embed.periods"]
    check_rope_periods(periods, ckpt.arch.replace(**overrides))


def test_timm_layout_loads_and_matches(parity_dir, tmp_path):
    reference = load_encoder(parity_dir / "official_dinov3_layout.pth").eval()
    timm_state = {k: v for k, v in reference.state_dict().items() if k != "mask_token"}  # timm has no mask token
    torch.save(timm_state, tmp_path / "timm.pth")
    ckpt = read_checkpoint(tmp_path / "timm.pth")
    assert ckpt.format == "timm"
    encoder = load_encoder(tmp_path / "timm.pth", num_heads=3).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(encoder(x), reference(x), atol=1e-6)


def test_project_format_and_teacher_export_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(preset("vit_tiny16", "meta"))
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_encoder(encoder, tmp_path / "enc.pth", meta={"stage": 1})
    save_teacher_layout(encoder, tmp_path / "teacher.pth", heads={"dino_head.last_layer.weight": torch.ones(8, 4)})
    for name, fmt in (("enc.pth", "meddinov3_nnunet"), ("teacher.pth", "meddinov3_teacher")):
        ckpt = read_checkpoint(tmp_path / name)
        assert ckpt.format == fmt and ckpt.arch == encoder.arch
        reloaded = load_encoder(tmp_path / name)
        for key, value in encoder.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], value), key
    assert read_checkpoint(tmp_path / "enc.pth").meta == {"stage": 1}


def test_official_layout_has_masked_k_bias():
    encoder = build_encoder(preset("vit_tiny16", "meta"))
    official = to_official_layout(encoder.state_dict(), encoder.arch)
    dim = encoder.arch.embed_dim
    mask = official["blocks.0.attn.qkv.bias_mask"]
    assert mask[:dim].eq(1).all() and mask[dim:2 * dim].eq(0).all() and mask[2 * dim:].eq(1).all()
    assert official["rope_embed.periods"].dtype == torch.float32 and "storage_tokens" in official


def test_zero_qkv_bias_loads_into_bias_free_encoder(tmp_path):
    with_bias = build_encoder(preset("vit_tiny16", "meta"))  # q/v biases are zero-initialised
    save_encoder(with_bias, tmp_path / "zero_bias.pth")
    without_bias = build_encoder(preset("vit_tiny16", "meddinov3"))
    load_into(without_bias, read_checkpoint(tmp_path / "zero_bias.pth"))
    assert torch.equal(without_bias.blocks[0].attn.qkv.weight, with_bias.blocks[0].attn.qkv.weight)


def test_nonzero_qkv_bias_into_bias_free_encoder_is_refused(parity_dir):
    encoder = build_encoder(preset("vit_tiny16", "meddinov3"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*q_bias"):
        load_into(encoder, read_checkpoint(parity_dir / "official_dinov3_layout.pth"))


def test_wrong_size_error_names_both_sizes_not_keys(parity_dir):
    encoder = build_encoder(preset("vit_s16"))
    with pytest.raises(CheckpointError) as info:
        load_into(encoder, read_checkpoint(parity_dir / "meddinov3_teacher_layout.pth"))
    message = str(info.value)
    assert "meddinov3_teacher_layout.pth holds another encoder size (vit_tiny16: dim 96, depth 4" in message
    assert "than the model (vit_s16: dim 384, depth 12" in message and "a trainer/preset of size vit_tiny16" in message
    assert info.value.checkpoint_preset == "vit_tiny16" and "blocks." not in message


def test_one_wrong_key_error_lists_keys_and_format(parity_dir):
    checkpoint = read_checkpoint(parity_dir / "meddinov3_teacher_layout.pth")
    checkpoint.state_dict["blocks.0.attn.proj.bias"] = torch.zeros(95)
    del checkpoint.state_dict["blocks.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointError) as info:
        load_into(build_encoder(checkpoint.arch), checkpoint)
    message = str(info.value)
    assert "meddinov3_teacher_layout.pth" in message and "detected format: meddinov3_teacher" in message
    assert "missing keys: blocks.1.mlp.fc2.weight" in message
    assert "wrongly shaped keys: blocks.0.attn.proj.bias: checkpoint (95,) vs model (96,)" in message


def test_damaged_and_foreign_files_give_one_clear_error(parity_dir, tmp_path):
    data = (parity_dir / "official_dinov3_layout.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot be read as a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match=r"text\.pth: cannot be read"):
        read_checkpoint(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match=r"foreign\.pth: not a DINOv3/MedDINOv3 encoder checkpoint"):
        read_checkpoint(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: no such file"):
        read_checkpoint(tmp_path / "missing.pth")


def test_checkpoint_with_python_objects_is_refused(tmp_path):
    torch.save({"model": torch.zeros(1), "callback": print}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match=r"refused: the file contains code \(pickle global print\)"):
        read_checkpoint(tmp_path / "unsafe.pth")


@pytest.mark.parametrize("height,width,in_channels,num_classes", [
    (64, 48, 1, 2), (32, 96, 2, 5), (48, 48, 1, 1), (16, 160, 3, 14)])
def test_logits_at_input_resolution(height, width, in_channels, num_classes):
    net = build_network("vit_tiny16", in_channels=in_channels, num_classes=num_classes)
    out = net(torch.randn(2, in_channels, height, width))
    assert out.shape == (2, num_classes, height, width)


def test_grey_channel_is_copied_to_the_stem():
    net = build_network("vit_tiny16", in_channels=1, num_classes=2)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(net.channel_adapter(x), x.repeat(1, 3, 1, 1))
    assert count_parameters(net.channel_adapter) == 0


def test_multichannel_adapter_starts_as_channel_mean_and_learns():
    net = build_network("vit_tiny16", in_channels=2, num_classes=2)
    x = torch.randn(1, 2, 32, 32)
    assert torch.allclose(net.channel_adapter(x), x.mean(1, keepdim=True).expand(-1, 3, -1, -1), atol=1e-6)
    net(x).sum().backward()
    assert net.channel_adapter.projection.weight.grad.abs().sum() > 0


def test_wrong_channel_count_is_a_clear_error():
    net = build_network("vit_tiny16", in_channels=2, num_classes=2)
    with pytest.raises(ValueError, match="built for 2 input channel"):
        net(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("shape", [(1, 1, 50, 48), (1, 1, 64, 40), (1, 1, 8, 16)])
def test_size_not_divisible_by_16_is_a_value_error(shape):
    net = build_network("vit_tiny16", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=rf"{shape[2]}x{shape[3]} cannot be split into 16x16 patches"):
        net(torch.randn(*shape))


@pytest.mark.parametrize("num_classes", [2, 14, 16])
def test_vit_b_parameter_counts_match_reference_design(num_classes):
    net = build_network("vit_b16", in_channels=1, num_classes=num_classes)
    assert count_parameters(net.encoder) == 85_641_984
    assert count_parameters(net.decoder) == 25_076_160 + 193 * num_classes
    assert [stage[0].out_channels for stage in net.decoder.stages] == [1536, 768, 384, 192]


def test_tap_blocks_default_to_quarter_depths():
    assert default_tap_blocks(12) == (2, 5, 8, 11)
    assert default_tap_blocks(24) == (5, 11, 17, 23)
    assert build_network("vit_tiny16", multiscale=False).tap_blocks == (3,)
    assert build_network("vit_tiny16", tap_blocks=(1, 3)).decoder.stages[0][0].in_channels == 2 * 96


def test_multiscale_decoder_uses_the_tapped_blocks():
    """The decoder input equals the normed patch tokens of blocks 0..3, concatenated."""
    torch.manual_seed(0)
    net = build_network("vit_tiny16", in_channels=1, num_classes=2).eval()
    x = torch.randn(1, 1, 32, 48)
    seen = {}
    net.decoder.stages.register_forward_pre_hook(lambda module, inputs: seen.update(input=inputs[0]))
    with torch.no_grad():
        net(x)
        expected = torch.cat(net.encoder.get_intermediate_layers(x.expand(-1, 3, -1, -1), n=[0, 1, 2, 3],
                                                                 reshape=True), dim=1)
    assert seen["input"].shape == (1, 4 * 96, 2, 3)
    assert torch.equal(seen["input"], expected)


def test_get_intermediate_layers_official_semantics():
    encoder = build_encoder("vit_tiny16").eval()
    x = torch.randn(2, 3, 32, 64)
    last_two = encoder.get_intermediate_layers(x, n=2)
    explicit = encoder.get_intermediate_layers(x, n=[2, 3])
    assert len(last_two) == 2 and all(torch.equal(a, b) for a, b in zip(last_two, explicit))
    assert last_two[0].shape == (2, 8, 96)
    patches, cls, registers = encoder.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True,
                                                              return_extra_tokens=True)[0]
    assert patches.shape == (2, 96, 2, 4) and cls.shape == (2, 96) and registers.shape == (2, 4, 96)
    with torch.no_grad():
        assert torch.allclose(encoder(x), encoder.forward_features(x)["x_norm_clstoken"])


def test_masked_tokens_use_the_mask_token():
    encoder = build_encoder("vit_tiny16").eval()
    with torch.no_grad():
        encoder.mask_token.fill_(3.0)
    x = torch.randn(1, 3, 32, 32)
    masks = torch.tensor([[True, False, False, True]])
    tokens, _ = encoder.prepare_tokens(x, masks)
    patches = tokens[:, 1 + encoder.n_storage_tokens:]
    assert patches[0, 0].eq(3.0).all() and patches[0, 3].eq(3.0).all() and not patches[0, 1].eq(3.0).all()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", *args], capture_output=True, text=True)


def test_inspect_checkpoint_cli_reports_format_and_architecture(parity_dir):
    result = run_cli("inspect-checkpoint", str(parity_dir / "meddinov3_teacher_layout.pth"))
    assert result.returncode == 0, result.stderr
    assert "format:        meddinov3_teacher" in result.stdout
    assert "dim 96, depth 4, heads 3, registers 4" in result.stdout
    assert "parameters:    521,568" in result.stdout
    assert "59 encoder tensors, 14 ignored (dino_head, ibot_head)" in result.stdout


def test_inspect_checkpoint_cli_fails_with_one_line(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"\x80\x02garbage")
    result = run_cli("inspect-checkpoint", str(tmp_path / "broken.pth"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.pth" in errors[0]
