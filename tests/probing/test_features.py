"""`meddinov3-nnunet features`: picture size, slice choice, errors, and PCA maps that separate two textures.

A random-initialised tiny encoder is enough for the separation test: with LayerScale 1e-5 its blocks barely
change the tokens, so each token is a fixed random function of its 16x16 patch; identical textures give
near-identical tokens and different textures different ones. What the test checks is the command's own work
(preprocessing, resizing, token grid, PCA, colour stretch, placement and orientation of the map beside the
slice): a transposed grid, a shifted upsampling or components fitted per region would mix the regions.
How well a trained encoder separates anatomy is a property of the checkpoint, not of this command.
"""
import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.probing.features_cmd import choose_slices, input_size


def textured_volume(path, depth=3, height=96, width=128, split=48):
    """Vertical stripes (period 4 px) left of column ``split``, a checkerboard of 8-px squares right of it;
    both regions share mean and spread, so only texture tells them apart."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    stripes = np.where((x // 2) % 2 == 0, 300.0, 100.0)
    checker = np.where(((x // 8) + (y // 8)) % 2 == 0, 300.0, 100.0)
    image = np.where(x < split, stripes, checker)
    volume = np.stack([image + rng.normal(0, 5, image.shape) for _ in range(depth)]).astype(np.float32)
    itk = sitk.GetImageFromArray(volume)  # identity direction: already LPS, array[z] is the axial slice
    sitk.WriteImage(itk, str(path))
    return volume


def test_pca_map_separates_two_textures_and_has_the_promised_size(tmp_path, capsys):
    textured_volume(tmp_path / "texture.nii.gz")
    out = tmp_path / "features.png"
    assert main(["features", "random:vit_tiny16:0", str(tmp_path / "texture.nii.gz"), "--slice", "1", "--size",
                 "128", "--modality", "mri", "-o", str(out)]) == 0
    picture = matplotlib.image.imread(out)[..., :3]
    assert picture.shape == (96, 256, 3)  # slice (96x128 at --size 128) beside its PCA map
    grey, pca = picture[:, :128], picture[:, 128:]
    assert np.allclose(grey[..., 0], grey[..., 2])  # the slice is grey, the map is not
    assert pca.std(axis=(0, 1)).min() > 0.05
    first = pca[8::16, 8::16, 0]  # the first component (red), one value per token of the 6 x 8 grid
    stripes, checker = first[:, :3], first[:, 3:]  # columns 0..47 hold the stripes
    low, high = sorted([stripes, checker], key=np.mean)
    assert high.min() - low.max() > 0.5, (stripes, checker)  # the two textures do not overlap on it
    assert "96" in capsys.readouterr().out


def test_several_slices_stack_as_rows(tmp_path):
    textured_volume(tmp_path / "texture.nii.gz", depth=9, height=40, width=72)
    out = tmp_path / "rows.png"
    assert main(["features", "random:vit_tiny16", str(tmp_path / "texture.nii.gz"), "--slices", "3", "--size", "64",
                 "--block", "0", "-o", str(out)]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (3 * 32, 2 * 64)  # 40x72 -> 36x64 -> 32x64 (multiples of 16)


def test_slice_choice_and_input_size_rules():
    assert choose_slices(9, None, 3) == [2, 4, 6] and choose_slices(9, None, 1) == [4]
    assert choose_slices(9, 8, 1) == [8]
    assert input_size(30, 122, 448) == (112, 448) and input_size(5, 5, 20) == (16, 16)


@pytest.mark.parametrize("args,message", [
    (["--slice", "7"], "--slice 7 is outside the volume's 3 axial slices"),
    (["--block", "9"], "block 9 does not exist: the encoder has blocks 0..3"),
])
def test_bad_choices_name_the_fix(tmp_path, capsys, args, message):
    textured_volume(tmp_path / "texture.nii.gz", height=32, width=32)
    code = main(["features", "random:vit_tiny16", str(tmp_path / "texture.nii.gz"), *args, "-o",
                 str(tmp_path / "x.png")])
    assert code == 2 and message in capsys.readouterr().err


def test_unknown_checkpoint_is_a_clear_error(tmp_path, capsys):
    textured_volume(tmp_path / "texture.nii.gz", height=32, width=32)
    assert main(["features", str(tmp_path / "missing.pth"), str(tmp_path / "texture.nii.gz"), "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
