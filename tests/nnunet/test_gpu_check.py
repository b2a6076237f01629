"""benchmarks/gpu_check.sh --dry-run: the GPU check's sections run on the CPU at toy sizes and are reported in Markdown
and JSON with their status and numbers; a failed section is reported and makes the exit code 1."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TITLES = {"environment": "Environment", "weights": "Encoder weights (tiny encoder)",
          "ddp": "DDP fine-tuning, 2 ranks", "pretrain": "Pretraining, 2 ranks",
          "step": "Training step at the planned batch", "smoke": "Stock nnU-Net smoke"}


def run_check(tmp_path, *arguments, timeout=600, **env):
    """(exit code, Markdown report, JSON report, output) of ``gpu_check.sh --dry-run`` with the caller's settings
    ``env`` (a ViT-B weights file that does not exist, which the check must drop)."""
    report = tmp_path / "report.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "MEDDINOV3_WEIGHTS": str(tmp_path / "vit_b16_missing.pth"), **env}
    result = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(report),
                             *arguments], capture_output=True, text=True, env=env, timeout=timeout)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    return result.returncode, report.read_text(), json.loads(report.with_suffix(".json").read_text()), output


def statuses(text: str, document: dict) -> dict:
    """Section key -> status, checked to agree between the Markdown headings and the JSON."""
    found = {section["key"]: section["status"] for section in document["sections"]}
    for key, status in found.items():
        heading = next(line for line in text.splitlines() if line.startswith(f"## {TITLES[key]}"))
        assert f" — {status} (" in heading, heading
    return found


def test_dry_run_reports_environment_weights_and_the_planned_training_step(tmp_path):
    code, text, document, output = run_check(tmp_path, "--skip", "ddp", "pretrain", "smoke", timeout=300)
    assert code == 0, text + output
    assert text.startswith("# GPU check (DRY RUN on the CPU")
    assert statuses(text, document) == {"environment": "passed", "weights": "passed", "ddp": "skipped",
                                         "pretrain": "skipped", "step": "passed", "smoke": "skipped"}
    assert document["dry_run"] is True and document["passed"] is True and document["format_version"] == 2
    assert text.rstrip().endswith("no section failed; skipped: ddp, pretrain, smoke.")
    sections = {section["key"]: section["data"] for section in document["sections"]}

    environment = sections["environment"]
    assert environment["cuda_bf16_native"] is False and environment["gpus"] == []
    assert "MEDDINOV3_WEIGHTS" in environment["dropped_user_settings"]
    assert "native bf16 (precision.cuda_bf16_native): False" in text

    weights = sections["weights"]["files"]
    assert [f["layout"] for f in weights] == ["project (save_encoder)", "MedDINOv3 model.pth (save_teacher_layout)"]
    assert all(f["trainer_identical"] and f["load_encoder_identical"] and f["trainer_load_s"] > 0 for f in weights)
    assert all(len(f["trainer_log"]) == 1 and "from environment variable MEDDINOV3_WEIGHTS" in f["trainer_log"][0]
               for f in weights)

    step = sections["step"]
    assert (step["trainer"], step["patch"], step["batch"], step["token_budget_batch"]) == \
        ("MedDINOv3Trainer_tiny", [64, 64], 4, 4)
    assert step["step_gflop"] > 0 and step["bf16_matmul_tflops"] > 0
    variants = {v["variant"]: v for v in step["variants"]}
    assert list(variants) == ["eager", "eager + activation checkpointing"]
    for name, variant in variants.items():
        assert variant["checkpointing"] == (name != "eager") == variant["estimate_checkpointing"]
        assert variant["ms_per_step"] > 0 and 0 < variant["mfu"] < 1 and len(variant["losses"]) == 3
        assert all(math.isfinite(loss) for loss in variant["losses"])
        assert variant["estimate_required_bytes"] > 2 ** 30 > variant["estimate_peak_bytes"] > 0  # + CUDA overhead
        assert variant["peak_bytes"] is None  # no CUDA: no measured peak
    checkpointed, eager = variants["eager + activation checkpointing"], variants["eager"]
    assert checkpointed["estimate_peak_bytes"] < eager["estimate_peak_bytes"]
    assert "compiled variants: not run in the dry run" in text
    assert "| variant | batch | ms / step (median, min-max) | first step s | peak GiB measured |" in text


def test_a_section_cut_off_by_the_time_budget_is_reported_as_failed(tmp_path):
    code, text, document, output = run_check(tmp_path, "--skip", "weights", "step", "smoke", "--time-limit", "1",
                                             timeout=120)
    assert code == 1, text + output
    assert statuses(text, document) == {"environment": "passed", "weights": "skipped", "ddp": "FAILED",
                                         "pretrain": "FAILED", "step": "skipped", "smoke": "skipped"}
    assert document["passed"] is False
    failed = [section for section in document["sections"] if section["status"] == "FAILED"]
    assert all(section["error"].startswith("TimeoutError: the run's time budget") for section in failed)
    assert "SOME FAILED; skipped: weights, step, smoke." in text


@pytest.mark.slow  # two torchrun launches (2 ranks each) and nnU-Net planning, training and prediction
def test_the_ddp_pretraining_and_nnunet_sections_of_the_dry_run_pass(tmp_path, shared_dir):
    """The sections the first test skips (with it: every section)."""
    code, text, document, output = run_check(tmp_path, "--skip", "weights", "step", timeout=1500,
                                             MEDDINOV3_SHARED=str(shared_dir), MEDDINOV3_NUM_EPOCHS="50")
    assert code == 0, text + output
    assert statuses(text, document) == {**dict.fromkeys(TITLES, "passed"), "weights": "skipped", "step": "skipped"}
    dropped = set(document["sections"][0]["data"]["dropped_user_settings"])
    assert {"MEDDINOV3_NUM_EPOCHS", "MEDDINOV3_WEIGHTS"} <= dropped
    sections = {section["key"]: section["data"] for section in document["sections"]}

    ddp = sections["ddp"]
    assert (ddp["backend"], ddp["ranks"], ddp["returncode"]) == ("gloo", 2, 0)
    assert [f["name"] for f in ddp["families"]] == ["2d", "2d hybrid", "3d hybrid"]
    for family in ddp["families"]:
        assert family["in_sync"] and family["steps"] == 3 and all(math.isfinite(v) for v in family["losses"])
    assert "2d compiled: not run in the dry run" in text

    pretrain = sections["pretrain"]
    assert (pretrain["config"], pretrain["backend"], pretrain["world_size"], pretrain["step"]) == \
        ("tiny_cpu", "gloo", 2, 4)
    assert pretrain["in_sync"] and math.isfinite(pretrain["last_step"]["total"])
    assert "train.grad_accum_steps=2" in pretrain["overrides"]

    smoke = sections["smoke"]
    assert smoke["dataset"] == "Dataset004_Hippocampus" and smoke["shared"]
    assert list(smoke["steps"]) == ["nnU-Net planning", "ViT-aware planning", "train", "predict"]
    assert len(smoke["train losses"]) == 1  # the check's own 1-epoch budget, not the caller's 50 epochs
    assert "2 predictions written with the inputs' size" in text
    assert "nnUNetv2_train -num_gpus 2: not run (0 GPUs here" in text
