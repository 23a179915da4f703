"""One synthetic subject's anatomy: tissue, CSF, skull and scalp maps and lesions on an output grid.

Two anatomy sources (:mod:`~s3d.data.synthetic.templates`): ``"mni"``, the MNI ICBM152 2009 template's
grey/white-matter maps (via nilearn, ``pip install "s3d[demo]"``), and ``"phantom"``, a procedural head
with no extra dependency. Each subject draws its factors from :class:`~s3d.data.synthetic.factors.
AnatomyRanges` (head size and shape, pose, a lobe-scale and a gyral-scale deformation, enlarged
ventricles, atrophy inside an unchanged skull, extra-axial CSF, skull and scalp thickness, a cut field of
view, lesions) and :func:`make_subject` resamples the template through them with ``grid_sample``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from s3d._triple import to_3tuple, triple
from s3d.data.synthetic.factors import AnatomyRanges, seeded_rng, smooth_field, uniform, uniform_n
from s3d.data.synthetic.templates import TEMPLATE_SIZE, outside_mm_at, tissue_at

SOURCES = ("phantom", "mni")
TASKS = ("tissue", "lesion")
TISSUE_LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
LESION_LABELS = {"background": 0, "lesion": 1}


@dataclass
class DemoSubject:
    """One synthetic subject on its output grid.

    Attributes:
        tissue_pv: (3, D, H, W) float32 partial-volume fractions of CSF, GM, WM (sum <= 1; the
            remainder is background: skull, scalp, air).
        lesion_pv: (D, H, W) float32 lesion fraction in [0, 1] (all zero without lesions).
        head_pv: (2, D, H, W) float32 fractions of skull and scalp (labelled background).
        affine: (4, 4) voxel-to-world matrix, mm.
        seed: the seed the subject was drawn from, as a tuple of integers.
        info: the factors drawn for this subject (name -> value).
    """

    tissue_pv: np.ndarray
    lesion_pv: np.ndarray
    affine: np.ndarray
    seed: tuple[int, ...]
    head_pv: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (D, H, W), voxels."""
        return triple(int(s) for s in self.tissue_pv.shape[1:])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (D, H, W), mm."""
        return triple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))

    @property
    def brain_fraction(self) -> np.ndarray:
        """(D, H, W) fraction of each voxel inside the intracranial volume (CSF + GM + WM)."""
        return self.tissue_pv.sum(0)

    def tissue_labels(self) -> np.ndarray:
        """(D, H, W) uint8 labels 0 bg, 1 CSF, 2 GM, 3 WM: argmax over (bg, CSF, GM, WM) fractions."""
        bg = 1.0 - self.brain_fraction
        return np.argmax(np.concatenate([bg[None], self.tissue_pv], 0), axis=0).astype(np.uint8)

    def lesion_mask(self) -> np.ndarray:
        """(D, H, W) uint8, 1 where the lesion fraction exceeds 0.5."""
        return (self.lesion_pv > 0.5).astype(np.uint8)

    def labels(self, task: str) -> np.ndarray:
        """Label map of ``task`` ("tissue" or "lesion"), (D, H, W) uint8."""
        if task == "tissue":
            return self.tissue_labels()
        if task == "lesion":
            return self.lesion_mask()
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[torch.Tensor, np.ndarray]:
    """(D, H, W, 3) world mm of every voxel of a grid centred on the origin, and the grid's affine."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing, strict=True)]
    idx = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*idx, indexing="ij"), -1)
    world = grid * torch.tensor(spacing, dtype=torch.float32) + torch.tensor(affine[:3, 3], dtype=torch.float32)
    return world, affine


