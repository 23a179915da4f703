"""Small PNG figures with PIL (no matplotlib): line plots of logged metrics, panels with titles.

Used by ``s3d demo`` (learning curves, overlays) and ``s3d pretrain --probe`` (the probe curve next to
the loss). Text uses Pillow's scalable default font where Pillow has FreeType (Pillow >= 10.1), else
its small bitmap font.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from s3d._fs import atomic_path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def font(size: int = 16) -> Any:
    """Pillow's default font at ``size`` pixels (its bitmap font where no scalable one is available)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def save_png(image: Any, path: str | os.PathLike[str]) -> None:
    """Write a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (800, 480)) -> Any:
    """A PIL image of one or more (x, y) line series with axes, ticks, labels and a legend.

    Example:
        >>> line_plot({"a": [(0, 1.0), (1, 0.5)]}, "loss", "step", "loss").size
        (800, 480)
    """
    from PIL import Image, ImageDraw

    w, h = size
    small, big = font(14), font(18)
    left, right, top, bottom = 78, 20, 40, 56
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    d.text((8, 8), f"{title}   [{ylabel}]", fill="black", font=big)
    if not pts:
        d.text((w // 3, h // 2), "no data", fill="black", font=big)
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
        d.line([left - 5, yy, left, yy], fill="black")
        d.text((6, yy - 8), f"{yv:.3g}", fill="black", font=small)
        xv = x0 + (x1 - x0) * i / 4
        xx, _ = px(xv, y0)
        d.line([xx, h - bottom, xx, h - bottom + 5], fill="black")
        d.text((xx - 14, h - bottom + 8), f"{xv:.4g}", fill="black", font=small)
    d.text((w // 2 - 4 * len(xlabel), h - 26), xlabel, fill="black", font=big)
    for k, s in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        line = [px(x, y) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for p in line if len(line) <= 12 else []:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    box_w = 20 + max(int(d.textlength(name, font=small)) for name in series) + 30
    d.rectangle([w - right - box_w, top + 2, w - right - 2, top + 12 + 20 * len(series)], fill="white",
                outline=(200, 200, 200))
    for k, name in enumerate(series):  # legend on top of the lines
        colour = COLOURS[k % len(COLOURS)]
        x = w - right - box_w + 8
        d.rectangle([x, top + 9 + 20 * k, x + 14, top + 19 + 20 * k], fill=colour)
        d.text((x + 22, top + 6 + 20 * k), name, fill="black", font=small)
    return img


def titled_grid(cells: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str], row_titles: Sequence[str] = (),
                scale: int = 4, title: str = "", footer: str = "", font_px: int = 18, gap: int = 6) -> Any:
    """A PIL image of image panels in rows and columns, each column titled (and each row, if given).

    Args:
        cells: rows of panels, each (H, W) uint8 grey or (H, W, 3) uint8 RGB; a row may be shorter.
        col_titles: one title per column, drawn above the first row.
        row_titles: one label per row, drawn left of it (empty: no label column).
        scale: nearest-neighbour upscaling of every panel (voxels -> pixels).
        title: a line above everything.
        footer: a line below everything (e.g. a colour legend).
        font_px: text size, pixels.
        gap: pixels between panels.

    Example:
        >>> titled_grid([[np.zeros((8, 8), np.uint8)] * 2], ["a", "b"]).size[0] >= 2 * 8 * 4
        True
    """
    from PIL import Image, ImageDraw

    f = font(font_px)
    rgb = [[np.repeat(c[..., None], 3, -1) if c.ndim == 2 else c for c in row] for row in cells]
    n_cols = max(len(r) for r in rgb)
    col_w = [max(r[j].shape[1] for r in rgb if j < len(r)) * scale for j in range(n_cols)]
    row_h = [max(c.shape[0] for c in r) * scale for r in rgb]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = (max(int(probe.textlength(t, font=f)) for t in row_titles) + 2 * gap) if row_titles else 0
    line_h = font_px + 2 * gap
    top = line_h * (2 if title else 1)
    width = max(label_w + sum(col_w) + gap * (n_cols + 1),
                int(probe.textlength(title, font=f)) + 2 * gap if title else 0,
                int(probe.textlength(footer, font=f)) + 2 * gap if footer else 0)
    height = top + sum(row_h) + gap * (len(rgb) + 1) + (line_h if footer else 0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((gap, gap), title, fill="black", font=f)
    x = label_w + gap
    for j, t in enumerate(col_titles[:n_cols]):
        tw = int(d.textlength(t, font=f))
        d.text((x + max(0, (col_w[j] - tw) // 2), top - line_h + gap), t, fill="black", font=f)
        x += col_w[j] + gap
    y = top + gap
    for i, row in enumerate(rgb):
        if row_titles:
            d.text((gap, y + row_h[i] // 2 - font_px // 2), row_titles[i], fill="black", font=f)
        x = label_w + gap
        for j, c in enumerate(row):
            panel = Image.fromarray(np.ascontiguousarray(c)).resize((c.shape[1] * scale, c.shape[0] * scale),
                                                                   Image.NEAREST)
            img.paste(panel, (x, y))
            x += col_w[j] + gap
        y += row_h[i] + gap
    if footer:
        d.text((gap, y), footer, fill="black", font=f)
    return img


__all__ = ["COLOURS", "font", "line_plot", "save_png", "titled_grid"]
