"""One planned Hippocampus workspace for every end-to-end nnU-Net test module (planning is a third of their cost)."""
import pytest

from nnunet_workspace import Workspace, hippocampus_subset


@pytest.fixture(scope="session")
def hippocampus_workspace(shared_dir, tmp_path_factory):
    """10 real cases planned and preprocessed by nnU-Net (2d, 3d_fullres) and by `meddinov3-nnunet plan`
    (2d_meddinov3, 3d_meddinov3); ``held_out`` / ``held_out_labels`` hold 2 further cases never trained on.
    Modules share it, so each trains its own trainer / configuration / fold combination."""
    workspace = Workspace(tmp_path_factory.mktemp("hippocampus"))
    workspace.identifiers = hippocampus_subset(shared_dir, workspace, count=10)
    workspace.run("nnUNetv2_plan_and_preprocess", "-d", 4, "-c", "2d", "3d_fullres", "-np", 1, 1, "-npfp", 1)
    workspace.plan_output = workspace.cli("plan", "-d", 4, "--preset", "cpu", "-np", 1).stdout
    workspace.held_out, workspace.held_out_labels = workspace.root / "held_out", workspace.root / "held_out_labels"
    workspace.held_out.mkdir()
    workspace.held_out_labels.mkdir()
    source = shared_dir / "datasets" / "Dataset004_Hippocampus"
    for identifier in workspace.identifiers[10:12]:
        (workspace.held_out / f"{identifier}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{identifier}_0000.nii.gz")
        (workspace.held_out_labels / f"{identifier}.nii.gz").symlink_to(source / "labelsTr" / f"{identifier}.nii.gz")
    return workspace


@pytest.fixture(scope="session")
def trained(hippocampus_workspace):
    """The shared workspace with fold 0 of 2d_meddinov3 trained by the smoke trainer under bf16 autocast
    (``MEDDINOV3_AMP=bf16``, whatever the CPU's default), ``train_output`` its stdout; test_nnunet_integration uses
    folds 1, 3, 4 of that pair besides, test_precision_compile_nnunet fold 4."""
    workspace = hippocampus_workspace
    workspace.train_output = workspace.run("nnUNetv2_train", 4, "2d_meddinov3", 0, "-tr", "MedDINOv3Trainer_smoke",
                                           "-device", "cpu", MEDDINOV3_AMP="bf16").stdout
    workspace.model_folder = workspace.results / "Dataset004_Hippocampus" / "MedDINOv3Trainer_smoke__nnUNetPlans__2d_meddinov3"
    workspace.labels = workspace.held_out_labels
    return workspace
