"""Fault injection for encoder checkpoints and the network's input: broken files are refused with the reason,
`inspect-checkpoint` runs training's strict check, and a write killed half-way never leaves a half file."""
import os

import pytest
import torch

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.models.checkpoints import (CheckpointError, SizeMismatchError, check_checkpoint, encoder_state,
                                                 load_encoder, read_checkpoint, save_encoder)
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.models.presets import preset

from process_helpers import kill_writer_after


class Result:
    def __init__(self, capsys, path, extra):
        self.returncode = main(["inspect-checkpoint", str(path), *extra])
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def inspect(capsys, path, *extra):
    """`meddinov3-nnunet inspect-checkpoint` in this process (the CLI's error handling included)."""
    return Result(capsys, path, extra)


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(preset("vit_tiny16"))
    save_encoder(encoder, tmp_path / "tiny.pth")
    return encoder, tmp_path / "tiny.pth"


def edited(tmp_path, encoder, name, edit):
    state = encoder_state(encoder)
    edit(state)
    torch.save({"format": "meddinov3_nnunet.encoder", "format_version": 1, "arch": encoder.arch.to_dict(),
                "state_dict": state, "meta": {}}, tmp_path / name)
    return tmp_path / name


def test_nan_weights_are_refused_by_load_and_inspect(tmp_path, tiny, capsys):
    encoder, _ = tiny
    path = edited(tmp_path, encoder, "nan.pth", lambda s: s["blocks.2.attn.proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN/inf\) in: blocks\.2\.attn\.proj\.weight "
                                              r"\(1 of 9216\)"):
        load_encoder(path)
    result = inspect(capsys, path)
    assert result.returncode == 2 and "blocks.2.attn.proj.weight" in result.stderr and result.stdout == ""


def test_inspect_runs_the_strict_check_of_training(tmp_path, tiny, capsys):
    """Before: one wrongly shaped tensor or a missing key passed `inspect-checkpoint` with exit 0."""
    encoder, good = tiny
    assert inspect(capsys, good).returncode == 0

    def damage(state):
        state["blocks.1.norm1.weight"] = torch.ones(95)
        del state["blocks.3.mlp.fc2.bias"]
        state["blocks.0.extra"] = torch.ones(1)

    result = inspect(capsys, edited(tmp_path, encoder, "broken.pth", damage))
    assert result.returncode == 2
    for text in ("missing keys: blocks.3.mlp.fc2.bias", "unexpected keys: blocks.0.extra",
                 "wrongly shaped keys: blocks.1.norm1.weight: checkpoint (95,) vs model (96,)"):
        assert text in result.stderr


def test_wrong_size_names_the_size_instead_of_listing_keys(tiny, capsys):
    _, path = tiny
    with pytest.raises(SizeMismatchError) as info:
        check_checkpoint(read_checkpoint(path), preset("vit_b16"))
    assert info.value.checkpoint_preset == "vit_tiny16" and "blocks." not in str(info.value)
    result = inspect(capsys, path, "--preset", "vit_b16")
    assert result.returncode == 2 and "a trainer/preset of size vit_tiny16" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, not a list of 59 keys


def test_timm_file_without_rope_periods_never_gets_a_guessed_head_count(tmp_path, capsys):
    """A timm state dict stores no RoPE periods: a preset size takes the preset's heads (tiny: 3, not 96/64 = 1),
    any other size needs num_heads."""
    tiny = build_encoder(preset("vit_tiny16", "meta"))
    torch.save({k: v for k, v in tiny.state_dict().items() if k != "mask_token"}, tmp_path / "tiny_timm.pth")
    assert read_checkpoint(tmp_path / "tiny_timm.pth").arch.num_heads == 3
    odd = build_encoder(preset("vit_tiny16", "meta", embed_dim=64, num_heads=2, depth=2))
    torch.save({k: v for k, v in odd.state_dict().items() if k != "mask_token"}, tmp_path / "odd_timm.pth")
    with pytest.raises(CheckpointError, match=r"stores no RoPE periods and its size \(dim 64, depth 2\) is no named "
                                              r"preset .* pass it: load_encoder\(path, num_heads=N\)"):
        read_checkpoint(tmp_path / "odd_timm.pth")
    assert load_encoder(tmp_path / "odd_timm.pth", num_heads=2).arch.num_heads == 2
    assert inspect(capsys, tmp_path / "odd_timm.pth", "--num-heads", "2").returncode == 0


def test_malicious_pickle_is_refused_as_code_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"cls_token": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: the file contains code \(pickle global "
                                              r"(posix|os|nt)\.system\)"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("fault,message", [
    ("folder", r"is a folder, not a checkpoint file; pass the file itself \(it holds tiny\.pth\)"),
    ("zero-byte", r"cannot be read as a PyTorch checkpoint"),
    ("truncated", r"cannot be read as a PyTorch checkpoint"),
    ("missing", r"no such file"),
])
def test_file_faults_are_named(tmp_path, tiny, fault, message):
    _, good = tiny
    path = {"folder": tmp_path, "missing": tmp_path / "absent.pth"}.get(fault, tmp_path / "bad.pth")
    if fault == "zero-byte":
        path.write_bytes(b"")
    elif fault == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


WRITER = """
import sys, torch
from meddinov3_nnunet.models.checkpoints import save_encoder
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.presets import preset
encoder = build_encoder(preset("vit_s16"))
print("ready", flush=True)
step = 0
while True:
    step += 1
    with torch.no_grad():
        encoder.cls_token.fill_(step)
    save_encoder(encoder, sys.argv[1], meta={"step": step})
"""


@pytest.mark.slow
def test_kill_during_checkpoint_writes_never_leaves_a_half_file(tmp_path):
    """SIGKILL a process that rewrites an 88 MB encoder file in a loop, three times at different moments: the file
    is always a complete earlier version (its cls_token equals its recorded step); only temporaries are left."""
    target = tmp_path / "encoder.pth"
    for delay in (1.5, 2.3, 3.1):
        kill_writer_after(WRITER, target, delay)
        if target.exists():
            checkpoint = read_checkpoint(target)
            assert float(checkpoint.state_dict["cls_token"].flatten()[0]) == checkpoint.meta["step"]
    assert target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(name.startswith(".encoder.pth.") and name.endswith(".tmp") for name in leftovers)


# ---------------------------------------------------------------------------------------------
# network input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,message", [
    ((1, 32, 32), r"got shape \(1, 32, 32\) \(an unbatched image: add the batch axis"),
    ((1, 1, 4, 32, 32), r"got shape \(1, 1, 4, 32, 32\) \(a 3D batch \(B, C, D, H, W\): this network is 2D"),
    ((0, 1, 32, 32), r"empty batch: input of shape \(0, 1, 32, 32\) has batch size 0"),
    ((2, 3, 32, 32), r"built for 1 input channel\(s\), got 3"),
])
def test_network_input_errors_are_clear(shape, message):
    net = build_network("vit_tiny16", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(shape))
