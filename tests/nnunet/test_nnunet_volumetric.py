"""The 3D (2.5D, slice mixing), patch-8 and projected-decoder trainers through stock nnU-Net on 10 real Hippocampus
cases: plan (2d_meddinov3 + 3d_meddinov3), train, predict with nnU-Net's sliding window, resume, validate, and the
2D/3D mismatch messages."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_workspace import parse_train_losses

SMOKE = "MedDINOv3Trainer_3d_smoke"
BUDGET = dict(MEDDINOV3_NUM_EPOCHS=1, MEDDINOV3_ITERS_PER_EPOCH=2, MEDDINOV3_VAL_ITERS=1, MEDDINOV3_BATCH_SIZE=2)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(hippocampus_workspace):
    """The shared planned workspace (tests/nnunet/conftest.py) with one held-out case for the 3D predictions."""
    workspace = hippocampus_workspace
    workspace.held_out_3d = workspace.root / "held_out_3d"
    workspace.held_out_3d.mkdir()
    case = sorted(workspace.held_out.glob("*.nii.gz"))[0]
    (workspace.held_out_3d / case.name).symlink_to(case.resolve())
    return workspace


def model_folder(workspace, trainer, configuration):
    return workspace.results / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans__{configuration}"


def predict_and_check(workspace, trainer, configuration, out_name, fold=0):
    out = workspace.root / out_name
    workspace.run("nnUNetv2_predict", "-i", workspace.held_out_3d, "-o", out, "-d", 4, "-c", configuration, "-f", fold,
                  "-tr", trainer, "-device", "cpu", "--disable_tta")
    (image_file,) = workspace.held_out_3d.glob("*.nii.gz")
    prediction = sitk.ReadImage(str(out / image_file.name.replace("_0000.nii.gz", ".nii.gz")))
    assert prediction.GetSize() == sitk.ReadImage(str(image_file)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}


def test_plan_adds_a_3d_configuration_next_to_2d_meddinov3(workspace):
    plans = json.loads((workspace.preprocessed / "Dataset004_Hippocampus" / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["3d_meddinov3"]
    assert config["inherits_from"] == "3d_fullres"
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 40]
    assert config["patch_size"] == [40, 112, 80] and config["spacing"] == [1.0, 0.5, 0.5] and config["batch_size"] == 2
    assert (workspace.preprocessed / "Dataset004_Hippocampus" / "nnUNetPlans_3d_meddinov3").is_dir()
    assert "'3d_meddinov3'" in workspace.plan_output and "-tr MedDINOv3Trainer_3d" in workspace.plan_output


@pytest.fixture(scope="module")
def smoke_run(workspace):
    """The 3D smoke trainer's run on 3d_fullres fold 0 (3 epochs x 12 iterations), shared by the tests below."""
    return workspace.run("nnUNetv2_train", 4, "3d_fullres", 0, "-tr", SMOKE, "-device", "cpu")