def _subject_coords(rng: np.random.Generator, world: torch.Tensor, r: AnatomyRanges, base_size: float,
                    info: dict[str, Any]) -> torch.Tensor:
    """Subject-to-template map: template mm of every output voxel (pose, size, shape, two warps)."""
    shape = tuple(world.shape[:3])
    size = uniform(rng, r.head_scale)
    stretch = 1.0 + uniform_n(rng, r.aspect, 3)
    rot = _rotation(np.deg2rad(uniform_n(rng, r.rotate_deg, 3)))
    shift = uniform_n(rng, r.shift_mm, 3)
    m = torch.from_numpy((rot @ np.diag(1.0 / (base_size * size * stretch))).astype(np.float32))
    coords = world @ m.T + torch.from_numpy(shift.astype(np.float32))
    large, local = uniform(rng, r.warp_large_mm), uniform(rng, r.warp_local_mm)
    coords = coords + (smooth_field(rng, shape, 4, 3) * (large / 2.0)).permute(1, 2, 3, 0)
    coords = coords + (smooth_field(rng, shape, 9, 3) * (local / 2.0)).permute(1, 2, 3, 0)
    info.update(head_scale=size, aspect=stretch.round(3).tolist(), warp_large_mm=large, warp_local_mm=local)
    return coords


def _add_lesions(
    rng: np.random.Generator, tissue: np.ndarray, spacing: tuple[float, float, float], count: int
) -> np.ndarray:
    """(D, H, W) lesion fraction: ``count`` irregular blobs (3-8 mm radius) centred in white matter."""
    shape = tissue.shape[1:]
    lesion = np.zeros(shape, np.float32)
    wm = tissue[2]
    candidates = np.argwhere(wm > 0.9)
    if len(candidates) == 0 or count == 0:
        return lesion
    sp = np.asarray(spacing, np.float32)
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    for _ in range(count):
        center = candidates[rng.integers(len(candidates))].astype(np.float32)
        radius_mm = rng.uniform(3.0, 8.0) * rng.uniform(0.7, 1.3, 3)
        n_lobes = int(rng.integers(1, 4))
        for lobe in range(n_lobes):
            c = center + (rng.normal(0, 0.5, 3) * radius_mm / sp if lobe else 0.0)
            r = radius_mm * (rng.uniform(0.5, 0.9) if lobe else 1.0)
            half = 2 * r / sp  # box half-size, voxels
            box = [slice(max(0, int(c[a] - half[a])), min(shape[a], int(c[a] + half[a]) + 2))
                   for a in range(3)]
            gi, gj, gk = np.meshgrid(idx[0][box[0]], idx[1][box[1]], idx[2][box[2]], indexing="ij")
            d = np.sqrt(((gi - c[0]) * sp[0] / r[0]) ** 2 + ((gj - c[1]) * sp[1] / r[1]) ** 2
                        + ((gk - c[2]) * sp[2] / r[2]) ** 2)
            blob = 1.0 / (1.0 + np.exp(-(1.0 - d) * float(r.min()) / (0.5 * float(sp.mean()))))
            lesion[tuple(box)] = np.maximum(lesion[tuple(box)], blob.astype(np.float32))
    # lesions live in parenchyma: none in CSF or outside the brain
    return lesion * (tissue[1] + tissue[2])


def _fov_mask(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
              r: AnatomyRanges, info: dict[str, Any]) -> np.ndarray | None:
    """1 inside the field of view; ``None`` when this subject's field of view is not cut."""
    if rng.uniform() >= r.fov_crop_prob:
        return None
    axis, end, cut_mm = int(rng.integers(3)), int(rng.integers(2)), uniform(rng, r.fov_crop_mm)
    n = min(shape[axis] - 1, int(round(cut_mm / spacing[axis])))
    mask = np.ones(shape, np.float32)
    sl = [slice(None)] * 3
    sl[axis] = slice(0, n) if end == 0 else slice(shape[axis] - n, shape[axis])
    mask[tuple(sl)] = 0.0
    info.update(fov_cut=(axis, end, round(n * spacing[axis], 1)))
    return mask


