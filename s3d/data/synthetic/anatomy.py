"""One synthetic subject's anatomy: tissue partial-volume maps and lesions on an output grid.

Two anatomy sources: ``"mni"``, the MNI ICBM152 2009 template's grey/white-matter maps (via nilearn,
``pip install "s3d[demo]"``), and ``"phantom"``, a procedural head with no extra dependency. Per
subject the anatomy is warped (random affine plus smooth deformation), resampled with
``grid_sample`` and given optional MS-like lesions in white matter (:func:`make_subject`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SOURCES = ("phantom", "mni")
TASKS = ("tissue", "lesion")
TISSUE_LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
LESION_LABELS = {"background": 0, "lesion": 1}


@dataclass
class DemoSubject:
    """One synthetic subject on its output grid.

    Attributes:
        tissue_pv: (3, D, H, W) float32 partial-volume fractions of CSF, GM, WM (sum <= 1; the
            remainder is background).
        lesion_pv: (D, H, W) float32 lesion fraction in [0, 1] (all zero without lesions).
        affine: (4, 4) voxel-to-world matrix, mm.
        seed: the seed the subject was drawn from, as a tuple of integers.
    """

    tissue_pv: np.ndarray
    lesion_pv: np.ndarray
    affine: np.ndarray
    seed: tuple[int, ...]
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape (D, H, W), voxels."""
        return tuple(int(s) for s in self.tissue_pv.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (D, H, W), mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def brain_fraction(self) -> np.ndarray:
        """(D, H, W) fraction of each voxel inside the brain (CSF + GM + WM)."""
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


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed))


