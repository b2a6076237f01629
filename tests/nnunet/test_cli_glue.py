"""doctor, plan and demo: the console script's nnU-Net glue and its errors."""
import json
import subprocess
import sys

import pytest

import meddinov3_nnunet
from meddinov3_nnunet.nnunet.planning import PlanningError, derive_vit_plan

from nnunet_workspace import Workspace

HIPPOCAMPUS_2D = {"patch_size": [56, 40], "median_image_size_in_voxels": [50.5, 35.5], "spacing": [1.0, 1.0],
                  "batch_size": 366}


def test_vit_plan_arithmetic_follows_the_paper_rule():
    paper = derive_vit_plan(HIPPOCAMPUS_2D, target_size=896, max_scale=4, tokens_per_batch=50176)
    assert paper.scale == 4 and paper.spacing == [0.25, 0.25] and paper.patch_size == [224, 160]
    assert paper.batch_size == 50176 // (14 * 10)
    ct = derive_vit_plan({"patch_size": [512, 512], "median_image_size_in_voxels": [512, 512], "spacing": [0.8, 0.8],
                          "batch_size": 12}, target_size=896, max_scale=4, tokens_per_batch=50176)
    assert ct.patch_size == [896, 896] and ct.tokens_per_patch == 56 * 56 and ct.batch_size == 12
    large = derive_vit_plan({"patch_size": [1024, 1024], "median_image_size_in_voxels": [1100, 1000],
                             "spacing": [0.5, 0.5], "batch_size": 4}, 896, 4, 50176)
    assert large.scale == 1 and large.patch_size == [1024, 1024]  # never downsampled


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_size=8, max_scale=2, tokens_per_batch=100), "target_size >= 16"),
    (dict(target_size=128, max_scale=0.5, tokens_per_batch=100), "max_scale >= 1"),
])
def test_vit_plan_rejects_impossible_settings(kwargs, message):
    with pytest.raises(PlanningError, match=message):
        derive_vit_plan(HIPPOCAMPUS_2D, **kwargs)


def test_vit_plan_refuses_a_3d_source():
    with pytest.raises(PlanningError, match="derive from a 2D configuration"):
        derive_vit_plan({**HIPPOCAMPUS_2D, "patch_size": [40, 56, 40]}, 128, 2, 1536)


def test_plan_errors_name_the_fix(tmp_path):
    workspace = Workspace(tmp_path)
    unknown = workspace.cli("plan", "-d", 123, check=False)
    assert unknown.returncode == 2 and "no dataset with id 123" in unknown.stderr
    (workspace.preprocessed / "Dataset007_Empty").mkdir()
    no_plans = workspace.cli("plan", "-d", 7, check=False)
    assert no_plans.returncode == 2 and "nnUNetv2_plan_and_preprocess -d 7 -c 2d" in no_plans.stderr
    env = {k: v for k, v in workspace.env().items() if k != "nnUNet_preprocessed"}
    unset = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "plan", "-d", "7"], env=env,
                           capture_output=True, text=True)
    assert unset.returncode == 2 and "nnUNet_preprocessed is not set" in unset.stderr


def test_doctor_finds_the_trainers_when_configured(tmp_path):
    result = Workspace(tmp_path).cli("doctor")
    assert "MedDINOv3Trainer found: meddinov3_nnunet.trainers.base.MedDINOv3Trainer" in result.stdout
    assert "nnunetv2          2.8" in result.stdout and result.stdout.rstrip().endswith("all set")


def test_doctor_lists_what_is_missing(tmp_path):
    env = {k: v for k, v in Workspace(tmp_path).env().items() if k not in ("nnUNet_extTrainer", "nnUNet_results")}
    env.update(MEDDINOV3_WEIGHTS=str(tmp_path / "absent.pth"), MEDDINOV3_NO_AUTOREGISTER="1")
    result = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "doctor"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1
    missing = result.stdout.split("missing\n", 1)[1]
    assert f'export nnUNet_extTrainer="{meddinov3_nnunet.ext_trainer_dir()}"' in missing
    assert "export nnUNet_results=" in missing and "absent.pth: no such file" in missing


def test_doctor_says_how_the_trainers_were_found(tmp_path):
    user = Workspace(tmp_path).cli("doctor")
    assert "found by          your nnUNet_extTrainer setting" in user.stdout
    env = {k: v for k, v in Workspace(tmp_path).env().items() if k != "nnUNet_extTrainer"}
    auto = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "doctor"], env=env, capture_output=True,
                          text=True)  # the installed start-up file registers the folder in this fresh process
    assert "found by          automatic registration" in auto.stdout
    assert "MedDINOv3Trainer found: meddinov3_nnunet.trainers.base.MedDINOv3Trainer" in auto.stdout


def test_doctor_prints_the_trainer_folder():
    result = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "doctor", "--trainer-dir"],
                            capture_output=True, text=True)
    assert result.stdout.strip() == meddinov3_nnunet.ext_trainer_dir()


@pytest.mark.slow  # the whole demo pipeline: nnU-Net planning, training, prediction
def test_demo_runs_the_pipeline_on_synthetic_data(tmp_path):
    result = subprocess.run([sys.executable, "-m", "meddinov3_nnunet.cli", "demo", "--workdir", str(tmp_path),
                             "--cases", "8", "--test-cases", "2", "--epochs", "1", "--iterations", "4"],
                            capture_output=True, text=True, env=Workspace(tmp_path / "unused").env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "SYNTHETIC" in result.stdout and "Dice on the held-out cases" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and set(summary["mean"]) == {"1", "2"}
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz")) == ["synth_006.nii.gz",
                                                                                   "synth_007.nii.gz"]
