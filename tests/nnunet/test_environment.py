"""nnU-Net's environment for the verbs: dataset ids and names, tool lookup, the logged subprocess runner, the
plugin's trainer folder; the shared "preset name or path" loader; patch rounding."""
import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

import meddinov3_nnunet
from meddinov3_nnunet import named_files
from meddinov3_nnunet.errors import InputError, UserError
from meddinov3_nnunet.nnunet.environment import (CommandFailedError, dataset_id, find_dataset_name, nnunet_tool,
                                                 plan_and_preprocess_command, plugin_environment, run_logged,
                                                 without_user_settings)
from meddinov3_nnunet.nnunet.planning import round_up_to_patch


def test_dataset_ids_and_names(tmp_path, monkeypatch):
    assert dataset_id("Dataset004_Hippocampus") == 4 and dataset_id("Dataset990_SyntheticDemo") == 990
    with pytest.raises(InputError, match="must look like Dataset004_Hippocampus"):
        dataset_id("Hippocampus")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "raw" / "Dataset012_Raw").mkdir(parents=True)
    (tmp_path / "pre" / "Dataset004_Hippocampus").mkdir(parents=True)
    assert find_dataset_name(4) == find_dataset_name("004") == "Dataset004_Hippocampus"
    assert find_dataset_name("12") == "Dataset012_Raw"  # only in nnUNet_raw
    with pytest.raises(InputError, match="neither an integer id nor a name"):
        find_dataset_name("hippo")
    with pytest.raises(InputError, match="no dataset with id 5"):
        find_dataset_name(5)
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(InputError, match="nnUNet_preprocessed is not set"):
        find_dataset_name(4)


def test_tools_come_from_this_python_environment_first():
    assert nnunet_tool("nnUNetv2_train") == str(Path(sys.executable).parent / "nnUNetv2_train")
    assert nnunet_tool("no_such_tool_xyz") == "no_such_tool_xyz"


def test_plugin_environment_adds_the_trainer_folder_once_and_keeps_user_choices():
    folder = meddinov3_nnunet.ext_trainer_dir()
    env = plugin_environment({"nnUNet_extTrainer": "/other", "nnUNet_def_n_proc": "6"}, few_workers=True)
    assert env["nnUNet_extTrainer"] == f"/other{os.pathsep}{folder}"
    assert env["nnUNet_def_n_proc"] == "6" and 1 <= int(env["nnUNet_n_proc_DA"]) <= 2
    again = plugin_environment(env, few_workers=False)
    assert again["nnUNet_extTrainer"] == env["nnUNet_extTrainer"]
    assert "nnUNet_n_proc_DA" not in plugin_environment({}, few_workers=False)


USER_SETTINGS = {"MEDDINOV3_WEIGHTS": "/weights/vitb16.pth", "DINOV3_WEIGHTS": "/weights/meta_vitb16.pth",
                 "MEDDINOV3_NUM_EPOCHS": "500", "MEDDINOV3_BATCH_SIZE": "64", "MEDDINOV3_AMP": "fp16"}


def leaked_user_settings(env: dict) -> list[str]:
    """The names of ``USER_SETTINGS`` that ``env`` passes on unchanged (the tool's own budget is not a leak)."""
    return sorted(key for key, value in USER_SETTINGS.items() if env.get(key) == value)


class Stop(Exception):
    """Ends a tool's pipeline at its first child run, once the run's command and environment are recorded."""


def test_without_user_settings_drops_the_plugins_variables_only():
    base = {**USER_SETTINGS, "PATH": "/usr/bin", "nnUNet_raw": "/raw", "OMP_NUM_THREADS": "1"}
    assert without_user_settings(base) == {"PATH": "/usr/bin", "nnUNet_raw": "/raw", "OMP_NUM_THREADS": "1"}


