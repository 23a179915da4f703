"""The demo's figures as PNG (PIL): learning curves, label overlays on slices, the MAE reconstruction.

Every panel is titled (image, ground truth, each arm with its Dice, masked input, reconstruction) and
drawn at :data:`SCALE` pixels per voxel, so the figures read at a glance; line plots and the panel grid
come from :mod:`s3d.runtime.plot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s3d.demo.report import ARMS, RunResult
from s3d.demo.settings import DemoSettings
from s3d.runtime.plot import line_plot, save_png, titled_grid

_LABEL_RGB = {1: (66, 135, 245), 2: (60, 200, 90), 3: (240, 200, 60), 4: (230, 60, 60)}
_COLOUR_NAMES = {1: "blue", 2: "green", 3: "yellow", 4: "red"}
#: upscaling of every slice (voxels -> pixels): a 48-voxel slice becomes 240 pixels
SCALE = 5


def _smooth(points: list[tuple[int, float]], n_out: int = 60) -> list[tuple[float, float]]:
    """Average ``points`` in ``n_out`` equal bins of steps (readable loss curves)."""
    if len(points) <= n_out:
        return [(float(s), float(v)) for s, v in points]
    chunks = np.array_split(np.asarray(points, dtype=float), n_out)
    return [(float(c[:, 0].mean()), float(c[:, 1].mean())) for c in chunks if len(c)]


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean of curves logged at the same steps (cut to the shortest)."""
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], float(np.mean([c[i][1] for c in curves]))) for i in range(n)]


def _grey(slice2d: np.ndarray) -> np.ndarray:
    hi = float(np.percentile(slice2d, 99.5)) or 1.0
    return np.clip(slice2d / hi, 0, 1)


