"""`meddinov3-nnunet probe` and the linear probe it runs: split, table, JSON, Dice that tracks the features, and the
same optimum as scikit-learn's balanced logistic regression (what the committed benchmark numbers used)."""
import json

import numpy as np
import SimpleITK as sitk
import torch

from meddinov3_nnunet.cli import main
from meddinov3_nnunet.probing.linear_probe import fit_probe, split_cases


def texture_dataset(root, cases=5, depth=3, size=64):
    """nnU-Net raw dataset whose label 1 is a square of checkerboard texture inside stripes: the intensities
    (100 / 300) are the same inside and out, only the texture tells the label."""
    folder = root / "Dataset901_Texture"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(cases):
        top, left = 8 + 4 * (i % 3), 8 + 4 * (i % 2)
        inside = (y >= top) & (y < top + 32) & (x >= left) & (x < left + 32)
        image = np.where(inside, np.where(((x // 8) + (y // 8)) % 2 == 0, 300.0, 100.0),
                         np.where((x // 2) % 2 == 0, 300.0, 100.0))
        volume = np.stack([image + rng.normal(0, 5, image.shape) for _ in range(depth)]).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(folder / "imagesTr" / f"tex_{i:03d}_0000.nii.gz"))
        label = np.stack([inside] * depth).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / f"tex_{i:03d}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "square": 1}, "numTraining": cases,
        "file_ending": ".nii.gz"}))
    return folder


def test_probe_reads_texture_that_intensity_cannot(tmp_path, capsys):
    folder = texture_dataset(tmp_path)
    out = tmp_path / "probe.json"
    assert main(["probe", "--data", str(folder), "random:vit_tiny16:0", "--size", "64", "--train-pixels", "6000",
                 "--intensity", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["test_cases"] == ["tex_004"] and len(result["protocol"]["train_cases"]) == 4
    encoder_row, intensity_row = result["results"]
    assert encoder_row["checkpoint"] == "random:vit_tiny16:0" and encoder_row["feature_dim"] == 4 * 96
    assert encoder_row["dice"]["square"] > 0.65, encoder_row  # 16-px tokens blur the unaligned edges (0.73)
    assert intensity_row["feature_dim"] == 1 and intensity_row["dice"]["square"] < 0.45, intensity_row  # 0.33
    printed = capsys.readouterr().out
    assert "| features | Dice square | mean Dice | pixel accuracy |" in printed
    assert f"| random init (vit_tiny16, seed 0) | {encoder_row['dice']['square']:.3f} |" in printed


def test_probe_refuses_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    assert main(["probe", "--data", str(tmp_path), "random:vit_tiny16", "-o", str(tmp_path / "p.json")]) == 2
    assert "no dataset.json" in capsys.readouterr().err


def test_split_holds_out_every_fifth_case():
    cases = [f"c{i:02d}" for i in range(11)]
    train, test = split_cases(list(reversed(cases)))
    assert test == ["c04", "c09"] and len(train) == 9
    assert split_cases(cases, ["c00"])[1] == ["c00"]


def test_fit_matches_scikit_learn_balanced_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    y = rng.choice(3, 4000, p=[0.9, 0.06, 0.04])
    x = (rng.normal(0, 1, (3, 20))[y] * 0.5 + rng.normal(0, 2, (4000, 20)) + 3).astype(np.float32)
    probe = fit_probe(torch.from_numpy(x), torch.from_numpy(y), 3)
    scaled = StandardScaler().fit_transform(x)
    reference = LogisticRegression(C=1.0, class_weight="balanced", max_iter=10_000, tol=1e-10).fit(scaled, y)
    ours = probe.weight.numpy() - probe.weight.numpy().mean(0)  # softmax weights are defined up to a shift
    theirs = reference.coef_ - reference.coef_.mean(0)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
    predicted = (torch.from_numpy(scaled).float() @ probe.weight.T + probe.bias).argmax(1).numpy()
    assert (predicted == reference.predict(scaled)).mean() > 0.999


def test_the_featuriser_upsamples_a_few_slices_at_a_time_with_the_numbers_of_the_whole_case(monkeypatch):
    """A whole case upsampled at once is (Z, 4 x 768, 512, 512) floats for ViT-B on CT: hundreds of GB."""
    from meddinov3_nnunet.probing.encoders import open_encoder, resolve_blocks, token_maps
    from meddinov3_nnunet.probing.linear_probe import encoder_featuriser

    torch.set_num_threads(1)
    encoder, _ = open_encoder("random:vit_tiny16:0")
    slices = np.random.default_rng(0).normal(size=(5, 40, 48)).astype(np.float32)
    grid = token_maps(encoder, slices, (32, 32), resolve_blocks(encoder, None))
    whole_case = torch.nn.functional.interpolate(grid, size=(40, 48), mode="bilinear", align_corners=False)
    upsampled = []  # leading sizes of every upsampling to the slices' pixels
    real = torch.nn.functional.interpolate

    def recording(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if out.shape[-2:] == (40, 48):
            upsampled.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
    for chunk in (1, 2, 3):
        upsampled.clear()
        features = encoder_featuriser(encoder, 32, upsample_slices=chunk)(slices)
        first = next(iter(features))
        assert upsampled == [chunk]  # lazy: the first slice comes before the rest of the case is upsampled
        chunked = torch.stack([first, *features])
        assert max(upsampled) <= chunk and sum(upsampled) == 5
        assert torch.equal(chunked, whole_case), chunk
