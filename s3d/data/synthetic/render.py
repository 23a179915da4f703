"""MR-like images of a synthetic subject: sequence, per-subject contrast, gamma, bias, resolution, noise.

Each image draws its acquisition from :class:`~s3d.data.synthetic.factors.ImageRanges`: the tissue
intensities of its sequence (T1, T2, FLAIR or PD; every subject gets its own values within the
sequence's ranges), a gamma, a multiplicative bias field, a thick-slice or lower-resolution
acquisition, Rician noise, and whether it is skull-stripped (else skull, scalp and background noise
are in the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from s3d.data.synthetic.anatomy import DemoSubject
from s3d.data.synthetic.factors import SEQUENCE_INTENSITY, ImageRanges, seeded_rng, smooth_field, uniform

CONTRASTS = tuple(SEQUENCE_INTENSITY)
#: Mid-range relative intensity of (CSF, GM, WM, lesion) per sequence (each image draws its own).
TISSUE_INTENSITY = {k: tuple((lo + hi) / 2 for lo, hi in v[:4]) for k, v in SEQUENCE_INTENSITY.items()}
SCANNER_UNITS = 1000.0  # relative intensity 1.0 is stored as this many int16 units


def _blur_axis(x: torch.Tensor, shape: tuple[int, int, int], factors: Sequence[float]) -> torch.Tensor:
    low = [max(2, int(round(n / f))) for n, f in zip(shape, factors, strict=True)]
    y = F.interpolate(x[None, None], size=tuple(low), mode="area")
    return F.interpolate(y, size=shape, mode="trilinear", align_corners=False)[0, 0]


def render_image(
    subject: DemoSubject,
    contrast: str,
    seed: int | Sequence[int],
    ranges: ImageRanges | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Render one MR-like image of ``subject``.

    Args:
        subject: the anatomy (:func:`~s3d.data.synthetic.make_subject`).
        contrast: "T1", "T2", "FLAIR" or "PD"; sets the tissue intensity ranges.
        seed: seeds every acquisition factor of this image.
        ranges: the acquisition factors (default :class:`ImageRanges`; ``ImageRanges.none()``: clean).
        **overrides: replace single fields of ``ranges``, e.g. ``thick_slice_prob=0.0``.

    Returns:
        (D, H, W) int16 image in scanner units (relative intensity x 1000); skull-stripped images are
        0 outside the intracranial volume.

    Example:
        >>> img = render_image(make_subject(0, shape=(32, 32, 32), spacing_mm=5.0), "FLAIR", seed=1)
        >>> img.dtype
        dtype('int16')
    """
    r = replace(ranges or ImageRanges(), **overrides) if overrides else (ranges or ImageRanges())
    if contrast not in r.intensity:
        raise ValueError(f"contrast must be one of {tuple(r.intensity)}, got {contrast!r}")
    rng = seeded_rng(seed)
    mu = np.asarray([uniform(rng, rg) for rg in r.intensity[contrast]], np.float32)  # CSF GM WM lesion skull scalp
    shape = subject.shape
    tissue = torch.from_numpy(subject.tissue_pv)
    lesion = torch.from_numpy(subject.lesion_pv)
    head = torch.from_numpy(subject.head_pv) if subject.head_pv is not None else torch.zeros((2, *shape))
    texture = 1.0 + uniform(rng, r.texture) * smooth_field(rng, shape, control=12, channels=1)[0]
    brain = tissue.sum(0)
    clean = (tissue * torch.from_numpy(mu[:3]).view(3, 1, 1, 1)).sum(0) * texture
    clean = clean * (1.0 - lesion) + lesion * (tissue[1] + tissue[2]) * float(mu[3])
    stripped = rng.uniform() < r.skull_strip_prob
    if not stripped:
        clean = clean + (head * torch.from_numpy(mu[4:6]).view(2, 1, 1, 1)).sum(0) * texture
    clean = clean.clamp(min=0.0) ** uniform(rng, r.gamma)
    bias = uniform(rng, r.bias)
    if bias > 0:
        clean = clean * torch.exp(bias * smooth_field(rng, shape, control=3, channels=1)[0])
    if rng.uniform() < r.thick_slice_prob:
        factors = [1.0, 1.0, 1.0]
        factors[int(rng.integers(3))] = uniform(rng, r.thick_slice_factor)
        clean = _blur_axis(clean, shape, factors)
    if rng.uniform() < r.lowres_prob:
        clean = _blur_axis(clean, shape, [uniform(rng, r.lowres_factor)] * 3)
    sigma = uniform(rng, r.noise) * float(mu[:3].max())
    n1 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * sigma
    n2 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * sigma
    img = torch.sqrt((clean + n1) ** 2 + n2**2)  # Rician magnitude
    if stripped:
        img = img * (brain > 0.05).float()
    elif "fov_cut" in subject.info:  # no signal (not even noise) beyond a cut field of view
        img = img * _fov_of(subject).float()
    return torch.clamp(torch.round(img * SCANNER_UNITS), 0, 32767).numpy().astype(np.int16)


def _fov_of(subject: DemoSubject) -> torch.Tensor:
    """(D, H, W) bool: inside the subject's field of view (``info["fov_cut"]`` = axis, end, mm)."""
    axis, end, mm = subject.info["fov_cut"]
    n = int(round(mm / subject.spacing_mm[axis]))
    mask = torch.ones(subject.shape, dtype=torch.bool)
    sl = [slice(None)] * 3
    size = subject.shape[axis]
    sl[axis] = slice(0, n) if end == 0 else slice(size - n, size)
    mask[tuple(sl)] = False
    return mask
