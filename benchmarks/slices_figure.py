"""The same slices from several benchmark rows next to the ground truth, as one PNG.

    python benchmarks/slices_figure.py --images imagesTr --labels labelsTr --cases hippocampus_001 hippocampus_017 \
        --row "nnU-Net 3d_fullres=RESULTS/.../fold_0/validation" --row "ViT-S 3d=..." -o slices.png

Each case is shown at the slice (first array axis) where its ground truth has the most foreground; every row shows
its prediction of that slice over the same image. Predictions are read with the project's verified volume reader.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from meddinov3_nnunet.atomic_io import save_figure_atomic  # noqa: E402
from meddinov3_nnunet.volume_io import read_volume  # noqa: E402

COLOURS = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.6), (0.2, 0.6, 1, 0.6), (0.3, 1, 0.3, 0.6)])


def dice(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Class-averaged Dice of one slice over the classes present in either map (1.0 when both are empty)."""
    scores = []
    for value in sorted(set(np.unique(truth)) | set(np.unique(prediction)) - {0}):
        t, p = truth == value, prediction == value
        scores.append(2 * np.logical_and(t, p).sum() / (t.sum() + p.sum()))
    return float(np.mean(scores)) if scores else 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of CASE_0000.nii.gz images")
    parser.add_argument("--labels", type=Path, required=True, help="folder of CASE.nii.gz ground truths")
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--row", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a row's prediction folder (CASE.nii.gz files)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)

    rows = [entry.split("=", 1) for entry in args.row]
    figure, axes = plt.subplots(len(args.cases), len(rows) + 1, squeeze=False,
                                figsize=(1.6 * (len(rows) + 1), 1.9 * len(args.cases)))
    for i, case in enumerate(args.cases):
        image = read_volume(args.images / f"{case}_0000.nii.gz").array
        truth = read_volume(args.labels / f"{case}.nii.gz").array
        z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(1)))
        panels = [("ground truth", truth)] + [(label, read_volume(Path(folder) / f"{case}.nii.gz").array)
                                              for label, folder in rows]
        for j, (label, labels) in enumerate(panels):
            axis = axes[i, j]
            axis.imshow(image[z], cmap="gray")
            axis.imshow(labels[z] % COLOURS.N, cmap=COLOURS, vmin=0, vmax=COLOURS.N - 1, interpolation="nearest")
            title = label if j == 0 else f"{label}\nslice Dice {100 * dice(truth[z], labels[z]):.0f}"
            axis.set_title(title if i == 0 or j > 0 else "", fontsize=6)
            if j == 0:
                axis.set_ylabel(f"{case}\nslice {z}", fontsize=6)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    save_figure_atomic(figure, args.out, dpi=120)
    plt.close(figure)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
