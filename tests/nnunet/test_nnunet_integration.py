"""End to end with stock nnU-Net on 10 real Hippocampus cases: plan -> train -> predict -> evaluate, plus resume,
validation-only, model-folder prediction, best-configuration search and the clear errors."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_workspace import parse_train_losses

CONFIG = "2d_meddinov3"
SMOKE = "MedDINOv3Trainer_smoke"

pytestmark = pytest.mark.slow  # one nnU-Net training shared by every test here, more trainings in some


def test_plan_adds_vit_configuration_with_stock_preprocessing(trained):
    plans = json.loads((trained.preprocessed / "Dataset004_Hippocampus" / "nnUNetPlans.json").read_text())
    config = plans["configurations"][CONFIG]
    assert config["inherits_from"] == "2d" and "preprocessor_name" not in config  # stock DefaultPreprocessor
    assert config["spacing"] == [0.5, 0.5] and config["patch_size"] == [112, 80]
    assert all(size % 16 == 0 for size in config["patch_size"])
    assert (trained.preprocessed / "Dataset004_Hippocampus" / f"nnUNetPlans_{CONFIG}").is_dir()
    assert "patch [112, 80] (35 tokens)" in trained.plan_output


def test_training_writes_nnunet_outputs_and_reduces_the_loss(trained):
    fold = trained.model_folder / "fold_0"
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        assert (fold / name).is_file(), name
    saved_plans = json.loads((trained.model_folder / "plans.json").read_text())
    assert saved_plans["configurations"][CONFIG]["patch_size"] == [112, 80]
    losses = parse_train_losses(trained.train_output)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "encoder: random initialisation (no weights configured)" in trained.train_output


def test_predict_writes_label_maps_matching_the_inputs(trained):
    out = trained.root / "predicted"
    trained.run("nnUNetv2_predict", "-i", trained.held_out, "-o", out, "-d", 4, "-c", CONFIG, "-f", 0, "-tr", SMOKE,
                "-device", "cpu")
    inputs = sorted(trained.held_out.glob("*.nii.gz"))
    assert len(inputs) == 2
    for image_file in inputs:
        prediction_file = out / image_file.name.replace("_0000.nii.gz", ".nii.gz")
        prediction, image = sitk.ReadImage(str(prediction_file)), sitk.ReadImage(str(image_file))
        assert prediction.GetSize() == image.GetSize()
        assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2}
    evaluation = trained.run("nnUNetv2_evaluate_folder", trained.labels, out, "-djfile",
                             trained.model_folder / "dataset.json", "-pfile", trained.model_folder / "plans.json")
    summary = json.loads((out / "summary.json").read_text())
    assert evaluation.returncode == 0 and len(summary["metric_per_case"]) == 2
    assert set(summary["mean"]) == {"1", "2"} and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_predict_from_model_folder(trained):
    out = trained.root / "predicted_from_folder"
    trained.run("nnUNetv2_predict_from_modelfolder", "-i", trained.held_out, "-o", out, "-m", trained.model_folder,
                "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1)
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_find_best_configuration_accepts_the_trainer(trained):
    result = trained.run("nnUNetv2_find_best_configuration", 4, "-c", CONFIG, "-tr", SMOKE, "-f", 0)
    assert f"-tr {SMOKE} -c {CONFIG}" in result.stdout


def test_gpu_checkpoint_predicts_on_cpu(trained, tmp_path, monkeypatch):
    """A checkpoint whose tensors are tagged cuda:0 (as saved on a GPU) is predicted on a CPU-only machine."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    for key, value in trained.env().items():
        monkeypatch.setenv(key, value)
    model = tmp_path / "model"
    shutil.copytree(trained.model_folder, model)
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    entry = (-1, lambda obj: "cuda:0", lambda obj, location: None)  # tag every storage as a GPU storage
    torch.serialization._package_registry.append(entry)
    torch.serialization._package_registry.sort(key=lambda item: item[0])
    try:
        torch.save(checkpoint, model / "fold_0" / "checkpoint_final.pth")
    finally:
        torch.serialization._package_registry.remove(entry)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    image, properties = predictor.plans_manager.image_reader_writer_class().read_images(
        [str(sorted(trained.held_out.glob("*.nii.gz"))[0])])
    segmentation = predictor.predict_single_npy_array(image, properties)
    assert segmentation.shape == image.shape[1:] and set(np.unique(segmentation)) <= {0, 1, 2}


