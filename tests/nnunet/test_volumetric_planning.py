"""Arithmetic of the 3D ViT configuration (3d_meddinov3) that `plan` derives from 3d_fullres."""
import pytest

from meddinov3_nnunet.nnunet.planning import PlanningError, derive_volumetric_plan

HIPPOCAMPUS_3D = {"patch_size": [40, 56, 40], "spacing": [1.0, 1.0, 1.0], "median_image_size_in_voxels": [36, 50, 35],
                  "batch_size": 9}


def test_slice_axis_is_kept_and_the_plane_is_scaled_and_rounded_to_16():
    cpu = derive_volumetric_plan(HIPPOCAMPUS_3D, scale=2.0, tokens_per_batch=1536, min_batch_size=2)
    assert (cpu.patch_size, cpu.spacing, cpu.batch_size) == ([40, 112, 80], [1.0, 0.5, 0.5], 2)
    assert cpu.median_image_size_in_voxels == [36.0, 100.0, 70.0] and cpu.tokens_per_patch == 40 * 7 * 5
    paper = derive_volumetric_plan(HIPPOCAMPUS_3D, scale=4.0, tokens_per_batch=50176)
    assert paper.patch_size == [40, 224, 160] and paper.batch_size == 8  # 50176 // 5600 tokens, under 3d_fullres's 9
    thick = derive_volumetric_plan({"patch_size": [20, 300, 300], "spacing": [5.0, 0.8, 0.8],
                                    "median_image_size_in_voxels": [40, 512, 512], "batch_size": 2}, 1.0, 50176)
    assert thick.patch_size == [20, 304, 304] and thick.spacing == [5.0, 0.8, 0.8] and thick.batch_size == 2


def test_a_2d_source_is_refused():
    with pytest.raises(PlanningError, match="derive from 3d_fullres"):
        derive_volumetric_plan({**HIPPOCAMPUS_3D, "patch_size": [56, 40]}, 2.0, 1536)
