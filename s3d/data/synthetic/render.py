"""MR-like images of a synthetic subject: per-contrast tissue intensities, bias field, thick slices, noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from s3d.data.synthetic.anatomy import DemoSubject, _rng, _smooth_field

CONTRASTS = ("T1", "T2", "FLAIR")

# Mean relative intensity of (CSF, GM, WM, lesion) per contrast; each subject jitters them by ~8 %.
TISSUE_INTENSITY = {
    "T1": (0.18, 0.55, 0.85, 0.40),
    "T2": (1.00, 0.62, 0.42, 0.85),
    "FLAIR": (0.10, 0.62, 0.45, 1.00),
}
SCANNER_UNITS = 1000.0  # relative intensity 1.0 is stored as this many int16 units


def render_image(
    subject: DemoSubject,
    contrast: str,
    seed: int | Sequence[int],
    bias: float = 0.2,
    noise: float = 0.03,
    thick_slice_prob: float = 0.3,
    jitter: float = 0.08,
) -> np.ndarray:
    """Render one MR-like image of ``subject``.

    Args:
        subject: the anatomy (:func:`make_subject`).
        contrast: "T1", "T2" or "FLAIR"; sets the tissue intensities (``TISSUE_INTENSITY``).
        seed: seeds the intensity jitter, bias field, slice thickness and noise of this image.
        bias: strength of the multiplicative bias field (std of its log), 0 for none.
        noise: Rician noise std relative to the brightest tissue.
        thick_slice_prob: probability of simulating a thick-slice acquisition (2-3x blur along one
            axis, then back to the grid).
        jitter: relative random change of each tissue intensity.

    Returns:
        (D, H, W) int16 image in scanner units (relative intensity x 1000), 0 outside the brain.

    Example:
        >>> img = render_image(make_subject(0, shape=(32, 32, 32), spacing_mm=5.0), "FLAIR", seed=1)
        >>> img.dtype
        dtype('int16')
    """
    if contrast not in TISSUE_INTENSITY:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    rng = _rng(seed)
    mu = np.asarray(TISSUE_INTENSITY[contrast], np.float32)
    mu = mu * rng.uniform(1 - jitter, 1 + jitter, 4).astype(np.float32)
    tissue = torch.from_numpy(subject.tissue_pv)
    lesion = torch.from_numpy(subject.lesion_pv)
    texture = 1.0 + 0.03 * _smooth_field(rng, subject.shape, control=12, channels=1)[0]
    clean = (tissue * torch.from_numpy(mu[:3]).view(3, 1, 1, 1)).sum(0) * texture
    brain = tissue.sum(0)
    clean = clean * (1.0 - lesion) + lesion * brain * float(mu[3])
    if bias > 0:
        clean = clean * torch.exp(bias * _smooth_field(rng, subject.shape, control=3, channels=1)[0])
    if rng.uniform() < thick_slice_prob:
        axis = int(rng.integers(3))
        factor = float(rng.uniform(2.0, 3.0))
        low = list(subject.shape)
        low[axis] = max(2, int(round(low[axis] / factor)))
        x = F.interpolate(clean[None, None], size=tuple(low), mode="area")
        clean = F.interpolate(x, size=subject.shape, mode="trilinear", align_corners=False)[0, 0]
    sigma = noise * float(mu.max())
    n1 = torch.from_numpy(rng.standard_normal(subject.shape).astype(np.float32)) * sigma
    n2 = torch.from_numpy(rng.standard_normal(subject.shape).astype(np.float32)) * sigma
    img = torch.sqrt((clean + n1) ** 2 + n2**2) * (brain > 0.05).float()  # Rician; skull-stripped
    out = torch.clamp(torch.round(img * SCANNER_UNITS), 0, 32767).numpy().astype(np.int16)
    return out
