"""Sliding-window prediction on tensors: one object that holds how a volume is predicted tile by tile, and does it.

:class:`SlidingWindowInferer` (MONAI's ``SlidingWindowInferer`` is the model) holds the patch, the step
between tiles, the Gaussian weighting, mirroring, the tiles per forward pass, the device, AMP and where
the sums accumulate; ``inferer(image, model)`` predicts. :func:`~s3d.infer.predict_folder`,
:func:`~s3d.infer.predict_case` and fine-tuning's validation (:mod:`s3d.finetune.validation`) all run one,
and :func:`sliding_window_predict` is the same thing as a function. The tile geometry (Gaussian
importance map, tile positions, mirror flips) is :mod:`s3d.infer.tiles`.

Tiles overlap by ``1 - step`` of the patch, are weighted by a Gaussian (sigma = patch / 8, as nnU-Net)
and run ``tile_batch`` at a time; logits are accumulated in fp32 on the compute device or, from the
moment the device runs out of memory, on the CPU (the tiles keep running on the device).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from s3d._triple import to_3tuple
from s3d.infer.tiles import gaussian_importance_map, mirror_axes_combinations, tile_starts
from s3d.runtime.device import autocast, resolve_amp
from s3d.runtime.progress import progress as progress_bar

Model = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class SlidingWindowInferer:
    """How to predict a volume with overlapping tiles, and ``inferer(image, model)`` to do it.

    Args:
        patch_size: tile size (d, h, w) in voxels (an int for a cube); must be a size the model accepts.
        step: distance between tile starts as a fraction of the patch (0.5 = 50% overlap; 1 = no overlap).
        mirror: ``True`` for all three spatial axes, ``False``, or a sequence of spatial axes (0=D, 1=H,
            2=W): each tile is also predicted flipped along every subset of them and the logits (flipped
            back) are averaged.
        tile_batch: tiles per forward pass.
        device: where the model runs; ``None``: the device of the model's first parameter (CPU for a plain
            function).
        accumulate_device: where the fp32 sums live. ``"auto"``: on ``device`` while it has room; when it
            runs out of memory (``torch.OutOfMemoryError``) or the sums would exceed
            ``accumulate_limit_bytes``, the sums move to the CPU with a ``RuntimeWarning`` and the tiles keep
            running on ``device``, from the tile group that failed (finished tiles are kept). A device
            name: always there.
        accumulate_limit_bytes: with ``"auto"``, the most bytes of sums (``(B * K + 1) * D * H * W * 4``) to
            keep on ``device``; ``None``: as many as fit.
        amp: ``"off"`` (full fp32), ``"auto"``, ``"bf16"`` or ``"fp16"`` (:mod:`s3d.runtime.device`), a torch
            dtype, or ``None`` (fp32): the model runs under that autocast.
        sigma_scale: Gaussian sigma as a fraction of the patch.
        gaussian: weight each tile by the Gaussian (``False``: uniformly).
        output: ``"logits"`` (weighted mean of logits) or ``"probabilities"`` (softmax over K of it).
        padding: ``"centre"``: an image smaller than the patch is padded symmetrically to one patch;
            ``"tiles"``: every axis is padded at its end to a whole number of patches (with ``step=1`` the
            tiles then never overlap). The padding is removed from the result.
        progress: show a tqdm bar over tiles.

    Raises:
        ValueError: an argument out of range (named).

    Example:
        >>> from s3d import build_resenc_unet
        >>> net = build_resenc_unet("tiny", in_channels=1, num_classes=2).eval()
        >>> inferer = SlidingWindowInferer((32, 32, 32), step=0.5, mirror=False, tile_batch=2)
        >>> inferer(torch.randn(1, 70, 50, 40), net).shape
        torch.Size([2, 70, 50, 40])
    """

    patch_size: tuple[int, int, int]
    step: float = 0.5
    mirror: bool | Sequence[int] = False
    tile_batch: int = 4
    device: torch.device | str | None = None
    accumulate_device: torch.device | str = "auto"
    accumulate_limit_bytes: int | None = None
    amp: str | torch.dtype | None = "off"
    sigma_scale: float = 1.0 / 8
    gaussian: bool = True
    output: Literal["logits", "probabilities"] = "logits"
    padding: Literal["centre", "tiles"] = "centre"
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", to_3tuple(self.patch_size, "patch_size"))
        if not isinstance(self.mirror, bool) and self.mirror is not None:
            object.__setattr__(self, "mirror", tuple(int(a) for a in self.mirror))
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1] (a fraction of the patch), got {self.step}")
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {self.tile_batch}")
        if self.output not in ("logits", "probabilities"):
            raise ValueError(f"output must be 'logits' or 'probabilities', got {self.output!r}")
        if self.padding not in ("centre", "tiles"):
            raise ValueError(f"padding must be 'centre' or 'tiles', got {self.padding!r}")
        if self.accumulate_limit_bytes is not None and self.accumulate_limit_bytes < 0:
            raise ValueError(f"accumulate_limit_bytes must be >= 0 or None, got {self.accumulate_limit_bytes}")
        if not self.sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")
        self.flips()  # the mirror axes are valid

    def flips(self) -> list[tuple[int, ...]]:
        """The flips each tile is predicted with (``[()]`` without mirroring)."""
        if self.mirror is True:
            return mirror_axes_combinations((0, 1, 2))
        if self.mirror is False or self.mirror is None:
            return mirror_axes_combinations(())
        return mirror_axes_combinations(tuple(self.mirror))

    def __call__(self, image: torch.Tensor, model: Model) -> torch.Tensor:
        """Predict ``image`` (C, D, H, W) or (B, C, D, H, W), any float dtype, on any device, with ``model``.

        ``model`` maps (N, C, d, h, w) to logits (N, K, d, h, w) (a list, as from deep supervision, counts by
        its first, full-resolution entry); set ``model.eval()`` yourself. Tiles run under
        ``torch.inference_mode``.

        Returns:
            fp32 tensor (K, D, H, W) (or (B, K, D, H, W) for a batched image) on the accumulation device.

        Raises:
            ValueError: the image is not 4D/5D or is 1 voxel thick along an axis.
            torch.OutOfMemoryError: the model itself does not fit on ``device`` (try a smaller ``tile_batch``),
                also after the sums moved to the CPU.
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
        patch, flips = self.patch_size, self.flips()
        device = _model_device(model) if self.device is None else torch.device(self.device)
        autocast_dtype = resolve_amp(self.amp, device)

        if self.padding == "centre":  # pad to at least one patch, symmetrically
            pad_lo = [max(0, p - n) // 2 for n, p in zip(spatial, patch, strict=True)]
            pad_hi = [max(0, p - n) - lo for n, p, lo in zip(spatial, patch, pad_lo, strict=True)]
        else:  # at the end of every axis, to whole tiles
            pad_lo = [0, 0, 0]
            pad_hi = [max(p, math.ceil(n / p) * p) - n for n, p in zip(spatial, patch, strict=True)]
        if any(pad_lo) or any(pad_hi):
            pad = [v for a in (2, 1, 0) for v in (pad_lo[a], pad_hi[a])]  # F.pad wants W first
            images = F.pad(images, pad, mode="constant", value=0.0)
        padded = tuple(int(n) for n in images.shape[2:])
        starts = list(itertools.product(*(tile_starts(n, p, self.step) for n, p in zip(padded, patch, strict=True))))
        weight = (gaussian_importance_map(patch, self.sigma_scale, device=device) if self.gaussian
                  else torch.ones(patch, device=device))

        auto = isinstance(self.accumulate_device, str) and self.accumulate_device == "auto"
        sums = TileAccumulator(device if auto else torch.device(self.accumulate_device), movable=auto,
                               limit_bytes=self.accumulate_limit_bytes)
        groups = [starts[i: i + self.tile_batch] for i in range(0, len(starts), self.tile_batch)]
        bar = progress_bar(desc="tiles", unit="tile", total=len(starts) * images.shape[0], enabled=self.progress,
                           leave=False)
        with torch.inference_mode(), bar:
            for b in range(images.shape[0]):
                sums.retry("allocating the sums", sums.start_image, padded)
                for gi, group in enumerate(groups):
                    where = f"tile group {gi + 1} of {len(groups)}"
                    slices = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in group]
                    x = sums.retry(where, _gather, images[b], slices, device)
                    tiles = sums.retry(where, _weighted_logits, model, x, flips, weight, patch, device,
                                       autocast_dtype)
                    if sums.logits is None:  # the class count K is known after the first forward pass
                        sums.retry(where, sums.allocate, images.shape[0], tiles.shape[1], padded)
                    sums.begin_group()
                    sums.retry(where, sums.add, b, tiles, slices, weight)
                    bar.update(len(group))
                sums.retry("dividing the sums", sums.finish_image, b)
            crop = tuple(slice(lo, lo + n) for lo, n in zip(pad_lo, spatial, strict=True))
            out = sums.retry("cropping the result", sums.result, crop if padded != spatial else None,
                             self.output == "probabilities")
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


