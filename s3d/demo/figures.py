"""The demo's figures as PNG (PIL): line plots of learning curves, label overlays on slices."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import atomic_path
from s3d.demo.report import RunResult
from s3d.demo.settings import DemoSettings

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
_LABEL_RGB = {1: (66, 135, 245), 2: (60, 200, 90), 3: (240, 200, 60), 4: (230, 60, 60)}


def _save_png(image: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (640, 400)) -> Any:
    """A PIL image of one or more (x, y) line series with axes, ticks and a legend.

    Example:
        >>> line_plot({"a": [(0, 1.0), (1, 0.5)]}, "loss", "step", "loss").size
        (640, 400)
    """
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 28, 46
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        d.text((w // 3, h // 2), "no data", fill="black")
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yy = px(x0, yv)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((4, yy - 6), f"{yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        xx, _ = px(xv, y0)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 10, h - bottom + 6), f"{xv:.4g}", fill="black")
    d.text((w // 2 - 4 * len(xlabel), h - 18), xlabel, fill="black")
    d.text((4, 8), f"{title}   [{ylabel}]", fill="black")
    for k, s in enumerate(series.values()):
        colour = _COLOURS[k % len(_COLOURS)]
        line = [px(x, y) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for p in line if len(line) <= 12 else []:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    d.rectangle([w - right - 196, top + 2, w - right - 2, top + 12 + 16 * len(series)], fill="white",
                outline=(200, 200, 200))
    for k, name in enumerate(series):  # legend on top of the lines
        colour = _COLOURS[k % len(_COLOURS)]
        d.rectangle([w - right - 190, top + 8 + 16 * k, w - right - 176, top + 18 + 16 * k], fill=colour)
        d.text((w - right - 170, top + 6 + 16 * k), name, fill="black")
    return img


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


def _row(panels: list[np.ndarray], scale: int = 3, gap: int = 4) -> Any:
    from PIL import Image

    h = max(p.shape[0] for p in panels)
    cells = [np.pad(p, ((0, h - p.shape[0]), (0, gap), (0, 0))) for p in panels]
    row = np.concatenate(cells, axis=1)
    img = Image.fromarray(row)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def _axial(vol: np.ndarray) -> np.ndarray:
    return np.rot90(vol[:, :, vol.shape[2] // 2])


def write_figures(out: Path, cohort: Any, runs: list[RunResult], pre_loss: list[tuple[int, float]],
                  pre_dir: Path, s: DemoSettings) -> dict[str, str]:
    """Write the report's PNG figures into ``out/figures``: the data, the learning curves, the MAE
    reconstruction and prediction overlays on the first test case.

    Args:
        out: the demo's output folder.
        cohort: the generated cohort (:func:`s3d.data.synthetic.write_demo_cohort`).
        runs: every fine-tuning arm's result.
        pre_loss: the pre-training loss curve, ``(step, loss)``.
        pre_dir: the pre-training run folder (its ``snapshots/``).
        s: the demo's settings.

    Returns:
        Figure name -> path relative to ``out`` (``"figures/data.png"``, ...).
    """
    from PIL import Image

    from s3d.data.io import read_nifti

    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    # the data: one unlabelled volume per contrast, and a labelled case with its labels
    panels = []
    for contrast in ("T1", "T2", "FLAIR"):
        found = sorted(p for p in cohort.unlabelled_files if p.name.endswith(f"_{contrast}.nii.gz"))
        if found:
            panels.append(overlay_panel(_axial(read_nifti(found[0])[0]), None))
    case = cohort.train_cases[0]
    img, _ = read_nifti(cohort.dataset_dir / "imagesTr" / f"{case}_0000.nii.gz")
    lab, _ = read_nifti(cohort.dataset_dir / "labelsTr" / f"{case}.nii.gz", dtype=np.int16)
    panels += [overlay_panel(_axial(img), None), overlay_panel(_axial(img), _axial(lab))]
    _save_png(_row(panels), fig / "data.png")
    files["data"] = "figures/data.png"

    # learning curves: pre-training loss; fine-tuning loss and validation Dice, S3D vs scratch
    _save_png(line_plot({"pre-training (masked L2)": _smooth(pre_loss)}, "S3D pre-training loss", "step",
                        "loss"), fig / "pretrain_loss.png")
    files["pretrain_loss"] = "figures/pretrain_loss.png"
    loss_series, val_series = {}, {}
    for n in sorted({r.n_train for r in runs}):
        for init in ("s3d", "scratch"):  # the mean over seeds (every seed logs the same steps)
            group = [r for r in runs if r.n_train == n and r.init == init]
            if not group:
                continue
            loss_series[f"{init}, n={n}"] = _smooth(_mean_curve([r.loss for r in group]))
            if all(len(r.val_dice) > 1 for r in group):
                val_series[f"{init}, n={n}"] = [(float(a), b) for a, b in _mean_curve([r.val_dice for r in group])]
    _save_png(line_plot(loss_series, "fine-tuning loss (Dice + CE)", "step", "loss"),
              fig / "finetune_loss.png")
    files["finetune_loss"] = "figures/finetune_loss.png"
    _save_png(line_plot(val_series, "validation Dice during fine-tuning", "step", "Dice"),
              fig / "val_dice.png")
    files["val_dice"] = "figures/val_dice.png"

    # MAE reconstruction: the trainer's own snapshot (rows: 3 orthogonal slices; columns: input,
    # masked input, reconstruction, target)
    snaps = sorted((pre_dir / "snapshots").glob("*.png"))
    if snaps:
        im = Image.open(snaps[-1]).convert("L")
        _save_png(im.resize((im.width * 3, im.height * 3), Image.NEAREST), fig / "mae_reconstruction.png")
        files["mae"] = "figures/mae_reconstruction.png"

    # prediction overlays on the first test case, smallest training set: image, truth, S3D, scratch
    n = min(r.n_train for r in runs)
    test = cohort.test_cases[0]
    img, _ = read_nifti(cohort.dataset_dir / "imagesTs" / f"{test}_0000.nii.gz")
    ref, _ = read_nifti(cohort.dataset_dir / "labelsTs" / f"{test}.nii.gz", dtype=np.int16)
    panels = [overlay_panel(_axial(img), None), overlay_panel(_axial(img), _axial(ref))]
    seed = min(r.seed for r in runs)
    for init in ("s3d", "scratch"):
        r = next(x for x in runs if x.n_train == n and x.init == init and x.seed == seed)
        pred, _ = read_nifti(Path(r.run_dir) / "pred" / f"{test}.nii.gz", dtype=np.int16)
        panels.append(overlay_panel(_axial(img), _axial(pred)))
    _save_png(_row(panels), fig / "predictions.png")
    files["predictions"] = "figures/predictions.png"
    return files