def test_resume_with_c_continues_from_the_checkpoint_without_reloading_weights(trained):
    first = trained.run("nnUNetv2_train", 4, CONFIG, 1, "-tr", SMOKE, "-device", "cpu", MEDDINOV3_NUM_EPOCHS=1,
                        MEDDINOV3_ITERS_PER_EPOCH=4)
    resumed = trained.run("nnUNetv2_train", 4, CONFIG, 1, "-tr", SMOKE, "-device", "cpu", "--c",
                          MEDDINOV3_NUM_EPOCHS=2, MEDDINOV3_ITERS_PER_EPOCH=4, MEDDINOV3_WEIGHTS="/does/not/exist.pth")
    assert "Epoch 0" in first.stdout and "Epoch 1" not in first.stdout
    assert "Epoch 1" in resumed.stdout and "Epoch 0" not in resumed.stdout
    assert "encoder:" not in resumed.stdout  # weights are not looked up again on resume
    checkpoint = torch.load(trained.model_folder / "fold_1" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    assert checkpoint["current_epoch"] == 2 and len(checkpoint["logging"]["train_losses"]) == 2
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # smoke trainers validate and predict unmirrored

    validation = trained.run("nnUNetv2_train", 4, CONFIG, 1, "-tr", SMOKE, "-device", "cpu", "--val")
    assert "Mean Validation Dice" in validation.stdout and "Epoch" not in validation.stdout


def test_trainer_needing_weights_fails_early_with_the_fix(trained):
    result = trained.run("nnUNetv2_train", 4, CONFIG, 2, "-tr", "MedDINOv3Trainer", "-device", "cpu", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "MedDINOv3Trainer needs encoder weights and none are configured" in output
    assert "export MEDDINOV3_WEIGHTS=" in output and "Epoch 0" not in output


# -- in-process checks of the trainer class on the same workspace ------------------------------------
def make_trainer(trained, monkeypatch, trainer_name=SMOKE, configuration=CONFIG, fold=3, **env):
    import meddinov3_nnunet.trainers as trainers

    for key, value in trained.env(**env).items():
        monkeypatch.setenv(key, value)
    for key in ("MEDDINOV3_WEIGHTS", "DINOV3_WEIGHTS"):
        if key not in env:
            monkeypatch.delenv(key, raising=False)
    return trained.trainer(getattr(trainers, trainer_name), configuration, fold)


def test_plain_2d_configuration_gets_a_patch_divisible_by_16(trained, monkeypatch):
    trainer = make_trainer(trained, monkeypatch, configuration="2d")
    assert trainer.configuration_manager.patch_size == [64, 48]  # nnU-Net planned 56 x 40
    trainer.initialize()
    with torch.no_grad():
        assert trainer.network(torch.zeros(1, 1, 64, 48)).shape == (1, 3, 64, 48)


def test_encoder_weights_load_exactly_and_the_env_var_wins_over_the_plans(trained, monkeypatch, tmp_path):
    from meddinov3_nnunet.models.checkpoints import save_encoder
    from meddinov3_nnunet.models.encoder import build_encoder

    torch.manual_seed(1)
    from_plans, from_env = build_encoder("vit_tiny16"), build_encoder("vit_tiny16")
    save_encoder(from_plans, tmp_path / "plans.pth")
    save_encoder(from_env, tmp_path / "env.pth")
    trainer = make_trainer(trained, monkeypatch, MEDDINOV3_WEIGHTS=tmp_path / "env.pth")
    trainer.plans_manager.plans["configurations"][CONFIG]["meddinov3"]["encoder_weights"] = str(tmp_path / "plans.pth")
    trainer.configuration_manager.configuration["meddinov3"]["encoder_weights"] = str(tmp_path / "plans.pth")
    trainer.initialize()
    trainer.load_encoder_weights()
    loaded = trainer.network.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in from_env.state_dict().items())
    monkeypatch.delenv("MEDDINOV3_WEIGHTS")
    trainer.load_encoder_weights()  # the encoder changed, so this is treated as -pretrained_weights: kept
    assert all(torch.equal(trainer.network.encoder.state_dict()[k], v) for k, v in from_env.state_dict().items())
    fresh = make_trainer(trained, monkeypatch, fold=4)
    fresh.configuration_manager.configuration["meddinov3"]["encoder_weights"] = str(tmp_path / "plans.pth")
    fresh.initialize()
    fresh.load_encoder_weights()
    assert all(torch.equal(fresh.network.encoder.state_dict()[k], v) for k, v in from_plans.state_dict().items())
    log = open(trainer.log_file).read() + open(fresh.log_file).read()
    assert "(format meddinov3_nnunet, from environment variable MEDDINOV3_WEIGHTS" in log
    assert f"from plans configuration '{CONFIG}'" in log


def test_weights_of_another_architecture_are_a_clear_error(trained, monkeypatch, shared_dir):
    from meddinov3_nnunet.models.checkpoints import CheckpointError

    weights = shared_dir / "fixtures" / "dinov3_parity" / "meddinov3_teacher_layout.pth"
    trainer = make_trainer(trained, monkeypatch, trainer_name="MedDINOv3Trainer_S", MEDDINOV3_WEIGHTS=weights)
    trainer.initialize()
    with pytest.raises(CheckpointError) as info:
        trainer.load_encoder_weights()
    message = str(info.value)
    assert message.startswith("MedDINOv3Trainer_S (encoder vit_s16, weights from environment variable MEDDINOV3_WEIGHTS)")
    assert "holds another encoder size (vit_tiny16: dim 96" in message
    assert message.endswith("for these weights use MedDINOv3Trainer_tiny")
