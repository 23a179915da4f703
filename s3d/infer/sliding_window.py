"""Sliding-window prediction on tensors with Gaussian importance weighting.

:func:`sliding_window_predict` works on any ``model(x) -> logits`` (an ``nn.Module`` or a function)
over an image (C, D, H, W) or (B, C, D, H, W) larger or smaller than the patch. Tiles overlap by
``1 - step`` of the patch, are weighted by a Gaussian (sigma = patch / 8, as nnU-Net) and are run
``tile_batch`` at a time; logits are accumulated in fp32 on the compute device, or, from the moment the
device runs out of memory, on the CPU (the tiles keep running on the device).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from s3d._triple import to_3tuple
from s3d.runtime.device import autocast, resolve_amp
from s3d.runtime.progress import progress as progress_bar

Model = Callable[[torch.Tensor], Any]

# ---------------------------------------------------------------------------------------------------
# Gaussian importance map and tile positions
# ---------------------------------------------------------------------------------------------------


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable Gaussian weights over a patch, 1 at the centre and > 0 everywhere.

    ``w[z, y, x] = exp(-sum_a (i_a - c_a)^2 / (2 sigma_a^2))`` with centre ``c_a = (n_a - 1) / 2``
    (so the map is exactly mirror-symmetric) and ``sigma_a = sigma_scale * n_a`` voxels. Values that
    underflow to 0 (only for very small ``sigma_scale``) are raised to the smallest positive value, so
    every voxel of a tile keeps a nonzero weight.

    Args:
        patch_size: (D, H, W) in voxels.
        sigma_scale: sigma as a fraction of the patch size (nnU-Net: 1/8).

    Returns:
        Tensor (D, H, W).

    Example:
        >>> w = gaussian_importance_map((32, 32, 32))
        >>> w.shape, float(w.max())
        (torch.Size([32, 32, 32]), 1.0)
    """
    patch_size = to_3tuple(patch_size, "patch_size")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    w = torch.ones((), dtype=torch.float64)
    for n in patch_size:
        i = torch.arange(n, dtype=torch.float64)
        g = torch.exp(-((i - (n - 1) / 2) ** 2) / (2 * (sigma_scale * n) ** 2))
        w = w.unsqueeze(-1) * g
    w = (w / w.max()).to(dtype)
    if (w <= 0).any():
        w = w.clamp_min(torch.finfo(dtype).tiny if not w[w > 0].numel() else float(w[w > 0].min()))
    return w.to(device)