class TileAccumulator:
    """The fp32 sums of one inferer call: ``logits`` (B, K, D, H, W) and ``weights`` (D, H, W), allocated once.

    They start on ``device``; when ``movable``, an out-of-memory error there (or sums that would exceed
    ``limit_bytes``) moves them to the CPU once and the failed step runs again (:meth:`retry`). A tile group
    that failed half-way is resumed from its next tile (:attr:`added`), never added twice.
    """

    def __init__(self, device: torch.device, movable: bool, limit_bytes: int | None) -> None:
        self.device = device
        self.movable = movable
        self.limit_bytes = limit_bytes
        self.logits: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        #: tiles of the current group already added (a retried :meth:`add` continues after them)
        self.added = 0
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
        """Move the sums to the CPU (once) and say so with a ``RuntimeWarning``."""
        old = self.device
        self.movable = False
        self.device = torch.device("cpu")
        self.logits = None if self.logits is None else self.logits.cpu()
        self.weights = None if self.weights is None else self.weights.cpu()
        self._tile_weight = None
        if old.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(f"{reason} on {old}: accumulating the sliding-window sums on the CPU from here on "
                      "(tiles still run on the device; slower)", RuntimeWarning, stacklevel=5)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.movable and self.limit_bytes is not None:
            held = sum(t.numel() * 4 for t in (self.logits, self.weights) if t is not None)
            need = math.prod(shape) * 4
            if held + need > self.limit_bytes:
                raise torch.OutOfMemoryError(f"{held + need} bytes of sums exceed accumulate_limit_bytes="
                                             f"{self.limit_bytes}")
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def start_image(self, spatial: tuple[int, int, int]) -> None:
        """Zero the weights for the next image (allocated by the first image)."""
        if self.weights is None:
            self.weights = self._zeros(spatial)
        else:
            self.weights.zero_()

    def allocate(self, batch: int, classes: int, spatial: tuple[int, int, int]) -> None:
        """The logit sums (B, K, D, H, W), once, when the first forward pass has told K."""
        self.logits = self._zeros((batch, classes, *spatial))

    def begin_group(self) -> None:
        """A new tile group: nothing of it added yet."""
        self.added = 0

    def add(self, b: int, tiles: torch.Tensor, slices: list[tuple[slice, ...]], weight: torch.Tensor) -> None:
        """Add the weighted ``tiles`` of image ``b`` not added yet (a retry after a move goes on from there)."""
        assert self.logits is not None and self.weights is not None
        if self._tile_weight is None:
            self._tile_weight = weight.to(self.device, torch.float32)
        tiles = tiles.to(self.device)
        while self.added < len(slices):  # in-place adds allocate nothing on the device
            sl = slices[self.added]
            self.logits[(b, slice(None), *sl)] += tiles[self.added]
            self.weights[sl] += self._tile_weight
            self.added += 1

    def finish_image(self, b: int) -> None:
        """Divide image ``b``'s logit sums by its weight sums."""
        assert self.logits is not None and self.weights is not None
        self.logits[b] /= self.weights

    def result(self, crop: tuple[slice, ...] | None, softmax: bool) -> torch.Tensor:
        """The (cropped) weighted mean logits, or their softmax over K."""
        assert self.logits is not None
        out = self.logits if crop is None else self.logits[(slice(None), slice(None), *crop)].contiguous()
        return torch.softmax(out, dim=1) if softmax else out


