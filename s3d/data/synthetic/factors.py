"""The factors that make synthetic subjects differ, each with its range (documented in docs/quickstart.md),
and the random draws they are made with.

Two tables of ranges: :class:`AnatomyRanges` (what the subject's head looks like: size, shape, pose,
deformations, ventricles, atrophy, extra-axial CSF, skull and scalp, field of view) and
:class:`ImageRanges` (how the scan was acquired: sequence, per-subject tissue contrast, gamma, bias
field, noise, resolution, skull stripping). A range ``(lo, hi)`` is drawn uniformly per subject (or
per image) with :func:`uniform` from the subject's seeded stream (:func:`seeded_rng`); deformations,
texture and bias fields are :func:`smooth_field` draws. :meth:`AnatomyRanges.none` and
:meth:`ImageRanges.none` turn every factor off (the template itself, rendered cleanly), which the tests
use as a reference.

Example:
    >>> AnatomyRanges().head_scale
    (0.88, 1.12)
    >>> AnatomyRanges.none().ventricle_dilation_mm
    (0.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

Range = tuple[float, float]


def seeded_rng(seed: int | Sequence[int]) -> np.random.Generator:
    """The random stream of one subject, image or draw: numpy's generator of ``SeedSequence(seed)``.

    Example:
        >>> float(seeded_rng([1, 2]).uniform()) == float(seeded_rng([1, 2]).uniform())
        True
    """
    return np.random.default_rng(np.random.SeedSequence(seed))


def uniform(rng: np.random.Generator, r: Range) -> float:
    """One factor drawn uniformly from its range ``r = (lo, hi)``.

    Example:
        >>> 0.5 <= uniform(seeded_rng(0), (0.5, 2.0)) < 2.0
        True
    """
    return float(rng.uniform(r[0], r[1]))


def uniform_n(rng: np.random.Generator, r: Range, n: int) -> np.ndarray:
    """``n`` factors drawn uniformly from ``r = (lo, hi)`` (e.g. one per axis), float64 (n,).

    Example:
        >>> uniform_n(seeded_rng(0), (-1.0, 1.0), 3).shape
        (3,)
    """
    return rng.uniform(r[0], r[1], n)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], control: int, channels: int) -> torch.Tensor:
    """A smooth random field (channels, D, H, W), float32: N(0, 1) on a ``control``^3 grid, trilinear upsampling.

    Example:
        >>> smooth_field(seeded_rng(0), (8, 8, 8), control=3, channels=2).shape
        torch.Size([2, 8, 8, 8])
    """
    coarse = rng.standard_normal((1, channels, control, control, control)).astype(np.float32)
    coarse = torch.from_numpy(coarse)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


@dataclass(frozen=True)
class AnatomyRanges:
    """Per-subject anatomy factors (all drawn uniformly in their range, per subject).

    Attributes:
        head_scale: isotropic size of the head relative to the template (x 0.88-1.12: ~0.7-1.4x the
            template's brain volume).
        aspect: per-axis relative stretch on top of ``head_scale`` (head shape: long/short, wide/narrow).
        rotate_deg: rotation about each axis, degrees (head pose in the scanner).
        shift_mm: translation along each axis, mm (head position in the field of view).
        warp_large_mm: amplitude of a smooth deformation on a 4^3 control grid (lobe-scale shape), mm.
        warp_local_mm: amplitude of a deformation on a 9^3 control grid (gyral-scale shape), mm.
        ventricle_dilation_mm: how far the lateral ventricles grow into the surrounding tissue, mm
            (0: the template's; 3 mm: about 2-3x their volume); the cortex does not move.
        atrophy: relative shrinkage of the brain (GM + WM) inside an unchanged skull; the gap fills
            with CSF (widened sulci and subarachnoid space), 0-7 % linear (up to ~20 % of the volume).
        csf_rim_mm: thickness of the CSF layer between brain surface and skull, mm.
        skull_mm / scalp_mm: thickness of the skull and of the scalp around it, mm (visible in images
            that are not skull-stripped; labelled background).
        fov_crop_prob / fov_crop_mm: probability that the field of view cuts off one end of one axis,
            and how much is cut, mm (no signal and no label there).
        lesion_prob / lesion_count: probability that a subject has MS-like lesions, and how many.
    """

    head_scale: Range = (0.88, 1.12)
    aspect: Range = (-0.06, 0.06)
    rotate_deg: Range = (-10.0, 10.0)
    shift_mm: Range = (-6.0, 6.0)
    warp_large_mm: Range = (0.0, 6.0)
    warp_local_mm: Range = (0.0, 2.0)
    ventricle_dilation_mm: Range = (0.0, 3.0)
    atrophy: Range = (0.0, 0.07)
    csf_rim_mm: Range = (1.0, 3.5)
    skull_mm: Range = (4.0, 8.0)
    scalp_mm: Range = (3.0, 7.0)
    fov_crop_prob: float = 0.15
    fov_crop_mm: Range = (10.0, 35.0)
    lesion_prob: float = 0.3
    lesion_count: tuple[int, int] = (1, 10)

    @classmethod
    def none(cls) -> AnatomyRanges:
        """Every factor off: the template itself, centred, with a thin CSF rim and no lesions."""
        zero = (0.0, 0.0)
        return cls(head_scale=(1.0, 1.0), aspect=zero, rotate_deg=zero, shift_mm=zero, warp_large_mm=zero,
                   warp_local_mm=zero, ventricle_dilation_mm=zero, atrophy=zero, csf_rim_mm=(1.0, 1.0),
                   skull_mm=(6.0, 6.0), scalp_mm=(5.0, 5.0), fov_crop_prob=0.0, lesion_prob=0.0)

    def to_dict(self) -> dict[str, object]:
        """The ranges as a JSON-able dict (for model cards and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Per-sequence tissue intensity ranges, relative units: (CSF, GM, WM, lesion, skull, scalp). Each
#: subject draws its own values (so GM/WM contrast, CSF darkness etc. differ between subjects); the
#: ordering of tissues is what defines a sequence (T1: CSF < GM < WM; T2 and PD: CSF > GM > WM; FLAIR:
#: CSF dark, lesions bright).
SEQUENCE_INTENSITY: dict[str, tuple[Range, ...]] = {
    "T1": ((0.05, 0.30), (0.38, 0.60), (0.68, 1.00), (0.25, 0.50), (0.03, 0.15), (0.55, 1.00)),
    "T2": ((0.80, 1.00), (0.48, 0.70), (0.30, 0.46), (0.70, 0.95), (0.03, 0.10), (0.30, 0.65)),
    "FLAIR": ((0.03, 0.18), (0.52, 0.72), (0.36, 0.50), (0.80, 1.00), (0.03, 0.10), (0.40, 0.75)),
    "PD": ((0.78, 0.98), (0.68, 0.84), (0.52, 0.66), (0.80, 0.95), (0.05, 0.15), (0.60, 0.90)),
}


@dataclass(frozen=True)
class ImageRanges:
    """Per-image acquisition factors (drawn per rendered image).

    Attributes:
        intensity: per-sequence tissue intensity ranges (:data:`SEQUENCE_INTENSITY`).
        gamma: exponent applied to the clean image (non-linear contrast change).
        bias: strength of the multiplicative bias field (std of its log; 0.5 = roughly +-60 % across
            the head), on a 3^3 control grid.
        noise: Rician noise std relative to the brightest tissue.
        thick_slice_prob / thick_slice_factor: probability of a thick-slice acquisition and its slice
            thickness relative to the grid spacing (blur along one random axis).
        lowres_prob / lowres_factor: probability of a lower isotropic resolution and its factor.
        skull_strip_prob: probability that the image is skull-stripped (zero outside the intracranial
            volume); otherwise skull, scalp and background noise are visible.
        texture: amplitude of a fine within-tissue intensity texture.
    """

    intensity: dict[str, tuple[Range, ...]] = field(default_factory=lambda: dict(SEQUENCE_INTENSITY))
    gamma: Range = (0.75, 1.4)
    bias: Range = (0.0, 0.5)
    noise: Range = (0.01, 0.07)
    thick_slice_prob: float = 0.35
    thick_slice_factor: Range = (1.5, 3.5)
    lowres_prob: float = 0.2
    lowres_factor: Range = (1.2, 2.0)
    skull_strip_prob: float = 0.5
    texture: Range = (0.0, 0.05)

    @classmethod
    def none(cls) -> ImageRanges:
        """Mid-range tissue intensities, no gamma, bias, noise, blur or texture; skull-stripped."""
        mid = {k: tuple(((lo + hi) / 2, (lo + hi) / 2) for lo, hi in v) for k, v in SEQUENCE_INTENSITY.items()}
        zero = (0.0, 0.0)
        return cls(intensity=mid, gamma=(1.0, 1.0), bias=zero, noise=zero, thick_slice_prob=0.0, lowres_prob=0.0,
                   skull_strip_prob=1.0, texture=zero)

    def to_dict(self) -> dict[str, object]:
        """The ranges as a JSON-able dict (for model cards and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
