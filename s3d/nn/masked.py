"""Masked ("sparse") primitives shared by the dense network and the sparse MAE encoder.

Mask polarity everywhere in s3d: a ``keep`` tensor holds 1 (True) at visible voxels or cells
and 0 at masked ones, as in SparK and nnssl.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def masked_instance_norm(
    x: torch.Tensor,
    keep: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Instance norm whose statistics use only the visible voxels of each sample and channel.

    Computed from masked sums (no ``nonzero()`` gathers), so samples may have different
    visible counts and the function traces under ``torch.compile``. Statistics are taken in
    fp32 for half, bfloat16 and fp32 inputs (as autocast does for ``instance_norm``) and in fp64
    for fp64 inputs.

    Args:
        x: features, shape (B, C, D, H, W).
        keep: 1 = visible, 0 = masked; shape (B, 1, D, H, W) (broadcast over channels).
        weight, bias: per-channel affine parameters, shape (C,), or ``None``.
        eps: added to the biased variance.

    Returns:
        Normalised features of ``x``'s shape and dtype, exactly 0 at masked voxels.

    Example:
        >>> x = torch.tensor([1.0, 3.0, 100.0, 5.0], dtype=torch.float64).view(1, 1, 1, 1, 4)
        >>> keep = torch.tensor([1, 1, 0, 1]).view(1, 1, 1, 1, 4)  # the 100 is masked
        >>> masked_instance_norm(x, keep, eps=0.0).flatten().tolist()
        [-1.224744871391589, 0.0, 0.0, 1.224744871391589]
    """
    if x.dim() != 5 or keep.dim() != 5 or keep.shape[1] != 1:
        raise ValueError(f"expected x (B, C, D, H, W) and keep (B, 1, D, H, W), got {tuple(x.shape)} and "
                         f"{tuple(keep.shape)}")
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 input
    xf = x.to(acc)
    k = keep.to(acc)
    dims = (2, 3, 4)
    n = k.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (xf * k).sum(dim=dims, keepdim=True) / n
    centred = (xf - mean) * k
    var = (centred * centred).sum(dim=dims, keepdim=True) / n
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc).view(1, -1, 1, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1, 1, 1)
    return (y * k).to(dtype)


def expand_keep(keep: torch.Tensor, size: Sequence[int], coarse: str = "pool") -> torch.Tensor:
    """Bring a keep mask to a feature map's spatial ``size``.

    Args:
        keep: (B, 1, d, h, w) mask, 1 = visible. May be bool or float.
        size: target (D, H, W) in voxels.
        coarse: what a target coarser than ``keep`` gets: ``"pool"`` marks a voxel visible if any
            cell under it is visible (max-pool); ``"ones"`` makes every voxel visible (the
            released nnssl code never masks its bottleneck).

    Returns:
        Float mask (B, 1, *size) of 0s and 1s. Finer targets repeat each cell (nearest).
    """
    size = tuple(int(s) for s in size)
    src = tuple(keep.shape[2:])
    keep = keep.to(torch.float32)
    if src == size:
        return keep
    if all(t % s == 0 for t, s in zip(size, src)):
        return F.interpolate(keep, size=size, mode="nearest")
    if all(s % t == 0 for t, s in zip(size, src)):
        if coarse == "ones":
            return keep.new_ones((keep.shape[0], 1, *size))
        if coarse != "pool":
            raise ValueError(f"coarse: expected 'pool' or 'ones', got {coarse!r}")
        return F.max_pool3d(keep, kernel_size=tuple(s // t for t, s in zip(size, src)))
    raise ValueError(
        f"keep mask of spatial shape {src} does not tile a feature map of shape {size}: "
        "each axis must be a multiple or a divisor of the other"
    )


def stage_keeps(
    keep: torch.Tensor,
    input_size: Sequence[int],
    stage_strides: Sequence[Sequence[int]],
    coarse: str = "pool",
) -> list[torch.Tensor]:
    """Keep masks for the input resolution and every encoder stage.

    Args:
        keep: (B, 1, d, h, w) mask on any grid that tiles the input (1 = visible), e.g. the
            (B, 1, D/32, H/32, W/32) block grid or a full-resolution (B, 1, D, H, W) mask.
        input_size: (D, H, W) of the network input, voxels.
        stage_strides: cumulative stride of every stage (``ResEncUNetConfig.stage_strides()``).
        coarse: policy for stages coarser than the grid, see :func:`expand_keep`.

    Returns:
        ``[keep_input, keep_stage0, keep_stage1, ...]`` as float (B, 1, ...) tensors.
    """
    sizes = [tuple(input_size)] + [tuple(i // s for i, s in zip(input_size, st)) for st in stage_strides]
    return [expand_keep(keep, size, coarse) for size in sizes]