def test_3d_smoke_trainer_trains_on_3d_fullres(workspace, smoke_run):
    """(nnUNetv2_predict's 3D sliding window: the 3D hybrid's end-to-end test below.)"""
    folder = model_folder(workspace, SMOKE, "3d_fullres")
    for name in ("checkpoint_final.pth", "validation/summary.json"):
        assert (folder / "fold_0" / name).is_file(), name
    assert json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"] == [40, 64, 48]
    assert "patch size [40, 56, 40] rounded up to [40, 64, 48]" in smoke_run.stdout
    losses = parse_train_losses(smoke_run.stdout)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_3d_trainer_resumes_with_c(workspace, smoke_run):
    """(--val: the 2D resume test in test_nnunet_integration; nnU-Net's validation is the same code in 3D.)"""
    resumed = workspace.run("nnUNetv2_train", 4, "3d_fullres", 0, "-tr", SMOKE, "-device", "cpu", "--c",
                            MEDDINOV3_NUM_EPOCHS=4, MEDDINOV3_ITERS_PER_EPOCH=2, MEDDINOV3_WEIGHTS="/does/not/exist")
    assert "Epoch 3" in resumed.stdout and "Epoch 2" not in resumed.stdout and "encoder:" not in resumed.stdout
    checkpoint = torch.load(model_folder(workspace, SMOKE, "3d_fullres") / "fold_0" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 4


@pytest.mark.parametrize("trainer, configuration", [
    ("MedDINOv3Trainer_S_hybrid_scratch", "2d"),  # the hybrids through nnUNetv2_train and nnUNetv2_predict
    ("MedDINOv3Trainer_S_hybrid_3d_scratch", "3d_fullres"),
])
def test_benchmark_trainer_trains_and_predicts_at_smoke_budget(workspace, trainer, configuration):
    train = workspace.run("nnUNetv2_train", 4, configuration, 2, "-tr", trainer, "-device", "cpu", **BUDGET)
    assert "budget: 1 epochs x 2 iterations" in train.stdout
    assert ("encoder: random initialisation" in train.stdout) == trainer.startswith("MedDINOv3")
    folder = model_folder(workspace, trainer, configuration)
    assert (folder / "fold_2" / "checkpoint_final.pth").is_file()
    patch = json.loads((folder / "plans.json").read_text())["configurations"][configuration]["patch_size"]
    assert patch == {"3d_fullres": [40, 64, 48], "2d": [64, 48]}[configuration]  # rounded up to 16-px tokens
    predict_and_check(workspace, trainer, configuration, f"pred_{trainer}_{configuration}", fold=2)


@pytest.mark.parametrize("trainer_name, configuration, patch", [
    ("MedDINOv3Trainer_S_3d_scratch", "3d_meddinov3", [40, 112, 80]),  # the ViT-aware 3D configuration
    ("MedDINOv3Trainer_S_patch8_scratch", "2d", [56, 40]),  # in-plane multiples of 8: nnU-Net's patch as planned
    ("nnUNet_Primus_S_Trainer_budget", "3d_fullres", [40, 56, 40]),  # nnU-Net's 3D ViT, the comparison row
    ("MedDINOv3Trainer_S_25d_scratch", "3d_fullres", [40, 64, 48]),
    ("MedDINOv3Trainer_S_slicemix_scratch", "3d_fullres", [40, 64, 48]),
    ("MedDINOv3Trainer_S_proj_scratch", "2d", [64, 48]),
    ("MedDINOv3Trainer_S_patch4_skip_scratch", "2d", [56, 40]),  # patch 4 + image skip; 56 x 40 fits patch 4
    ("MedDINOv3Trainer_S_hybrid_novit_scratch", "2d", [64, 48]),  # the hybrids' ablation rows
    ("MedDINOv3Trainer_S_hybrid_3d_novit_scratch", "3d_fullres", [40, 64, 48]),
    ("MedDINOv3Trainer_S_patch8_hybrid_scratch", "2d", [56, 40]),
    ("MedDINOv3Trainer_S_hybrid_inject_scratch", "2d", [64, 48]),  # token injection: its projection moves too
])
def test_design_trainers_are_found_by_nnunet_and_take_a_training_step_on_its_patch(workspace, monkeypatch,
                                                                                   trainer_name, configuration, patch):
    """The end-to-end runs above cover nnU-Net's loop (2D and 3D, the smoke trainers and the hybrids); the other
    design rows differ only in their network and plans, checked here in-process: nnU-Net's lookup, the planned patch,
    one step."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for key, value in workspace.env().items():
        monkeypatch.setenv(key, value)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    assert trainer_class.__name__ == trainer_name
    torch.manual_seed(0)
    trainer = workspace.trainer(trainer_class, configuration, 3)
    trainer.initialize()
    assert trainer.configuration_manager.patch_size == patch
    batch = 1 if len(patch) == 3 else 2  # a 3D patch is already a batch of slices for the ViT
    data = torch.randn(batch, 1, *patch)
    target = torch.randint(0, 3, (batch, 1, *patch)).float()
    trained = [p for p in trainer.network.parameters() if p.requires_grad]  # the ablations freeze the encoder
    before = [p.detach().clone() for p in trained]
    loss = trainer.train_step({"data": data, "target": target})["loss"]
    assert np.isfinite(loss) and loss > 0
    with torch.no_grad():
        assert trainer.network(data).shape == (batch, 3, *patch)
    moved = sum(not torch.equal(a, b.detach()) for a, b in zip(before, trained))
    assert moved > len(before) // 2


@pytest.mark.parametrize("trainer, configuration, message", [
    (SMOKE, "2d", "MedDINOv3Trainer_3d_smoke is a 3D method but configuration '2d' has a 2D patch size"),
    ("MedDINOv3Trainer_smoke", "3d_fullres",
     "MedDINOv3Trainer_smoke is a 2D method but configuration '3d_fullres' has a 3D patch size"),
])
def test_2d_and_3d_trainers_on_the_other_kind_of_configuration_get_one_clear_message(workspace, trainer,
                                                                                     configuration, message):
    result = workspace.run("nnUNetv2_train", 4, configuration, 0, "-tr", trainer, "-device", "cpu", check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert "Epoch 0" not in result.stdout


def test_encoder_weights_load_unchanged_into_the_3d_and_patch8_trainers(workspace, monkeypatch, tmp_path):
    import meddinov3_nnunet.trainers as trainers
    from meddinov3_nnunet.models.checkpoints import save_encoder
    from meddinov3_nnunet.models.encoder import build_encoder

    torch.manual_seed(5)
    encoder = build_encoder("vit_tiny16")
    save_encoder(encoder, tmp_path / "tiny.pth")
    for key, value in workspace.env(MEDDINOV3_WEIGHTS=tmp_path / "tiny.pth").items():
        monkeypatch.setenv(key, value)

    class Tiny3dPatch8(trainers.MedDINOv3Trainer_3d_smoke):
        encoder_patch_size = 8

    for trainer_class, name in ((trainers.MedDINOv3Trainer_3d_smoke, "3d"), (Tiny3dPatch8, "3d patch 8")):
        trainer = workspace.trainer(trainer_class, "3d_fullres", 3)
        trainer.initialize()
        trainer.load_encoder_weights()
        loaded = trainer.network.encoder.state_dict()
        same = [k for k, v in encoder.state_dict().items() if torch.equal(loaded[k], v)]
        assert len(same) == len(loaded) - (name == "3d patch 8"), name  # only the patch embedding is resampled
        log = open(trainer.log_file).read()
        assert "(format meddinov3_nnunet, from environment variable MEDDINOV3_WEIGHTS" in log
        assert ("resampled from patch 16 to 8" in log) == (name == "3d patch 8")


@pytest.mark.parametrize("trainer_name, configuration", [("MedDINOv3Trainer_S_hybrid_ds_scratch", "2d"),
                                                         ("MedDINOv3Trainer_S_hybrid_3d_ds_scratch", "3d_fullres")])
def test_deep_supervised_hybrids_train_on_nnunets_downsampled_targets(workspace, monkeypatch, trainer_name,
                                                                      configuration):
    """nnU-Net's own loader downsamples the targets to the decoder's levels, its loss weights them (1/2 per level,
    the lowest 0), and validation and prediction get the full-resolution logits alone."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    for key, value in workspace.env(nnUNet_n_proc_DA=0).items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    trainer = workspace.trainer(recursive_find_trainer_class_by_name(trainer_name), configuration, 3)
    trainer.initialize()
    assert trainer.enable_deep_supervision
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    assert scales[0] == [1.0] * len(patch) and scales[-1][-2:] == [1 / 8, 1 / 8]
    assert np.allclose(trainer.loss.weight_factors, [4 / 7, 2 / 7, 1 / 7, 0])
    batch = next(trainer.get_dataloaders()[0])
    assert [list(t.shape[2:]) for t in batch["target"]] == [[round(p * s) for p, s in zip(patch, scale)]
                                                            for scale in scales]
    heads = trainer.network.decoder.supervision_heads
    before = [head.weight.detach().clone() for head in heads]
    assert np.isfinite(trainer.train_step(batch)["loss"])
    assert not torch.equal(heads[0].weight, before[0]) and not torch.equal(heads[1].weight, before[1])

    trainer.set_deep_supervision_enabled(False)  # nnU-Net's validation, and its predictor's network
    with torch.no_grad():
        assert trainer.network(batch["data"][:1]).shape == (1, 3, *patch)