def _model_device(model: Model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")


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
    """Predict a whole image with overlapping Gaussian-weighted tiles: ``SlidingWindowInferer(patch_size,
    **options)(image, model)``.

    The function form of :class:`SlidingWindowInferer`, whose docstring describes every option (``step``,
    ``mirror`` (off here; :func:`s3d.infer.predict_folder` and ``s3d predict`` mirror by default),
    ``tile_batch``, ``device``, ``accumulate_device``, ``accumulate_limit_bytes``, ``amp``, ``sigma_scale``,
    ``gaussian``, ``output``, ``progress``).

    Args:
        model: maps (N, C, d, h, w) to logits (N, K, d, h, w); set ``model.eval()`` yourself.
        image: (C, D, H, W) or (B, C, D, H, W), any float dtype, on any device.
        patch_size: tile size (d, h, w) in voxels; must be a size the model accepts.

    Returns:
        fp32 tensor (K, D, H, W) (or (B, K, D, H, W) for a batched image) on the accumulation device.

    Example:
        >>> from s3d import build_resenc_unet
        >>> net = build_resenc_unet("tiny", in_channels=1, num_classes=2).eval()
        >>> logits = sliding_window_predict(net, torch.randn(1, 70, 50, 40), (32, 32, 32))
        >>> logits.shape
        torch.Size([2, 70, 50, 40])
    """
    inferer = SlidingWindowInferer(
        patch_size, step=step, mirror=mirror, tile_batch=tile_batch, device=device, accumulate_device=accumulate_device,
        accumulate_limit_bytes=accumulate_limit_bytes, amp=amp, sigma_scale=sigma_scale, gaussian=gaussian,
        output=output, progress=progress)
    return inferer(image, model)
