"""MEDDINOV3_AMP: mode resolution per device, the network's own per-call autocast, no process-wide side effect."""
import pytest
import torch

from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.models.network import build_network
from meddinov3_nnunet.nnunet import precision


def test_modes_resolve_per_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert precision.resolve("cpu", "auto").dtype is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    auto = precision.resolve("cpu", "auto")
    assert auto.dtype is None and "no native bf16" in auto.describe()
    assert precision.resolve("cpu", "bf16").dtype is torch.bfloat16  # explicit: honoured even without the flags
    fp16 = precision.resolve("cpu", "fp16")
    assert fp16.dtype is torch.float16 and fp16.needs_grad_scaler and "gradient scaling" in fp16.describe()
    assert precision.resolve("cuda", "off").dtype is None and not precision.resolve("cuda", "off").needs_grad_scaler
    assert precision.resolve("mps", "auto").dtype is None


def test_environment_variable_is_read_and_validated(monkeypatch):
    monkeypatch.setenv(precision.ENV_VAR, " OFF ")
    assert precision.resolve("cpu").dtype is None
    assert precision.autocast_dtypes()["cpu"] is None
    monkeypatch.setenv(precision.ENV_VAR, "half")
    with pytest.raises(InputError, match="MEDDINOV3_AMP='half' is not a precision mode; use one of auto, bf16"):
        precision.resolve("cpu")
    with pytest.raises(InputError, match="only supported on cuda and cpu"):
        precision.resolve("mps", "bf16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_bf16_on_a_missing_gpu_is_a_clear_error():
    with pytest.raises(InputError, match="does not support bf16; set MEDDINOV3_AMP=fp16 or auto"):
        precision.resolve("cuda", "bf16")


@pytest.mark.parametrize("capability, auto, bf16, old_torch", [
    ((7, 0), torch.float16, "emulated", False),  # V100
    ((7, 5), torch.float16, "emulated", True),  # T4 under torch < 2.3 (no including_emulation argument)
    ((8, 0), torch.bfloat16, "MEDDINOV3_AMP=bf16", False)])  # A100
def test_auto_picks_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, auto, bf16, old_torch):
    def is_bf16_supported(including_emulation=True):  # torch's rule: emulation counts unless told otherwise
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", (lambda: True) if old_torch else is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = precision.resolve("cuda", "auto")
    assert chosen.dtype is auto and chosen.needs_grad_scaler == (auto is torch.float16)
    forced = precision.resolve("cuda", "bf16")  # an explicit request is honoured, emulated or not
    assert forced.dtype is torch.bfloat16 and bf16 in forced.describe()


def _fc1_dtype(net, x, context=None):
    seen = {}
    handle = net.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.update(dtype=out.dtype))
    with torch.no_grad(), (context if context is not None else torch.autocast("cpu", enabled=False)):
        out = net(x)
    handle.remove()
    return seen["dtype"], out


def test_network_autocasts_each_forward_itself_without_global_state():
    torch.manual_seed(0)
    net = build_network("vit_tiny16", in_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 48)
    reference_dtype, reference = _fc1_dtype(net, x)
    assert reference_dtype is torch.float32
    dtype_before = torch.get_autocast_dtype("cpu")

    net.autocast_dtypes = {"cpu": torch.bfloat16}
    inner, out = _fc1_dtype(net, x)
    assert inner is torch.bfloat16 and out.dtype is torch.float32  # logits come back in float32
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.95
    # nothing leaks out of the call: no autocast state and the same default dtype as before
    assert not torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype_before

    net.autocast_dtypes = {"cpu": None}  # "off" wins over an autocast the caller opened (nnU-Net's on CUDA)
    inner, out = _fc1_dtype(net, x, torch.autocast("cpu", dtype=torch.bfloat16))
    assert inner is torch.float32 and torch.equal(out, reference)


def test_trainer_network_gets_the_setting_for_prediction(monkeypatch, capsys):
    from meddinov3_nnunet.trainers import MedDINOv3Trainer_tiny

    monkeypatch.setenv(precision.ENV_VAR, "off")
    net = MedDINOv3Trainer_tiny.build_network_architecture(None, None, 1, 3)
    assert net.autocast_dtypes["cpu"] is None
    assert "precision on cpu: fp32 (no autocast) (MEDDINOV3_AMP=off)" in capsys.readouterr().out
    monkeypatch.setenv(precision.ENV_VAR, "bf16")
    assert MedDINOv3Trainer_tiny.build_network_architecture(None, None, 1, 3).autocast_dtypes["cpu"] is torch.bfloat16