def make_subject(
    seed: int | Sequence[int],
    source: str = "phantom",
    shape: Sequence[int] = (80, 96, 80),
    spacing_mm: float | Sequence[float] = 2.0,
    ranges: AnatomyRanges | None = None,
    lesions: int | tuple[int, int] | None = None,
) -> DemoSubject:
    """Draw one synthetic subject: the template through this subject's factors, on the output grid.

    Args:
        seed: seeds everything about this subject.
        source: "phantom" (procedural, no extra dependency) or "mni" (MNI152 template via nilearn).
        shape: output grid (D, H, W), voxels; (80, 96, 80) at 2 mm covers a whole head.
        spacing_mm: voxel size, one value or three (anisotropic grids are allowed).
        ranges: the anatomy factors and their ranges (default :class:`AnatomyRanges`;
            ``AnatomyRanges.none()`` gives the template itself).
        lesions: number of lesions, or a (low, high) range (inclusive); ``None``: with probability
            ``ranges.lesion_prob``, ``ranges.lesion_count`` lesions.

    Returns:
        A :class:`DemoSubject` with partial-volume maps, lesion fraction, skull/scalp and affine;
        ``info`` holds the drawn factors.

    Example:
        >>> subj = make_subject(0, "phantom", shape=(48, 48, 48), spacing_mm=3.5, lesions=(2, 5))
        >>> subj.tissue_labels().shape
        (48, 48, 48)
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    shape_t = to_3tuple(shape, "shape")
    if min(shape_t) < 4:
        raise ValueError(f"shape must be three sizes >= 4 voxels, got {shape!r}")
    spacing = to_3tuple(spacing_mm, "spacing_mm", float)
    r = ranges or AnatomyRanges()
    seed_list = [int(v) for v in np.atleast_1d(seed)]
    rng = seeded_rng(seed_list)
    info: dict[str, Any] = {"source": source}
    world, affine = _grid_mm(shape_t, spacing)
    coords = _subject_coords(rng, world, r, TEMPLATE_SIZE[source], info)
    atrophy, dilate = uniform(rng, r.atrophy), uniform(rng, r.ventricle_dilation_mm)
    rim, skull_t, scalp_t = uniform(rng, r.csf_rim_mm), uniform(rng, r.skull_mm), uniform(rng, r.scalp_mm)
    info.update(atrophy=atrophy, ventricle_dilation_mm=dilate, csf_rim_mm=rim, skull_mm=skull_t, scalp_mm=scalp_t)
    # the brain shrinks inside an unchanged skull (atrophy): tissue is sampled further out than the skull
    tissue_coords = coords * (1.0 + atrophy)
    phantom_seed = [*seed_list, 11]  # the phantom's own variation, the same for every sampling
    brain = tissue_at(source, tissue_coords, spacing, seeded_rng(phantom_seed)).clamp(0.0, 1.0)
    outside = outside_mm_at(source, coords, spacing, seeded_rng(phantom_seed))[0]
    width = 0.5 * float(np.mean(spacing))
    if dilate > 0:  # the lateral ventricles grow by `dilate` mm into the tissue around them
        to_ventricles = outside_mm_at(source, tissue_coords, spacing, seeded_rng(phantom_seed))[1]
        keep = 1.0 - torch.sigmoid((dilate - to_ventricles) / width)
        brain = torch.stack([brain[0] + (brain[1] + brain[2]) * (1.0 - keep), brain[1] * keep, brain[2] * keep])

    def inside(mm: float) -> torch.Tensor:  # soft indicator of "less than mm outside the brain surface"
        return torch.sigmoid((mm - outside) / width)

    icv = torch.maximum(inside(rim), brain.sum(0)).clamp(max=1.0)
    csf = (icv - brain[1] - brain[2]).clamp(min=0.0)
    tissue = torch.stack([csf, brain[1], brain[2]]).numpy().astype(np.float32)
    skull = (inside(rim + skull_t) - icv).clamp(min=0.0)
    scalp = (inside(rim + skull_t + scalp_t) - icv - skull).clamp(min=0.0)
    head = torch.stack([skull, scalp]).numpy().astype(np.float32)
    if lesions is None:
        n_les = int(rng.integers(r.lesion_count[0], r.lesion_count[1] + 1)) if rng.uniform() < r.lesion_prob else 0
    elif isinstance(lesions, tuple):
        n_les = int(rng.integers(lesions[0], lesions[1] + 1))
    else:
        n_les = int(lesions)
    lesion = _add_lesions(rng, tissue, spacing, n_les)
    fov = _fov_mask(rng, shape_t, spacing, r, info)
    if fov is not None:
        tissue, head, lesion = tissue * fov, head * fov, lesion * fov
    info.update(lesions=n_les)
    return DemoSubject(tissue, lesion, affine, seed=tuple(seed_list), head_pv=head, info=info)