def test_demo_child_runs_get_the_demos_budget_and_weights_not_the_users(tmp_path, monkeypatch):
    from meddinov3_nnunet import demo

    for key, value in USER_SETTINGS.items():
        monkeypatch.setenv(key, value)
    runs = []

    def record(command, env, log, echo=()):
        runs.append((command, dict(env)))
        if len(runs) == 2:  # nnU-Net's planning, then `meddinov3-nnunet plan`
            raise Stop

    monkeypatch.setattr(demo, "run_logged", record)
    parser = argparse.ArgumentParser()
    demo.configure_parser(parser)
    args = parser.parse_args(["--workdir", str(tmp_path / "demo"), "--cases", "3", "--test-cases", "1",
                              "--epochs", "2", "--weights", str(tmp_path / "tiny.pth")])
    with pytest.raises(Stop):
        demo.run(args)
    for _, env in runs:
        assert leaked_user_settings(env) == []
        assert (env["MEDDINOV3_NUM_EPOCHS"], env["MEDDINOV3_ITERS_PER_EPOCH"]) == ("2", "40")  # the demo's own
        assert env["nnUNet_raw"] == str(tmp_path / "demo" / "nnUNet_raw")
    assert runs[1][0][-2:] == ["--weights", str(tmp_path / "tiny.pth")]  # weights only when given, via the plans


def test_gpu_check_smoke_runs_get_the_checks_budget_not_the_users(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[2] / "benchmarks/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    for key, value in USER_SETTINGS.items():
        monkeypatch.setenv(key, value)
    environments = []

    def record(command, env=None, **kwargs):
        environments.append(dict(env))
        raise Stop

    monkeypatch.setattr(gpu_check.subprocess, "run", record)
    with pytest.raises(Stop):
        gpu_check.nnunet_smoke_section(gpu_check.torch.device("cpu"), tmp_path, dry_run=True)
    (env,) = environments
    assert leaked_user_settings(env) == []
    assert env["MEDDINOV3_NUM_EPOCHS"] == "1" and env["nnUNet_results"] == str(tmp_path / "results")


def test_run_logged_keeps_all_output_shows_chosen_lines_and_names_the_log_on_failure(tmp_path, capsys):
    log = tmp_path / "logs" / "step.log"
    script = "print('Epoch 1'); print('noise'); import sys; print('oops', file=sys.stderr)"
    assert run_logged([sys.executable, "-c", script], os.environ, log, echo=("Epoch", "oops")) == 0
    assert log.read_text().splitlines() == ["Epoch 1", "noise", "oops"]
    assert capsys.readouterr().out.split() == ["Epoch", "1", "oops"]
    with pytest.raises(CommandFailedError, match=r"failed \(exit 4\); see .*step.log") as failure:
        run_logged([sys.executable, "-c", "raise SystemExit(4)"], os.environ, log)
    assert isinstance(failure.value, UserError) and failure.value.exit_code == 2
    assert run_logged([sys.executable, "-c", "raise SystemExit(4)"], os.environ, log, check=False) == 4


def test_presets_are_a_shipped_name_or_a_path(tmp_path):
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "small.json").write_text(json.dumps({"size": 1}))
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"size": 2}))
    assert named_files.load_json("small", tmp_path / "shipped", "preset") == {"size": 1}
    assert named_files.load_json(str(own), tmp_path / "shipped", "preset") == {"size": 2}
    with pytest.raises(InputError, match=r"unknown preset 'large'; choose one of \['small'\]"):
        named_files.load_json("large", tmp_path / "shipped", "preset")
    with pytest.raises(InputError, match="preset file .*missing.json does not exist"):
        named_files.load_json(str(tmp_path / "missing.json"), tmp_path / "shipped", "preset")
    own.write_text("{broken")
    with pytest.raises(InputError, match="own.json is not valid JSON"):
        named_files.load_json(str(own), tmp_path / "shipped", "preset")


def test_patch_sizes_round_up_to_whole_tokens():
    assert round_up_to_patch([56, 40]) == [64, 48]
    assert round_up_to_patch([64, 8]) == [64, 16]  # at least one token
    assert round_up_to_patch([112.0, 80.5]) == [112, 96]  # scaled sizes are floats


def test_planning_runs_as_many_fingerprint_as_preprocessing_workers():
    """nnU-Net's fingerprint step would otherwise spawn 8 fresh interpreters (62 s against 14 s for 10 cases here)."""
    command = plan_and_preprocess_command("4", ["2d", "3d_fullres"], processes=3)
    assert command[0] == nnunet_tool("nnUNetv2_plan_and_preprocess")
    assert command[1:] == ["-d", "4", "-c", "2d", "3d_fullres", "-np", "3", "-npfp", "3"]
