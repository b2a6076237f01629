"""`doctor` checks the configured weights as training would (size, keys, non-finite values) and lists a missing
nnUNet_raw folder. Before: a broken state dict got "all set" and training refused it later."""
import pytest
import torch

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.models.checkpoints import encoder_state, save_encoder
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.presets import preset

from nnunet_workspace import Workspace


@pytest.fixture
def doctor(tmp_path, monkeypatch, capsys):
    for key, value in Workspace(tmp_path).env().items():
        monkeypatch.setenv(key, value)
    for key in ("MEDDINOV3_WEIGHTS", "DINOV3_WEIGHTS"):
        monkeypatch.delenv(key, raising=False)

    def run(*args, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        code = main(["doctor", *args])
        out = capsys.readouterr().out
        return code, out.split("missing\n", 1)[1] if "missing\n" in out else "", out

    return run


@pytest.fixture
def tiny_weights(tmp_path):
    encoder = build_encoder(preset("vit_tiny16"))
    save_encoder(encoder, tmp_path / "tiny.pth")
    state = encoder_state(encoder)
    state["blocks.0.mlp.fc2.bias"][0] = float("nan")
    torch.save({"format": "meddinov3_nnunet.encoder", "format_version": 1, "arch": encoder.arch.to_dict(),
                "state_dict": state}, tmp_path / "nan.pth")
    return tmp_path


def test_weights_that_fit_the_trainer_are_all_set(doctor, tiny_weights):
    code, missing, out = doctor("--trainer", "MedDINOv3Trainer_tiny", MEDDINOV3_WEIGHTS=tiny_weights / "tiny.pth")
    assert code == 0 and out.rstrip().endswith("all set")
    assert "tiny.pth: meddinov3_nnunet, vit_tiny16: dim 96, depth 4, heads 3" in out
    assert "fits MedDINOv3Trainer_tiny" in out


def test_weights_of_another_size_name_the_trainer_to_use(doctor, tiny_weights):
    code, missing, _ = doctor(MEDDINOV3_WEIGHTS=tiny_weights / "tiny.pth")  # --trainer MedDINOv3Trainer: ViT-B
    assert code == 1
    assert "MEDDINOV3_WEIGHTS: " in missing and "holds another encoder size (vit_tiny16" in missing
    assert "for these weights use MedDINOv3Trainer_tiny instead of MedDINOv3Trainer" in missing
    assert "blocks." not in missing


def test_nan_weights_are_listed(doctor, tiny_weights):
    code, missing, _ = doctor("--trainer", "MedDINOv3Trainer_tiny", MEDDINOV3_WEIGHTS=tiny_weights / "nan.pth")
    assert code == 1 and "non-finite values (NaN/inf) in: blocks.0.mlp.fc2.bias (1 of 96)" in missing


def test_a_missing_nnunet_raw_folder_is_listed(doctor, tmp_path):
    code, missing, _ = doctor(nnUNet_raw=tmp_path / "no_raw_here")
    assert code == 1 and f"nnUNet_raw={tmp_path / 'no_raw_here'} does not exist: create it" in missing
