"""`evaluation.probe_every`: the pretraining loop probes its teacher, logs probe.jsonl, plots it beside the losses."""
import json

import matplotlib.image
import numpy as np
import pytest

from meddinov3_nnunet.pretraining.config import ConfigError
from meddinov3_nnunet.pretraining.corpus import Source, build_corpus, settings_from_config
from meddinov3_nnunet.pretraining.train import PretrainingRun

from pretraining_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from pretraining_helpers import ct_volume, tiny_config, write_volume


def labelled_dataset(root, cases=5):
    """nnU-Net raw CT dataset whose label 1 is the bright 'bone' of `ct_volume`."""
    rng = np.random.default_rng(1)
    for i in range(cases):
        volume = ct_volume(rng, slices=3, empty_slices=0)
        write_volume(root / "imagesTr" / f"ct_{i:03d}_0000.nii.gz", volume)
        write_volume(root / "labelsTr" / f"ct_{i:03d}.nii.gz", (volume > 500).astype(np.uint8))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "bone": 1},
                                                   "numTraining": cases, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.slow  # a pretraining run
def test_a_run_probes_its_teacher_every_n_steps_and_plots_the_dice(tmp_path):
    data = labelled_dataset(tmp_path / "Dataset902_Bone")
    manifest = tmp_path / "corpus.json"
    build_corpus([Source(str(data / "imagesTr"))], settings_from_config(tiny_config()), manifest, progress=False)
    config = tiny_config("evaluation.probe_every=3", f"evaluation.probe_data={data}", "evaluation.probe_size=32",
                         "evaluation.probe_train_pixels=2000")
    output = tmp_path / "run"
    summary = PretrainingRun(config, manifest, output, progress=False, device="cpu").run()
    assert summary["status"] == "completed"
    probes = [json.loads(line) for line in (output / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [2, 5]  # after steps 3 and 6 (0-based step index, as metrics.jsonl)
    for probe in probes:
        assert 0.0 <= probe["probe_dice"]["bone"] <= 1.0 and probe["probe_dice_mean"] == probe["probe_dice"]["bone"]
    assert matplotlib.image.imread(output / "loss_curves.png").shape[1] == 16 * 90  # third column: the probe


def test_probing_without_a_dataset_is_refused():
    with pytest.raises(ConfigError, match="evaluation.probe_every needs an nnU-Net raw dataset"):
        tiny_config("evaluation.probe_every=10")
    assert tiny_config().evaluation.probe_every == 0  # off by default