def overlay_panel(image: np.ndarray, labels: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: a grey image slice with label colours blended in (label 0 transparent)."""
    grey = (_grey(image) * 255).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels is not None:
        for value, colour in _LABEL_RGB.items():
            sel = labels == value
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * np.asarray(colour, np.float32)
    return rgb.astype(np.uint8)


def _axial(vol: np.ndarray) -> np.ndarray:
    return np.rot90(vol[:, :, vol.shape[2] // 2])


def _legend(label_names: dict[int, str]) -> str:
    return "colours: " + ", ".join(f"{name} {_COLOUR_NAMES[v]}" for v, name in sorted(label_names.items())
                                   if v in _COLOUR_NAMES)


def _snapshot_cells(snapshot: np.ndarray, patch: tuple[int, int, int]) -> list[list[np.ndarray]]:
    """Cut the trainer's reconstruction snapshot (3 rows of orthogonal slices x 4 columns) into its cells."""
    d, h, w = patch
    shapes = [(h, w), (d, w), (d, h)]  # the slice normal to axis 0, 1, 2
    rows, y = [], 0
    for rh, cw in shapes:
        rows.append([snapshot[y:y + rh, j * cw:(j + 1) * cw] for j in range(4)])
        y += rh
    return rows


def write_figures(out: Path, cohort: Any, runs: list[RunResult], pre_loss: list[tuple[int, float]],
                  pre_dir: Path, s: DemoSettings, pretrain_patch: tuple[int, int, int] | None = None,
                  pretrain_steps: int | None = None) -> dict[str, str]:
    """Write the report's PNG figures into ``out/figures``: the data, the learning curves, the MAE
    reconstruction and prediction overlays on the first test case, every panel titled.

    Args:
        out: the demo's output folder.
        cohort: the generated cohort (:func:`s3d.data.synthetic.write_demo_cohort`).
        runs: every fine-tuning arm's result.
        pre_loss: the pre-training loss curve, ``(step, loss)``.
        pre_dir: the pre-training run folder (its ``snapshots/``).
        s: the demo's settings.
        pretrain_patch: the pre-training patch (D, H, W) in voxels, to cut the reconstruction snapshot.
        pretrain_steps: the pre-training's steps, for the reconstruction's title.

    Returns:
        Figure name -> path relative to ``out`` (``"figures/data.png"``, ...).
    """
    from PIL import Image

    from s3d.data.io import read_nifti
    from s3d.data.nnunet import read_dataset_json

    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    labels = {v: k for k, v in read_dataset_json(cohort.dataset_dir).labels.items() if v != 0}

    # the data: one unlabelled volume per contrast, and a labelled case with its labels
    cells, titles = [], []
    for contrast in ("T1", "T2", "FLAIR"):
        found = sorted(p for p in cohort.unlabelled_files if p.name.endswith(f"_{contrast}.nii.gz"))
        if found:
            cells.append(overlay_panel(_axial(read_nifti(found[0])[0]), None))
            titles.append(f"unlabelled {contrast}")
    case = cohort.train_cases[0]
    img, _ = read_nifti(cohort.dataset_dir / "imagesTr" / f"{case}_0000.nii.gz")
    lab, _ = read_nifti(cohort.dataset_dir / "labelsTr" / f"{case}.nii.gz", dtype=np.int16)
    cells += [overlay_panel(_axial(img), None), overlay_panel(_axial(img), _axial(lab))]
    titles += [f"labelled {case}", "its ground truth"]
    save_png(titled_grid([cells], titles, scale=SCALE, title="The demo data (axial slices)",
                         footer=_legend(labels)), fig / "data.png")
    files["data"] = "figures/data.png"

    # learning curves: pre-training loss; fine-tuning loss and validation Dice of every arm
    save_png(line_plot({"pre-training (masked L2)": _smooth(pre_loss)}, "the demo's short S3D pre-training: loss",
                       "step", "masked L2, z-score units"), fig / "pretrain_loss.png")
    files["pretrain_loss"] = "figures/pretrain_loss.png"
    loss_series, val_series = {}, {}
    for n in sorted({r.n_train for r in runs}):
        for init in ARMS:  # the mean over seeds (every seed logs the same steps)
            group = [r for r in runs if r.n_train == n and r.init == init]
            if not group:
                continue
            loss_series[f"{init}, n={n}"] = _smooth(_mean_curve([r.loss for r in group]))
            if all(len(r.val_dice) > 1 for r in group):
                val_series[f"{init}, n={n}"] = [(float(a), b) for a, b in _mean_curve([r.val_dice for r in group])]
    save_png(line_plot(loss_series, "fine-tuning loss (Dice + CE), mean over seeds", "step", "loss"),
             fig / "finetune_loss.png")
    files["finetune_loss"] = "figures/finetune_loss.png"
    save_png(line_plot(val_series, "validation Dice during fine-tuning (tiles), mean over seeds", "step", "Dice"),
             fig / "val_dice.png")
    files["val_dice"] = "figures/val_dice.png"

    # MAE reconstruction: the trainer's own snapshot (rows: 3 orthogonal slices; columns: input,
    # masked input, reconstruction, target), cut into titled cells
    snaps = sorted((pre_dir / "snapshots").glob("*.png"))
    if snaps and pretrain_patch is not None:
        grid = _snapshot_cells(np.asarray(Image.open(snaps[-1]).convert("L")), pretrain_patch)
        save_png(titled_grid(grid, ["input", "masked input", "reconstruction", "target"],
                             ["sagittal (axis 0)", "coronal (axis 1)", "axial (axis 2)"], scale=SCALE,
                             title=f"MAE reconstruction after the demo's {pretrain_steps} pre-training steps "
                                   "(a held-out volume; z-score units, clipped to +-3)"),
                 fig / "mae_reconstruction.png")
        files["mae"] = "figures/mae_reconstruction.png"

    # prediction overlays on the first test case, smallest training set, first seed: image, truth, every arm
    n = min(r.n_train for r in runs)
    test = cohort.test_cases[0]
    img, _ = read_nifti(cohort.dataset_dir / "imagesTs" / f"{test}_0000.nii.gz")
    ref, _ = read_nifti(cohort.dataset_dir / "labelsTs" / f"{test}.nii.gz", dtype=np.int16)
    cells = [overlay_panel(_axial(img), None), overlay_panel(_axial(img), _axial(ref))]
    titles = ["image", "ground truth"]
    seed = min(r.seed for r in runs)
    for init in ARMS:
        r = next((x for x in runs if x.n_train == n and x.init == init and x.seed == seed), None)
        if r is None:
            continue
        pred, _ = read_nifti(Path(r.run_dir) / "pred" / f"{test}.nii.gz", dtype=np.int16)
        cells.append(overlay_panel(_axial(img), _axial(pred)))
        titles.append(f"{init} (Dice {r.dice_per_case.get(test, float('nan')):.2f})")
    save_png(titled_grid([cells], titles, scale=SCALE, footer=_legend(labels),
                         title=f"test case {test}: predictions after fine-tuning on {n} labelled cases, seed {seed}"),
             fig / "predictions.png")
    files["predictions"] = "figures/predictions.png"
    return files
