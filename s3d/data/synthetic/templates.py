"""Template anatomy sampled at arbitrary coordinates: the MNI152 template (via nilearn) and a phantom.

Both sources answer the same two questions at template-space coordinates (mm, ``(..., 3)``):
:func:`tissue_at` gives the CSF/GM/WM fractions inside the brain, and :func:`outside_mm_at` gives how
far a point lies outside the brain surface (mm; negative inside), from which the intracranial CSF
rim, the skull and the scalp are built per subject, and how far it lies outside the lateral
ventricles, from which they are enlarged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# brain centre of the MNI template in world mm (centre of the brain mask's bounding box)
MNI_CENTER_MM = np.array([0.0, -17.0, 5.0])
#: Size of each template relative to a typical adult head (the MNI152 average is ~8 % larger):
#: subjects are drawn at ``AnatomyRanges.head_scale`` times this.
TEMPLATE_SIZE = {"mni": 0.92, "phantom": 1.0}


def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The template at 1 mm: brain mask, GM and WM fractions (within the mask), affine."""
    from s3d._optional import optional_import

    nib = optional_import("nibabel", "reading the MNI152 template")  # nilearn needs it too: name it first
    try:
        from nilearn import datasets
    except ImportError as e:
        raise ImportError(
            'the "mni" demo source needs nilearn (it ships the MNI152 template): pip install "s3d[demo]"; '
            'or use source="phantom", which needs nothing extra'
        ) from e
    t1_img = nib.load(datasets.MNI152_FILE_PATH)
    mask = np.asarray(t1_img.dataobj, dtype=np.float32) > 0
    gm = np.asarray(nib.load(datasets.GM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(datasets.WM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    gm, wm = gm * mask, wm * mask
    total = np.maximum(gm + wm, 1.0)  # the maps sum slightly above 1 at a few voxels
    return mask, gm / total, wm / total, np.asarray(t1_img.affine, dtype=np.float64)


def _pooled(maps: torch.Tensor, affine: np.ndarray, pool: int) -> tuple[torch.Tensor, np.ndarray]:
    if pool <= 1:
        return maps.contiguous(), affine
    step = np.diag([pool, pool, pool, 1.0])
    step[:3, 3] = (pool - 1) / 2.0
    return F.avg_pool3d(maps, kernel_size=pool, stride=pool).contiguous(), affine @ step


@functools.lru_cache(maxsize=4)
def _mni_maps(pool: int) -> tuple[torch.Tensor, np.ndarray]:
    """(1, 3, D, H, W) CSF/GM/WM fractions of MNI152 2009 (CSF = brain mask - GM - WM), average-pooled."""
    mask, gm, wm, affine = _load_mni()
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return _pooled(torch.from_numpy(np.stack([csf, gm, wm]))[None], affine, pool)


@functools.lru_cache(maxsize=1)
def _mni_distances() -> tuple[torch.Tensor, np.ndarray]:
    """(1, 2, D, H, W) on a 2 mm grid: signed distance to the brain surface and to the lateral ventricles, mm.

    Positive outside, negative inside. The ventricles are the template's CSF (fraction > 0.5) deeper
    than 15 mm below the brain surface.
    """
    from scipy import ndimage

    mask, gm, wm, affine = _load_mni()
    stack = torch.from_numpy(np.stack([mask.astype(np.float32), np.clip(mask - gm - wm, 0.0, 1.0)]))[None]
    pooled, a2 = _pooled(stack, affine, 2)
    mm = float(np.linalg.norm(a2[:3, 0]))

    def signed(inside: np.ndarray) -> np.ndarray:
        return ((ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)) * mm)

    brain = signed(pooled[0, 0].numpy() > 0.5)
    ventricles = signed((pooled[0, 1].numpy() > 0.5) & (brain < -15.0))
    return torch.from_numpy(np.stack([brain, ventricles]).astype(np.float32))[None], a2


def _sample(maps: torch.Tensor, affine: np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    inv = torch.from_numpy(np.linalg.inv(affine).astype(np.float32))
    world = coords + torch.from_numpy(MNI_CENTER_MM.astype(np.float32))
    vox = world @ inv[:3, :3].T + inv[:3, 3]  # (D, H, W, 3) template voxel indices (i, j, k)
    sizes = torch.tensor(maps.shape[2:], dtype=torch.float32)
    grid = (2.0 * vox / (sizes - 1) - 1.0).flip(-1)[None]  # grid_sample wants (x, y, z) = (k, j, i)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _phantom(coords: torch.Tensor, spacing: Sequence[float], rng: np.random.Generator) -> torch.Tensor:
    """(5, D, H, W): CSF/GM/WM fractions, distance outside the brain and outside the ventricles (mm)."""
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

    def outside(center: Sequence[float], r: Sequence[float]) -> torch.Tensor:  # approx. mm outside an ellipsoid
        d = torch.sqrt(sum(((c - c0) / r0) ** 2 for c, c0, r0 in zip((x, y, z), center, r, strict=True)))
        return (d - 1.0) * float(min(r))

    ventricles = torch.full_like(x, 1e3)
    for cx in (-7.0, 7.0):
        nuc = soft(-outside((np.sign(cx) * 13.0, -6.0, 0.0), (8.0, 11.0, 8.0)))  # thalamus / basal ganglia (GM)
        gm, wm = gm + wm * nuc, wm * (1.0 - nuc)
        v_out = outside((cx, 2.0, 10.0), (4.0, 20.0, 7.0))  # lateral ventricle (CSF)
        ven = soft(-v_out)
        csf, gm, wm = csf + (gm + wm) * ven, gm * (1.0 - ven), wm * (1.0 - ven)
        ventricles = torch.minimum(ventricles, v_out)
    return torch.stack([csf, gm, wm, -depth, ventricles])


def tissue_at(source: str, coords: torch.Tensor, spacing: Sequence[float], rng: np.random.Generator) -> torch.Tensor:
    """(3, D, H, W) CSF/GM/WM fractions of the brain at template coordinates ``coords`` (D, H, W, 3) mm.

    ``rng`` draws the phantom's own variation (brain radii, folding); the MNI template ignores it.

    Example:
        >>> coords = torch.zeros(4, 4, 4, 3)
        >>> tissue_at("phantom", coords, (4.0,) * 3, np.random.default_rng(0)).shape
        torch.Size([3, 4, 4, 4])
    """
    if source == "mni":
        return _sample(*_mni_maps(max(1, int(round(min(spacing))))), coords)
    return _phantom(coords, spacing, rng)[:3]


def outside_mm_at(source: str, coords: torch.Tensor, spacing: Sequence[float],
                  rng: np.random.Generator) -> torch.Tensor:
    """(2, D, H, W) distance outside the brain surface and outside the lateral ventricles (mm; < 0 inside).

    Example:
        >>> outside_mm_at("phantom", torch.zeros(2, 2, 2, 3), (4.0,) * 3, np.random.default_rng(0)).shape
        torch.Size([2, 2, 2, 2])
    """
    if source == "mni":
        return _sample(*_mni_distances(), coords)
    return _phantom(coords, spacing, rng)[3:]