def _as3(v: float | Sequence[float], name: str) -> tuple[float, float, float]:
    t = (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(t) != 3 or min(t) <= 0:
        raise ValueError(f"{name} must be one positive number or three, got {v!r}")
    return t  # type: ignore[return-value]


def _smooth_field(
    rng: np.random.Generator, shape: Sequence[int], control: int, channels: int
) -> torch.Tensor:
    """(channels, D, H, W) smooth random field: N(0, 1) on a control^3 grid, trilinear upsampling."""
    coarse = rng.standard_normal((1, channels, control, control, control)).astype(np.float32)
    coarse = torch.from_numpy(coarse)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _template_coords(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    deform_mm: float,
    rotate_deg: float,
    scale: float,
    shift_mm: float,
) -> tuple[torch.Tensor, np.ndarray]:
    """Subject-to-template map: (D, H, W, 3) template-space mm coordinates of every output voxel.

    The output grid is centred on the template origin; returns the coordinates and the output affine.
    """
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing, strict=True)]
    idx = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*idx, indexing="ij"), -1)  # (D, H, W, 3) voxel indices
    origin = torch.tensor(affine[:3, 3], dtype=torch.float32)
    world = grid * torch.tensor(spacing, dtype=torch.float32) + origin
    rot = _rotation(np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, 3)))
    scl = np.diag(rng.uniform(1.0 - scale, 1.0 + scale, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    m = torch.from_numpy((rot @ scl).astype(np.float32))
    coords = world @ m.T + torch.from_numpy(shift.astype(np.float32))
    if deform_mm > 0:
        disp = _smooth_field(rng, shape, control=5, channels=3) * (deform_mm / 2.0)
        coords = coords + disp.permute(1, 2, 3, 0)
    return coords, affine


@functools.lru_cache(maxsize=4)
def _mni_maps(pool: int) -> tuple[torch.Tensor, np.ndarray]:
    """(1, 3, D, H, W) CSF/GM/WM fractions of the MNI152 2009 template, average-pooled by ``pool``."""
    try:
        from nilearn import datasets
    except ImportError as e:
        raise ImportError(
            'the "mni" demo source needs nilearn (it ships the MNI152 template): pip install "s3d[demo]"; '
            'or use source="phantom", which needs nothing extra'
        ) from e
    import nibabel as nib

    t1_img = nib.load(datasets.MNI152_FILE_PATH)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(datasets.GM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(datasets.WM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    brain = (t1 > 0).astype(np.float32)
    gm, wm = gm * brain, wm * brain
    total = np.maximum(gm + wm, 1.0)  # the maps sum slightly above 1 at a few voxels
    gm, wm = gm / total, wm / total
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    maps = torch.from_numpy(np.stack([csf, gm, wm]))[None]
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    if pool > 1:
        maps = F.avg_pool3d(maps, kernel_size=pool, stride=pool)
        step = np.diag([pool, pool, pool, 1.0])
        step[:3, 3] = (pool - 1) / 2.0
        affine = affine @ step
    return maps.contiguous(), affine


# brain centre of the template in world mm (centre of the brain mask's bounding box)
_MNI_CENTER_MM = np.array([0.0, -17.0, 5.0])


def _sample_mni(coords: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    pool = max(1, int(round(min(spacing))))
    maps, affine = _mni_maps(pool)
    inv = torch.from_numpy(np.linalg.inv(affine).astype(np.float32))
    world = coords + torch.from_numpy(_MNI_CENTER_MM.astype(np.float32))
    vox = world @ inv[:3, :3].T + inv[:3, 3]  # (D, H, W, 3) template voxel indices (i, j, k)
    sizes = torch.tensor(maps.shape[2:], dtype=torch.float32)
    norm = 2.0 * vox / (sizes - 1) - 1.0
    grid = norm.flip(-1)[None]  # grid_sample wants (x, y, z) = (k, j, i)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0]


def _sample_phantom(
    coords: torch.Tensor, spacing: tuple[float, float, float], rng: np.random.Generator
) -> torch.Tensor:
    """(3, D, H, W) CSF/GM/WM fractions of the procedural head at template coordinates (mm)."""
    width = 0.5 * float(np.mean(spacing))  # edge softness ~ half a voxel -> partial volumes

    def soft(signed_mm: torch.Tensor) -> torch.Tensor:  # 1 inside (positive), 0 outside
        return torch.sigmoid(signed_mm / width)

    x, y, z = coords.unbind(-1)
    radii = torch.tensor([66.0, 84.0, 60.0]) * torch.from_numpy(rng.uniform(0.95, 1.05, 3).astype(np.float32))
    rho = torch.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + ((z + 8.0) / radii[2]) ** 2)
    depth = (1.0 - rho) * float(radii.mean())  # approx. mm below the brain surface
    # folding: f in [-1, 1] from two sets of random plane waves (period ~18-30 mm); sulci where f is high
    f = torch.zeros_like(x)
    for _ in range(2):
        phase = torch.from_numpy(rng.uniform(0, 2 * math.pi, 3).astype(np.float32))
        k = torch.from_numpy(rng.uniform(0.22, 0.34, 3).astype(np.float32))  # rad/mm
        for axis, coord in enumerate((x, y, z)):
            f = f + torch.sin(k[axis] * coord + phase[axis])
    f = torch.clamp(f / 1.7, -1.0, 1.0)  # the sum of six unit sines has std ~1.7
    csf_t = 1.2 + 12.0 * torch.relu(f - 0.2)  # outer CSF, reaching deep into sulci
    gm_t = 3.0 + 4.0 * (f + 1.0)  # cortical ribbon under it, mm; thin under gyral crowns (low f)
    brain = soft(depth)
    inner = soft(depth - csf_t)
    wm_part = soft(depth - csf_t - gm_t)
    csf = brain * (1.0 - inner)
    gm = brain * inner * (1.0 - wm_part)
    wm = brain * inner * wm_part
    fissure = soft(1.5 - x.abs()) * soft(z - 20.0)  # interhemispheric fissure (CSF) above the ventricles
    csf, gm, wm = csf + (gm + wm) * fissure, gm * (1.0 - fissure), wm * (1.0 - fissure)

    def ellipsoid(center: Sequence[float], r: Sequence[float]) -> torch.Tensor:
        d = torch.sqrt(sum(((c - c0) / r0) ** 2 for c, c0, r0 in zip((x, y, z), center, r, strict=True)))
        return soft((1.0 - d) * float(min(r)))

    vsize = float(rng.uniform(0.8, 1.4))  # ventricle size varies across subjects
    for sx in (-1.0, 1.0):
        nuc = ellipsoid((sx * 13.0, -6.0, 0.0), (8.0, 11.0, 8.0))  # thalamus / basal ganglia (GM)
        gm, wm = gm + wm * nuc, wm * (1.0 - nuc)
        ven = ellipsoid((sx * 7.0, 2.0, 10.0), (4.0 * vsize, 20.0, 7.0 * vsize))  # lateral ventricle (CSF)
        csf, gm, wm = csf + (gm + wm) * ven, gm * (1.0 - ven), wm * (1.0 - ven)
    return torch.stack([csf, gm, wm])


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


def make_subject(
    seed: int | Sequence[int],
    source: str = "phantom",
    shape: Sequence[int] = (80, 96, 80),
    spacing_mm: float | Sequence[float] = 2.0,
    deform_mm: float = 4.0,
    rotate_deg: float = 8.0,
    scale: float = 0.08,
    shift_mm: float = 3.0,
    lesions: int | tuple[int, int] = 0,
) -> DemoSubject:
    """Draw one subject's anatomy on a grid of ``shape`` voxels of ``spacing_mm``.

    Args:
        seed: integer or sequence of integers seeding everything about this subject.
        source: "phantom" (procedural, no extra dependency) or "mni" (MNI152 template via nilearn).
        shape: output grid (D, H, W), voxels; (80, 96, 80) at 2 mm covers a whole brain.
        spacing_mm: voxel size, one value or three (anisotropic grids are allowed).
        deform_mm: typical amplitude of the smooth random deformation, mm.
        rotate_deg: maximum rotation about each axis, degrees.
        scale: maximum relative scaling along each axis.
        shift_mm: maximum shift along each axis, mm.
        lesions: number of lesions, or a (low, high) range drawn per subject (inclusive).

    Returns:
        A :class:`DemoSubject` with partial-volume maps, lesion fraction and affine.

    Example:
        >>> subj = make_subject(0, "phantom", shape=(48, 48, 48), spacing_mm=3.5, lesions=(2, 5))
        >>> subj.tissue_labels().shape
        (48, 48, 48)
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 4:
        raise ValueError(f"shape must be three sizes >= 4 voxels, got {shape!r}")
    spacing = _as3(spacing_mm, "spacing_mm")
    rng = _rng(seed)
    coords, affine = _template_coords(rng, shape_t, spacing, deform_mm, rotate_deg, scale, shift_mm)  # type: ignore[arg-type]
    if source == "mni":
        pv = _sample_mni(coords, spacing)
    else:
        pv = _sample_phantom(coords, spacing, rng)
    tissue = pv.numpy().astype(np.float32)
    n_les = int(rng.integers(lesions[0], lesions[1] + 1)) if isinstance(lesions, tuple) else int(lesions)
    lesion = _add_lesions(rng, tissue, spacing, n_les)
    return DemoSubject(tissue, lesion, affine, seed=tuple(np.atleast_1d(seed).astype(int).tolist()),
                       info={"source": source, "lesions": n_les})
