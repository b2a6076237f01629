"""Through stock nnU-Net on the CPU: bf16 training + prediction (MEDDINOV3_AMP) and nnUNet_compile=1 with the trainer
(compiled network, encoder weights into `_orig_mod`, checkpoint save / load)."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_workspace import parse_train_losses

CONFIG, SMOKE = "2d_meddinov3", "MedDINOv3Trainer_smoke"


@pytest.fixture(scope="module")
def planned(hippocampus_workspace):
    """The shared planned workspace (tests/nnunet/conftest.py); this module uses fold 4 of the smoke trainer on
    2d_meddinov3 in-process."""
    return hippocampus_workspace


@pytest.mark.slow
def test_bf16_training_and_prediction_through_stock_nnunet(trained):
    """The shared smoke training ran under MEDDINOV3_AMP=bf16 (tests/nnunet/conftest.py); its fold 0 predicts in bf16
    and in fp32."""
    losses = parse_train_losses(trained.train_output)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    log = next((trained.model_folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "precision on cpu: bf16 autocast (MEDDINOV3_AMP=bf16)" in log

    held_out = trained.held_out
    outputs = {}
    for amp in ("bf16", "off"):
        outputs[amp] = trained.root / f"predicted_{amp}"
        result = trained.run("nnUNetv2_predict", "-i", held_out, "-o", outputs[amp], "-d", 4, "-c", CONFIG, "-f", 0,
                             "-tr", SMOKE, "-device", "cpu", MEDDINOV3_AMP=amp)
        expected = "bf16 autocast (MEDDINOV3_AMP=bf16)" if amp == "bf16" else "fp32 (no autocast) (MEDDINOV3_AMP=off)"
        assert f"precision on cpu: {expected}" in result.stdout
    for name in sorted(p.name for p in outputs["off"].glob("*.nii.gz")):
        fp32, bf16 = (sitk.ReadImage(str(outputs[amp] / name)) for amp in ("off", "bf16"))
        assert bf16.GetPixelIDTypeAsString() == fp32.GetPixelIDTypeAsString()  # saved dtype unchanged
        assert bf16.GetSize() == fp32.GetSize() and bf16.GetSpacing() == fp32.GetSpacing()
        agreement = np.mean(sitk.GetArrayFromImage(bf16) == sitk.GetArrayFromImage(fp32))
        assert agreement > 0.95, f"{name}: bf16 and fp32 label maps agree on only {agreement:.1%} of voxels"


@pytest.mark.slow
def test_compiled_trainer_loads_encoder_weights_and_round_trips_checkpoints(planned, monkeypatch, tmp_path):
    """nnUNet_compile=1: the trainer compiles its network (aot_eager here, to keep the CPU test short; inductor
    adds code generation only), loads encoder weights through `_orig_mod`, trains, saves and reloads."""
    from torch._dynamo import OptimizedModule

    import meddinov3_nnunet.trainers as trainers
    from meddinov3_nnunet.models.checkpoints import save_encoder
    from meddinov3_nnunet.models.encoder import build_encoder

    torch.manual_seed(3)
    encoder = build_encoder("vit_tiny16")
    save_encoder(encoder, tmp_path / "encoder.pth")
    for key, value in planned.env(nnUNet_compile="1", MEDDINOV3_WEIGHTS=tmp_path / "encoder.pth").items():
        monkeypatch.setenv(key, value)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))

    def trainer(fold):
        instance = planned.trainer(getattr(trainers, SMOKE), CONFIG, fold)
        instance.initialize()
        return instance

    first = trainer(4)
    assert isinstance(first.network, OptimizedModule)
    first.load_encoder_weights()
    loaded = first.network._orig_mod.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.state_dict().items())
    batch = {"data": torch.randn(2, 1, *first.configuration_manager.patch_size),
             "target": torch.randint(0, 3, (2, 1, *first.configuration_manager.patch_size)).float()}
    assert math.isfinite(float(first.train_step(batch)["loss"]))
    first.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    saved = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert not any(k.startswith("_orig_mod") for k in saved)

    second = trainer(4)
    second.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    reloaded = second.network._orig_mod.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in first.network._orig_mod.state_dict().items())
