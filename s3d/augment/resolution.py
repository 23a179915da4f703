"""Resolution transforms of images (B, C, D, H, W): Gaussian blur and low-resolution simulation.

Both act on the (sample, channel) pairs whose parameter is not "off" and leave the others bitwise
unchanged. Blur is separable (D, then H, then W) with reflect padding, batched over all selected
channels at once; the low-resolution simulation is nnU-Net's nearest-exact zoom out and trilinear
zoom back, one pair of ``interpolate`` calls per selected channel (each on a whole volume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kernel_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Radius in voxels (int64, same shape) of the truncated Gaussian kernel for ``sigma`` (voxels).

    The kernel has ``2 r + 1`` taps, ``2 r + 1`` being the odd integer nearest to ``6 sigma + 0.5`` (the
    one above at a tie), i.e. ``r = floor(3 sigma + 1/4)``: 1 tap either side for sigma 0.5, 3 for 1.0.

    Example:
        >>> kernel_radius(torch.tensor([0.5, 0.75, 1.0])).tolist()
        [1, 2, 3]
    """
    return torch.floor(3 * sigma.double() + 0.25).long()


def gaussian_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(N, 2 R + 1) float64 normalised 1-D Gaussian kernels for ``sigma`` (N,) > 0 voxels, R the largest radius.

    Row ``i`` holds ``exp(-t^2 / (2 sigma_i^2))`` for the taps ``|t| <= kernel_radius(sigma_i)`` and 0
    outside, divided by its sum; taps ``t = -R .. R``.

    Example:
        >>> gaussian_kernels(torch.tensor([0.5])).shape
        torch.Size([1, 3])
    """
    sigma = sigma.double()
    radius = kernel_radius(sigma)
    big = int(radius.max()) if sigma.numel() else 0
    t = torch.arange(-big, big + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2) * (t[None].abs() <= radius[:, None])
    return w / w.sum(dim=1, keepdim=True)


def reflect_index(n: int, pad: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices (n + 2 pad,) into an axis of length ``n`` that pad it by reflection about the end voxels.

    ``[a b c d]`` padded by 2 reads ``c b | a b c d | c b`` (``torch.nn.functional.pad(mode="reflect")``,
    scipy's ``mode="mirror"``); ``pad >= n`` reflects again, ``n = 1`` repeats the voxel.

    Example:
        >>> reflect_index(4, 2).tolist()
        [2, 1, 0, 1, 2, 3, 2, 1]
    """
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _blur_axis(v: torch.Tensor, kernels: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate each volume of ``v`` (N, D, H, W) with its kernel ``kernels`` (N, K) along ``axis`` (1..3)."""
    n, size = v.shape[0], v.shape[axis]
    pad = (kernels.shape[1] - 1) // 2
    vp = v.index_select(axis, reflect_index(size, pad, v.device))
    w = kernels.to(device=v.device, dtype=v.dtype)
    out = vp.narrow(axis, 0, size) * w[:, 0].view(n, 1, 1, 1)
    for t in range(1, kernels.shape[1]):
        out.addcmul_(vp.narrow(axis, t, size), w[:, t].view(n, 1, 1, 1))
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each channel of ``x`` (B, C, D, H, W) with its own separable Gaussian.

    Args:
        x: images, floating point, any device.
        sigma: (B, C, 3) sigmas in voxels along D, H, W; 0 leaves that channel (or axis) unblurred.

    Returns:
        A new tensor like ``x`` (``x`` itself when nothing is blurred). The kernels are truncated at
        :func:`kernel_radius` and the volume is padded by reflection (:func:`reflect_index`).

    Example:
        >>> x = torch.zeros(1, 1, 9, 9, 9); x[0, 0, 4, 4, 4] = 1
        >>> y = gaussian_blur(x, torch.full((1, 1, 3), 1.0))
        >>> round(float(y.sum()), 6)
        1.0
    """
    sel = (sigma > 0).any(-1).nonzero()
    if not sel.numel():
        return x
    b, c = sel[:, 0], sel[:, 1]
    s = sigma[b, c].double()  # (N, 3)
    dev_b, dev_c = b.to(x.device), c.to(x.device)
    v = x[dev_b, dev_c]  # (N, D, H, W) copy
    for axis in range(3):
        on = s[:, axis] > 0
        if not on.any():
            continue
        blurred = _blur_axis(v, gaussian_kernels(torch.where(on, s[:, axis], torch.ones_like(s[:, axis]))), axis + 1)
        v = torch.where(on.to(x.device).view(-1, 1, 1, 1), blurred, v)
    out = x.clone()
    out[dev_b, dev_c] = v
    return out


def simulate_low_resolution(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Zoom each selected channel of ``x`` (B, C, D, H, W) out by ``scale`` and back in.

    A channel with zoom factor ``s`` is resampled to ``round(n * s)`` voxels along each axis of length
    ``n`` (at least 1) with nearest-exact interpolation, then back to ``n`` with trilinear interpolation
    (``align_corners=False``), as nnU-Net's ``SimulateLowResolutionTransform``.

    Args:
        x: images, floating point, any device.
        scale: (B, C) zoom factors in (0, 1]; 1 leaves the channel unchanged.

    Returns:
        A new tensor like ``x`` (``x`` itself when no channel is zoomed).

    Example:
        >>> x = torch.full((1, 1, 8, 8, 8), 3.0)
        >>> torch.equal(simulate_low_resolution(x, torch.tensor([[0.5]])), x)
        True
    """
    sel = (scale != 1).nonzero().tolist()
    if not sel:
        return x
    out = x.clone()
    shape = tuple(x.shape[2:])
    for b, c in sel:
        s = float(scale[b, c])
        low_shape = [max(1, round(n * s)) for n in shape]
        low = F.interpolate(x[b, c][None, None], size=low_shape, mode="nearest-exact")
        out[b, c] = F.interpolate(low, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return out

