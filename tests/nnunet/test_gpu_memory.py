"""GPU memory in planning (batch sizes fitted to --gpu-memory by the memory meter) and the trainers' activation
checkpointing switch."""
import json

import pytest

from meddinov3_nnunet.models.checkpointing import ENV_VAR
from meddinov3_nnunet.models.memory import GIB, StepMemory
from meddinov3_nnunet.nnunet.planning import (PlanningError, derive_vit_plan, derive_volumetric_plan, fit_batch_size,
                                              fit_to_gpu, step_memory_of, trainer_class)
from meddinov3_nnunet.trainers import MedDINOv3Trainer_tiny

from nnunet_workspace import Workspace, hippocampus_subset

CT_2D = {"patch_size": [512, 512], "median_image_size_in_voxels": [512, 512], "spacing": [0.8, 0.8], "batch_size": 16}
CT_3D = {"patch_size": [64, 160, 160], "median_image_size_in_voxels": [100, 512, 512], "spacing": [2.0, 0.8, 0.8],
         "batch_size": 2}


class Linear:
    """A fake meter whose step needs (`StepMemory.required`) 1 GiB + 3 GiB per image; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(batch)
        return StepMemory(batch, (1, 8, 8), "bf16", False, 0, 0, 0, 0, 0, int(3 * batch * GIB / 1.1))


@pytest.mark.parametrize("budget,expected", [(80, 26), (24, 7), (4.5, 1), (200, 40)])
def test_the_largest_fitting_batch_in_a_few_estimates(budget, expected):
    meter = Linear()
    batch, note = fit_batch_size(meter, 40, int(budget * GIB))
    assert batch == expected
    fits = [b for b in range(1, 41) if meter(b).required <= budget * GIB]
    assert batch == max(fits)
    assert len(set(meter.calls[:-40])) <= 6  # 40 more calls are this test's own check
    assert (note == "") == (expected == 40)
    assert ("below the minimum 2" in note) == (expected == 1)


def test_nothing_fits():
    batch, note = fit_batch_size(Linear(), 40, 3 * GIB)
    assert batch == 0 and note == "one patch needs about 4.0 GiB"


def test_vit_b_at_896_fits_the_default_batch_of_16_into_80_gib_and_6_into_24():
    """The default preset's CT plan: 896², 16 classes, MedDINOv3Trainer (ViT-B, bf16, nnU-Net's loss)."""
    vit = derive_vit_plan(CT_2D, 896, 4, 50176)
    assert (vit.patch_size, vit.batch_size) == ([896, 896], 16)
    full = fit_to_gpu(vit, "MedDINOv3Trainer", 80, 1, 16, 2, explicit_batch=False)
    assert full.batch_size == 16 and 50 * GIB < full.memory.memory.required < 65 * GIB
    assert full.memory.checkpointed.required < 0.6 * full.memory.memory.required
    small = fit_to_gpu(vit, "MedDINOv3Trainer", 24, 1, 16, 2, explicit_batch=False)
    assert small.batch_size == 6 and "batch 6 instead of the token budget's 16" in small.memory.note
    assert small.memory.memory.required <= 24 * GIB
    seven = step_memory_of(trainer_class("MedDINOv3Trainer"), 1, 16, [896, 896], 7, False)
    assert seven.required > 24 * GIB
    assert "about 22.2 GiB of 24" in small.memory.describe()


def test_a_3d_patch_that_does_not_fit_is_refused_with_the_ways_out(monkeypatch):
    vit = derive_volumetric_plan(CT_3D, 1.75, 50176)
    assert (vit.patch_size, vit.batch_size) == ([64, 288, 288], 2)
    with pytest.raises(PlanningError) as refused:
        fit_to_gpu(vit, "MedDINOv3Trainer_3d", 16, 1, 16, 2, explicit_batch=False, volumetric=True)
    message = str(refused.value)
    for hint in ("one patch needs about 2", "more than --gpu-memory 16", "MEDDINOV3_ACTIVATION_CHECKPOINTING=1: about",
                 "--no-3d"):
        assert hint in message
    monkeypatch.setenv(ENV_VAR, "1")  # the same patch with checkpointing: batch 1, below the minimum of 2
    one = fit_to_gpu(vit, "MedDINOv3Trainer_3d", 16, 1, 16, 2, explicit_batch=False, volumetric=True)
    assert one.batch_size == 1 and one.memory.memory.checkpointing and one.memory.checkpointed is None
    assert "below the minimum 2" in one.memory.note and f"{ENV_VAR}=1" in one.memory.checkpointing_reason


def test_an_explicit_batch_is_kept_with_a_warning():
    vit = derive_vit_plan(CT_2D, 896, 4, 50176, batch_size=12)
    kept = fit_to_gpu(vit, "MedDINOv3Trainer_S", 8, 1, 16, 2, explicit_batch=True)
    assert kept.batch_size == 12 and kept.memory.note.startswith("WARNING: batch 12 (--batch-size) needs more")


def test_unknown_trainers_are_named():
    with pytest.raises(PlanningError, match="unknown trainer 'NoSuchTrainer'"):
        trainer_class("NoSuchTrainer")


@pytest.mark.parametrize("attribute,env,expected", [(False, None, False), (True, None, True), (False, "1", True),
                                                    (True, "0", False)])
def test_the_trainer_switch(monkeypatch, attribute, env, expected):
    monkeypatch.delenv(ENV_VAR, raising=False)
    if env is not None:
        monkeypatch.setenv(ENV_VAR, env)
    trainer = type("Trainer", (MedDINOv3Trainer_tiny,), {"activation_checkpointing": attribute})
    network = trainer.build_network_architecture(None, None, 1, 3)
    wrapped = [m for m in network.modules() if getattr(type(m), "activation_checkpointed", False)]
    assert len(wrapped) == (4 + 4 if expected else 0)  # tiny encoder blocks + upsampling stages


@pytest.mark.slow
def test_plan_prints_the_step_memory_and_fits_the_batches(shared_dir, tmp_path):
    """nnU-Net's plans for 10 Hippocampus cases (no preprocessing; 2d batch 14, 3d_fullres batch 2), `plan` with the
    tiny trainers: a tight budget cuts the 2D batch, a 3D patch that fits only alone gets batch 1, a budget below
    one patch is refused; the memory is printed and recorded in the plans."""
    workspace = Workspace(tmp_path)
    hippocampus_subset(shared_dir, workspace, count=10)
    workspace.run("nnUNetv2_plan_and_preprocess", "-d", 4, "-c", "2d", "3d_fullres", "--no_pp", "-np", 1, "-npfp", 1)
    plans_file = workspace.preprocessed / "Dataset004_Hippocampus" / "nnUNetPlans.json"
    args = ("plan", "-d", 4, "--no-preprocess", "--trainer", "MedDINOv3Trainer_tiny", "--trainer-3d",
            "MedDINOv3Trainer_3d_smoke")

    tight = workspace.cli(*args, "--gpu-memory", "1.1", "--no-3d")
    two_d = json.loads(plans_file.read_text())["configurations"]["2d_meddinov3"]
    assert two_d["patch_size"] == [224, 160] and 2 <= two_d["batch_size"] < 14
    assert two_d["meddinov3"]["gpu_memory"] == {"budget_gib": 1.1, "trainer": "MedDINOv3Trainer_tiny",
                                                "estimated_gib": 1.1}
    assert f"patch [224, 160] (140 tokens), batch {two_d['batch_size']}," in tight.stdout
    assert "GPU memory per training step (MedDINOv3Trainer_tiny, bf16 autocast" in tight.stdout
    assert f"batch {two_d['batch_size']} instead of the token budget's 14" in tight.stdout

    roomy = workspace.cli(*args, "--gpu-memory", "2")
    configurations = json.loads(plans_file.read_text())["configurations"]
    assert configurations["2d_meddinov3"]["batch_size"] == 14
    assert configurations["3d_meddinov3"]["batch_size"] == 1
    assert "batch 1 instead of the token budget's 2" in roomy.stdout and "below the minimum 2" in roomy.stdout

    refused = workspace.cli(*args, "--gpu-memory", "1", check=False)
    assert refused.returncode == 2 and "more than --gpu-memory 1. Lower --target-size" in refused.stderr
    assert json.loads(plans_file.read_text())["configurations"] == configurations  # nothing written