def tile_starts(image_size: int, patch_size: int, step: float) -> list[int]:
    """Start offsets (voxels) of tiles of ``patch_size`` covering ``image_size`` along one axis.

    The number of tiles is the smallest that keeps the distance between starts at most
    ``step * patch_size``; tiles are spread evenly from 0 to ``image_size - patch_size`` and placed
    mirror-symmetrically (``start[i] + start[-1 - i] == image_size - patch_size``).

    Example:
        >>> tile_starts(48, 32, 0.5)
        [0, 16]
    """
    if image_size < patch_size:
        raise ValueError(f"image size {image_size} is smaller than the patch {patch_size}; pad it first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1] (a fraction of the patch), got {step}")
    n = math.ceil((image_size - patch_size) / (step * patch_size)) + 1
    if n == 1:
        return [0]
    spacing = (image_size - patch_size) / (n - 1)
    first = [int(round(spacing * i)) for i in range((n + 1) // 2)]
    return first + [image_size - patch_size - s for s in reversed(first[: n // 2])]


def mirror_axes_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axes 0..2), the empty one (no flip) first.

    Example:
        >>> mirror_axes_combinations((0, 1))
        [(), (0,), (1,), (0, 1)]
    """
    axes = tuple(sorted(set(int(a) for a in axes)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be spatial axes 0, 1, 2 (D, H, W), got {axes}")
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]


# ---------------------------------------------------------------------------------------------------
# Sliding window on tensors
# ---------------------------------------------------------------------------------------------------


def sliding_window_predict(
    model: Model,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    step: float = 0.5,
    mirror: bool | Sequence[int] = False,
    tile_batch: int = 4,
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str = "auto",
    accumulate_limit_bytes: int | None = None,
    amp: str | torch.dtype | None = "off",
    sigma_scale: float = 1.0 / 8,
    gaussian: bool = True,
    output: Literal["logits", "probabilities"] = "logits",
    progress: bool = False,
) -> torch.Tensor:
    """Predict a whole image with overlapping tiles, each weighted by a Gaussian.

    The image is zero-padded (symmetrically) where it is smaller than the patch and the padding
    is removed from the result. Tiles start every ``step * patch_size`` voxels (at most; see
    :func:`tile_starts`), are run ``tile_batch`` at a time under ``torch.inference_mode`` and the
    weighted logits are accumulated in fp32. With ``mirror``, each tile is also predicted flipped
    along every subset of the mirror axes and the logits (flipped back) are averaged.

    Args:
        model: maps (N, C, d, h, w) to logits (N, K, d, h, w) (a list, as from deep supervision,
            counts by its first, full-resolution entry). Set ``model.eval()`` yourself.
        image: (C, D, H, W) or (B, C, D, H, W), any float dtype, on any device.
        patch_size: tile size (d, h, w) in voxels; must be a size the model accepts.
        step: distance between tile starts as a fraction of the patch (0.5 = 50% overlap).
        mirror: ``True`` for all three spatial axes, or a sequence of spatial axes (0=D, 1=H, 2=W).
            Off by default here; :func:`s3d.infer.predict_folder` and ``s3d predict`` mirror by default.
        tile_batch: tiles per forward pass.
        device: where the model runs; default: the device of the model's first parameter (CPU for a
            plain function).
        accumulate_device: where the fp32 sums live. ``"auto"``: on ``device`` while it has room; when
            it runs out of memory (``torch.OutOfMemoryError``) or the sums would exceed
            ``accumulate_limit_bytes``, the sums move to the CPU with a ``RuntimeWarning`` and the tiles
            keep running on ``device``, from the tile group that failed (finished tiles are kept).
            A device name: always there.
        accumulate_limit_bytes: with ``"auto"``, the most bytes of sums (``(B * K + 1) * D * H * W * 4``)
            to keep on ``device``; ``None``: as many as fit.
        amp: ``"off"`` (full fp32), ``"auto"``, ``"bf16"`` or ``"fp16"`` (:mod:`s3d.runtime.device`),
            or a torch dtype: the model runs under that autocast.
        sigma_scale: Gaussian sigma as a fraction of the patch; ``gaussian=False`` weights uniformly.
        output: ``"logits"`` (weighted mean of logits) or ``"probabilities"`` (softmax over K of it).
        progress: show a tqdm bar over tiles.

    Returns:
        fp32 tensor (K, D, H, W) (or (B, K, D, H, W) for a batched image) on the accumulation device.

    Raises:
        ValueError: the image is not 4D/5D, is 1 voxel thick along an axis, or an argument is invalid.
        torch.OutOfMemoryError: the model itself does not fit on ``device`` (try a smaller
            ``tile_batch``), also after the sums moved to the CPU.

    Example:
        >>> net = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=2).eval()
        >>> logits = sliding_window_predict(net, torch.randn(1, 70, 50, 40), (32, 32, 32))
        >>> logits.shape
        torch.Size([2, 70, 50, 40])
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected (C, D, H, W) or (B, C, D, H, W), got {shape}")
    batched = image.dim() == 5
    images = image if batched else image.unsqueeze(0)
    if not images.is_floating_point():
        images = images.float()
    spatial = tuple(int(n) for n in images.shape[2:])
    thin = [a for a, n in enumerate(spatial) if n < 2]
    if thin:
        raise ValueError(
            f"image of spatial shape {spatial} is {spatial[thin[0]]} voxel thick along axis {thin[0]} "
            "(D, H, W): a 2D slice, not a 3D volume; 3D sliding-window prediction needs at least 2 "
            "voxels along every axis")
    patch = to_3tuple(patch_size, "patch_size")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    if output not in ("logits", "probabilities"):
        raise ValueError(f"output must be 'logits' or 'probabilities', got {output!r}")
    if accumulate_limit_bytes is not None and accumulate_limit_bytes < 0:
        raise ValueError(f"accumulate_limit_bytes must be >= 0 or None, got {accumulate_limit_bytes}")
    if mirror is True:
        mirror_axes: Sequence[int] = (0, 1, 2)
    elif mirror is False or mirror is None:
        mirror_axes = ()
    else:
        mirror_axes = tuple(mirror)
    flips = mirror_axes_combinations(mirror_axes)
    device = _model_device(model) if device is None else torch.device(device)
    autocast_dtype = resolve_amp(amp, device)

    # pad to at least one patch, symmetrically
    pad_lo = [max(0, p - n) // 2 for n, p in zip(spatial, patch, strict=True)]
    pad_hi = [max(0, p - n) - lo for n, p, lo in zip(spatial, patch, pad_lo, strict=True)]
    if any(pad_lo) or any(pad_hi):
        pad = [v for a in (2, 1, 0) for v in (pad_lo[a], pad_hi[a])]  # F.pad wants W first
        images = F.pad(images, pad, mode="constant", value=0.0)
    padded = tuple(int(n) for n in images.shape[2:])
    starts = list(itertools.product(*(tile_starts(n, p, step) for n, p in zip(padded, patch, strict=True))))
    weight = (gaussian_importance_map(patch, sigma_scale, device=device) if gaussian
              else torch.ones(patch, device=device))

    auto = isinstance(accumulate_device, str) and accumulate_device == "auto"
    sums = _Sums(device if auto else torch.device(accumulate_device), movable=auto, limit_bytes=accumulate_limit_bytes)
    groups = [starts[i: i + tile_batch] for i in range(0, len(starts), tile_batch)]
    bar = progress_bar(desc="tiles", unit="tile", total=len(starts) * images.shape[0], enabled=progress, leave=False)
    with torch.inference_mode(), bar:
        for b in range(images.shape[0]):
            sums.retry("allocating the sums", sums.start_image, padded)
            for gi, group in enumerate(groups):
                where = f"tile group {gi + 1} of {len(groups)}"
                slices = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in group]
                x = sums.retry(where, _gather, images[b], slices, device)
                tiles = sums.retry(where, _weighted_logits, model, x, flips, weight, patch, device, autocast_dtype)
                sums.retry(where, sums.allocate, images.shape[0], tiles.shape[1], padded)
                sums.retry(where, sums.add, b, tiles, slices, weight, [0])
                bar.update(len(group))
            sums.retry("dividing the sums", sums.finish_image, b)
        crop = tuple(slice(lo, lo + n) for lo, n in zip(pad_lo, spatial, strict=True))
        out = sums.retry("cropping the result", sums.result, crop if padded != spatial else None,
                         output == "probabilities")
    return out if batched else out[0]


def _gather(image: torch.Tensor, slices: list[tuple[slice, ...]], device: torch.device) -> torch.Tensor:
    """Tiles (N, C, d, h, w) of a (C, D, H, W) image, on ``device``."""
    return torch.stack([image[(slice(None), *sl)] for sl in slices]).to(device, non_blocking=True)


def _weighted_logits(model: Model, x: torch.Tensor, flips: list[tuple[int, ...]], weight: torch.Tensor,
                     patch: tuple[int, int, int], device: torch.device,
                     autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Gaussian-weighted fp32 logits (N, K, d, h, w) of tiles ``x``, averaged over the mirror flips."""
    logits = None
    for axes in flips:
        dims = [a + 2 for a in axes]
        xi = torch.flip(x, dims) if dims else x
        with autocast(device, autocast_dtype):
            y = model(xi)
        if isinstance(y, (list, tuple)):  # deep supervision: full resolution first
            y = y[0]
        y = y.float()
        if dims:
            y = torch.flip(y, dims)
        logits = y if logits is None else logits + y
    assert logits is not None
    if len(flips) > 1:
        logits = logits / len(flips)
    if logits.shape[2:] != patch:
        raise ValueError(f"model returned logits of spatial shape {tuple(logits.shape[2:])} for "
                         f"tiles of {patch}; expected the same spatial shape")
    return logits * weight


class _Sums:
    """The fp32 sums of one sliding-window call: ``logits`` (B, K, D, H, W), ``weights`` (D, H, W).

    They start on ``device``; when ``movable``, an out-of-memory error there (or sums that would
    exceed ``limit_bytes``) moves them to the CPU once and the failed step runs again (:meth:`retry`).
    """

    def __init__(self, device: torch.device, movable: bool, limit_bytes: int | None) -> None:
        self.device = device
        self.movable = movable
        self.limit_bytes = limit_bytes
        self.logits: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self._tile_weight: torch.Tensor | None = None  # the Gaussian on self.device

    def retry(self, where: str, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``; if the device runs out of memory and the sums can still move, move them, run it again."""
        try:
            return step(*args)
        except torch.OutOfMemoryError as e:
            if not self.movable:
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        # outside the handler, so the traceback no longer holds device tensors
        self.to_host(f"{reason} ({where})")
        return step(*args)

    def to_host(self, reason: str) -> None:
        old = self.device
        self.movable = False
        self.device = torch.device("cpu")
        self.logits = None if self.logits is None else self.logits.cpu()
        self.weights = None if self.weights is None else self.weights.cpu()
        self._tile_weight = None
        if old.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(f"{reason} on {old}: accumulating the sliding-window sums on the CPU from here on "
                      "(tiles still run on the device; slower)", RuntimeWarning, stacklevel=4)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.movable and self.limit_bytes is not None:
            held = sum(t.numel() * 4 for t in (self.logits, self.weights) if t is not None)
            need = math.prod(shape) * 4
            if held + need > self.limit_bytes:
                raise torch.OutOfMemoryError(f"{held + need} bytes of sums exceed accumulate_limit_bytes="
                                             f"{self.limit_bytes}")
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def start_image(self, spatial: tuple[int, int, int]) -> None:
        if self.weights is None:
            self.weights = self._zeros(spatial)
        else:
            self.weights.zero_()

    def allocate(self, batch: int, classes: int, spatial: tuple[int, int, int]) -> None:
        if self.logits is None:  # K is known after the first forward pass
            self.logits = self._zeros((batch, classes, *spatial))

    def add(self, b: int, tiles: torch.Tensor, slices: list[tuple[slice, ...]], weight: torch.Tensor,
            done: list[int]) -> None:
        """Add the weighted ``tiles`` of image ``b``; ``done[0]`` counts the tiles added (a retry goes on)."""
        assert self.logits is not None and self.weights is not None
        if self._tile_weight is None:
            self._tile_weight = weight.to(self.device, torch.float32)
        tiles = tiles.to(self.device)
        while done[0] < len(slices):  # in-place adds allocate nothing on the device
            sl = slices[done[0]]
            self.logits[(b, slice(None), *sl)] += tiles[done[0]]
            self.weights[sl] += self._tile_weight
            done[0] += 1

    def finish_image(self, b: int) -> None:
        assert self.logits is not None and self.weights is not None
        self.logits[b] /= self.weights

    def result(self, crop: tuple[slice, ...] | None, softmax: bool) -> torch.Tensor:
        assert self.logits is not None
        out = self.logits if crop is None else self.logits[(slice(None), slice(None), *crop)].contiguous()
        return torch.softmax(out, dim=1) if softmax else out


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")
