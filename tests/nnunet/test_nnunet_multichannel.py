"""A two-channel MRI dataset (BraTS 2015 examples: FLAIR + T1c) trains and predicts with the plugin."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_workspace import Workspace


SLICES = slice(70, 86)  # 16 axial slices through every example's tumour: the whole volumes add only run time


@pytest.mark.slow  # an nnU-Net planning, training and prediction
def test_two_channel_dataset_trains_and_predicts(shared_dir, tmp_path):
    source = shared_dir / "datasets" / "brats2015_examples"
    workspace = Workspace(tmp_path)
    dataset = workspace.raw / "Dataset005_BraTSExamples"
    identifiers = sorted(p.name[:-len(".nii.gz")] for p in (source / "labelsTr").glob("*.nii.gz"))
    train_ids, test_id = identifiers[:-1], identifiers[-1]
    test_images = tmp_path / "test"
    for folder in (dataset / "imagesTr", dataset / "labelsTr", test_images):
        folder.mkdir(parents=True)
    for identifier in identifiers:
        for channel in range(2):
            name = f"{identifier}_{channel:04d}.nii.gz"
            image = sitk.ReadImage(str(source / "imagesTr" / name))[:, :, SLICES]
            sitk.WriteImage(image, str((test_images if identifier == test_id else dataset / "imagesTr") / name))
        if identifier != test_id:  # the shared labels are float32; nnU-Net wants integer label maps
            label = sitk.ReadImage(str(source / "labelsTr" / f"{identifier}.nii.gz"))[:, :, SLICES]
            sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(dataset / "labelsTr" / f"{identifier}.nii.gz"))
    meta = json.loads((source / "dataset.json").read_text())
    meta.update(name=dataset.name, numTraining=len(train_ids))
    (dataset / "dataset.json").write_text(json.dumps(meta))

    workspace.run("nnUNetv2_plan_and_preprocess", "-d", 5, "-c", "2d", "-np", 1, "-npfp", 1)
    workspace.run("nnUNetv2_train", 5, "2d", 0, "-tr", "MedDINOv3Trainer_smoke", "-device", "cpu",
                  MEDDINOV3_NUM_EPOCHS=1, MEDDINOV3_BATCH_SIZE=4)
    model = workspace.results / dataset.name / "MedDINOv3Trainer_smoke__nnUNetPlans__2d"
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    assert weights["channel_adapter.projection.weight"].shape == (3, 2, 1, 1)  # 2 channels -> 3-channel stem
    assert weights["decoder.head.weight"].shape[0] == 5  # background + 4 tumour labels

    workspace.run("nnUNetv2_predict", "-i", test_images, "-o", tmp_path / "pred", "-d", 5, "-c", "2d", "-f", 0,
                  "-tr", "MedDINOv3Trainer_smoke", "-device", "cpu", "--disable_tta")  # mirroring is not under test
    prediction = sitk.ReadImage(str(tmp_path / "pred" / f"{test_id}.nii.gz"))
    assert prediction.GetSize() == sitk.ReadImage(str(test_images / f"{test_id}_0000.nii.gz")).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1, 2, 3, 4}
