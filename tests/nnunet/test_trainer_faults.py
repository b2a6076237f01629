"""Trainer faults before the first epoch: no weights, weights of another size, NaN weights, a NaN input batch.
Each is logged as one ERROR line and raised as a `UserError` naming the fix (the trainer to use).

The trainers are made without nnU-Net's set-up (no dataset needed): only the attributes the weight loading and the
training step read are set."""
import pytest
import torch

import meddinov3_nnunet.trainers as trainers
from meddinov3_nnunet.errors import InputError
from meddinov3_nnunet.models.checkpoints import CheckpointError, SizeMismatchError, encoder_state, save_encoder
from meddinov3_nnunet.models.encoder import build_encoder
from meddinov3_nnunet.models.presets import preset


def bare_trainer(name, weights=None):
    """An instance of trainer ``name`` with a real network but without nnU-Net's __init__."""
    cls = getattr(trainers, name)
    trainer = object.__new__(cls)
    network = cls.build_plain_network(1, 2)
    trainer.log = []
    trainer.print_to_log_file = lambda *parts, **_: trainer.log.append(" ".join(map(str, parts)))
    trainer._plain_network = lambda: network
    trainer._fresh_encoder_marker = network.encoder.cls_token.detach().clone()
    trainer.resolve_encoder_weights = lambda: (weights, "environment variable MEDDINOV3_WEIGHTS") if weights \
        else (None, "")
    trainer.device = torch.device("cpu")
    return trainer


@pytest.mark.parametrize("name,suggested", [("MedDINOv3Trainer_S", "MedDINOv3Trainer_S_scratch"),
                                            ("MedDINOv3Trainer", "MedDINOv3Trainer_scratch"),
                                            ("MedDINOv3Trainer_tiny", "MedDINOv3Trainer_tiny_scratch")])
def test_missing_weights_suggest_the_scratch_trainer_of_the_same_size(name, suggested):
    trainer = bare_trainer(name)
    with pytest.raises(InputError, match=rf"To train without pretrained weights use {suggested}\.$"):
        trainer.load_encoder_weights()
    assert len(trainer.log) == 1 and trainer.log[0].startswith(f"ERROR: {name} needs encoder weights")


def test_weights_of_another_size_name_the_trainer_to_use(tmp_path):
    save_encoder(build_encoder(preset("vit_s16")), tmp_path / "vits.pth")
    trainer = bare_trainer("MedDINOv3Trainer_tiny", str(tmp_path / "vits.pth"))
    with pytest.raises(SizeMismatchError) as info:
        trainer.load_encoder_weights()
    message = str(info.value)
    assert message.startswith("MedDINOv3Trainer_tiny (encoder vit_tiny16, weights from environment variable")
    assert message.endswith("; for these weights use MedDINOv3Trainer_S") and "blocks." not in message
    assert "\n" not in message and trainer.log == [f"ERROR: {message}"]


def test_nan_weights_are_refused_before_training(tmp_path):
    encoder = build_encoder(preset("vit_tiny16"))
    state = encoder_state(encoder)
    state["norm.weight"][3] = float("inf")
    torch.save({"format": "meddinov3_nnunet.encoder", "format_version": 1, "arch": encoder.arch.to_dict(),
                "state_dict": state}, tmp_path / "inf.pth")
    trainer = bare_trainer("MedDINOv3Trainer_tiny", str(tmp_path / "inf.pth"))
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN/inf\) in: norm\.weight \(1 of 96\)"):
        trainer.load_encoder_weights()
    assert trainer.log[0].startswith("ERROR: MedDINOv3Trainer_tiny (encoder vit_tiny16")


def test_optional_non_finite_input_check_names_the_cases(monkeypatch):
    trainer = bare_trainer("MedDINOv3Trainer_tiny")
    data = torch.zeros(2, 1, 32, 32)
    data[1, 0, 5, 5] = float("nan")
    batch = {"data": data, "target": torch.zeros(2, 1, 32, 32), "keys": ["case_007", "case_012"]}
    monkeypatch.setenv("MEDDINOV3_CHECK_INPUT", "1")
    with pytest.raises(InputError, match=r"non-finite values \(NaN/inf\) in the input batch of case\(s\) "
                                         r"case_007, case_012"):
        trainer.train_step(batch)
    # off (the default) the batch reaches the network, whose output is then NaN everywhere: what the check prevents
    with torch.no_grad():
        assert torch.isnan(trainer._plain_network()(data)[1]).all()
