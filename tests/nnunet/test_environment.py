"""nnU-Net's environment for the verbs: dataset ids and names, tool lookup, the logged subprocess runner, the
plugin's trainer folder; the shared "preset name or path" loader; patch rounding."""
import json
import os
import sys
from pathlib import Path

import pytest

import meddinov3_nnunet
from meddinov3_nnunet import named_files
from meddinov3_nnunet.errors import InputError, UserError
from meddinov3_nnunet.nnunet.environment import (CommandFailedError, dataset_id, find_dataset_name, nnunet_tool,
                                                 plugin_environment, run_logged)
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
