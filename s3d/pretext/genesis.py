"""Models Genesis (Zhou et al., MedIA 2021): restore the original volume from a distorted copy.

The four distortions and the flip augmentation of the official pipeline, at its rates, as batched
torch ops on the training device (order as in MG's ``generate_pair``):

1. flips (rate 0.4 per attempt, up to 3 attempts of a random axis; applied to input *and* target);
2. local pixel shuffling (rate 0.5): voxels are permuted inside small windows;
3. non-linear intensity (rate 0.9): a random monotone Bezier curve ``[0, 1] -> [0, 1]``, increasing
   or (half of the time) decreasing;
4. painting (rate 0.9): out-painting (0.8) keeps up to 5 boxes and fills the rest with uniform
   noise, in-painting (0.2) fills up to 5 boxes with noise.

The network (the backbone's full U-Net) predicts the undistorted volume; the loss is the MSE over
every voxel.

Intensity scale: MG works on images in [0, 1] (clipped CT). s3d's pre-training input is z-scored,
so each sample is mapped to [0, 1] with its own min and max, distorted there, and mapped back with
the inverse affine map; the network sees and predicts z-score units, as in fine-tuning, and the MSE
is in z-score units.

Differences from the official code (deliberate, for batching and testable properties):
- local shuffling permutes voxels inside the windows of one non-overlapping grid (sides per batch
  in [2, max(2, size // 10)], random grid offset, a fraction ``shuffle_fraction`` of the windows),
  instead of 10,000 possibly overlapping blocks; each window keeps its multiset of values;
- the "decreasing" branch pairs sorted x with sorted-descending y, so the map is always monotone
  (the official branch pairs sorted x with the curve's y in parameter order, which can wiggle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s3d.augment import mirror
from s3d.pretext._common import (
    PretextMethod,
    PretextOutput,
    box_mask,
    check_backbone,
    device_generator,
    rand,
    randint_between,
)

#: The official Models Genesis rates.
MG_RATES = {"nonlinear_rate": 0.9, "local_rate": 0.5, "paint_rate": 0.9, "outpaint_rate": 0.8,
            "flip_rate": 0.4}


def sample_decisions(
    batch: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    nonlinear_rate: float = 0.9,
    local_rate: float = 0.5,
    paint_rate: float = 0.9,
    outpaint_rate: float = 0.8,
    flip_rate: float = 0.4,
) -> dict[str, torch.Tensor]:
    """Which distortions each of ``batch`` samples gets.

    Returns:
        bool (B,) tensors ``nonlinear``, ``decreasing`` (which Bezier branch, p 0.5), ``local``,
        ``paint``, ``outpaint`` (out- vs in-painting; only acts where ``paint``); ``flip_attempts``
        (B,) int in 0..3 (attempt k+1 happens with probability ``flip_rate`` after attempt k) and
        ``flip`` (B, 3) bool, the net flip of each axis (parity of the attempts on it).

    Example:
        >>> d = sample_decisions(4, torch.Generator().manual_seed(0))
        >>> sorted(d)[:3]
        ['decreasing', 'flip', 'flip_attempts']
    """
    device = torch.device(device)
    u = rand((batch, 5), generator, device)
    attempts_u = rand((batch, 3), generator, device)
    axes = torch.floor(rand((batch, 3), generator, device) * 3).long().clamp_max(2)
    active = torch.cumprod((attempts_u < flip_rate).long(), dim=1).bool()  # (B, 3) attempt happens
    flip = torch.stack([((axes == a) & active).sum(1) % 2 == 1 for a in range(3)], dim=1)
    return {
        "nonlinear": u[:, 0] < nonlinear_rate,
        "decreasing": u[:, 1] < 0.5,
        "local": u[:, 2] < local_rate,
        "paint": u[:, 3] < paint_rate,
        "outpaint": u[:, 4] < outpaint_rate,
        "flip_attempts": active.sum(1),
        "flip": flip,
    }


def bezier_curves(
    batch: int, generator: torch.Generator, device: torch.device | str = "cpu", n_points: int = 1000,
    decreasing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cubic Bezier intensity curves through (0, 0) and (1, 1), as sorted samples.

    Control points P1, P2 are uniform in [0, 1]^2 (MG's). The curve is sampled at ``n_points``
    parameters; x and y are each sorted ascending (monotone increasing map); where ``decreasing``
    (B,) is True, y is reversed (monotone decreasing map, an intensity inversion).

    Returns:
        xs, ys: (B, n_points) float32, xs ascending from 0 to 1.
    """
    device = torch.device(device)
    p = rand((batch, 2, 2), generator, device)  # (B, [P1, P2], [x, y])
    t = torch.linspace(0, 1, n_points, device=device)[None]
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
    xs = b1 * p[:, 0, 0, None] + b2 * p[:, 1, 0, None] + b3
    ys = b1 * p[:, 0, 1, None] + b2 * p[:, 1, 1, None] + b3
    xs, ys = xs.sort(dim=1).values.clamp(0, 1), ys.sort(dim=1).values.clamp(0, 1)
    if decreasing is not None:
        ys = torch.where(decreasing.to(device)[:, None], ys.flip(1), ys)
    return xs, ys


def interp(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Batched ``np.interp``: piecewise-linear map of ``values`` (B, N) through (xs, ys) (B, n).

    Example:
        >>> interp(torch.tensor([[0.25]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]]))
        tensor([[0.5000]])
    """
    n = xs.shape[1]
    v = values.clamp(xs[:, :1], xs[:, -1:])
    idx = torch.searchsorted(xs.contiguous(), v.contiguous(), right=True).clamp(1, n - 1)
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    dx = x1 - x0
    w = torch.where(dx > 0, (v - x0) / dx.clamp_min(1e-12), torch.zeros_like(v)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def nonlinear_intensity(
    x01: torch.Tensor, apply: torch.Tensor, decreasing: torch.Tensor, generator: torch.Generator,
    n_points: int = 1000,
) -> torch.Tensor:
    """MG's non-linear intensity transformation of ``x01`` (B, C, D, H, W) in [0, 1].

    Each sample where ``apply`` (B,) is True is mapped through its own random monotone Bezier
    curve (:func:`bezier_curves`); the result stays in [0, 1].

    Example:
        >>> g = torch.Generator().manual_seed(0); x = torch.rand(2, 1, 8, 8, 8)
        >>> y = nonlinear_intensity(x, torch.tensor([True, False]), torch.tensor([False, False]), g)
        >>> bool(torch.equal(y[1], x[1])) and float(y.min()) >= 0 and float(y.max()) <= 1
        True
    """
    b = x01.shape[0]
    xs, ys = bezier_curves(b, generator, x01.device, n_points, decreasing)
    mapped = interp(x01.reshape(b, -1).float(), xs, ys).view_as(x01).to(x01.dtype)
    return torch.where(apply.view(-1, 1, 1, 1, 1).to(x01.device), mapped, x01)


def local_pixel_shuffle(
    x: torch.Tensor, apply: torch.Tensor, generator: torch.Generator, fraction: float = 0.75,
    max_window: Sequence[int] | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """Permute voxels inside small windows (MG's local pixel shuffling), batched.

    One grid of non-overlapping windows per call: window sides (voxels) per axis uniform in
    ``[2, max_window]`` (default ``max(2, size // 10)``, MG's block size), grid offset uniform in
    ``[0, size mod side]``. In every sample where ``apply`` (B,) is True, each window is shuffled with
    probability ``fraction`` by its own random permutation (the same for all channels). Voxels
    outside the grid are unchanged; every window keeps its multiset of values.

    Returns:
        (shuffled (B, C, D, H, W), ``{"window": (sd, sh, sw), "offset": (od, oh, ow)}``).
    """
    b, c, *size = x.shape
    g = generator
    if max_window is None:
        max_window = [max(2, s // 10) for s in size]
    sides, offsets = [], []
    for a in range(3):
        hi = min(max(2, int(max_window[a])), size[a])
        lo = min(2, hi)
        side = int(randint_between(torch.tensor([lo]), torch.tensor([hi]), g).item())
        off = int(randint_between(torch.tensor([0]), torch.tensor([size[a] % side]), g).item())
        sides.append(side)
        offsets.append(off)
    n = [size[a] // sides[a] for a in range(3)]
    sl = tuple(slice(offsets[a], offsets[a] + n[a] * sides[a]) for a in range(3))
    region = x[:, :, sl[0], sl[1], sl[2]]
    blocks = region.reshape(b, c, n[0], sides[0], n[1], sides[1], n[2], sides[2])
    blocks = blocks.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, c, n[0] * n[1] * n[2], -1)
    nb, vol = blocks.shape[2], blocks.shape[3]
    perm = rand((b, nb, vol), g, x.device).argsort(dim=-1)
    shuffled = blocks.gather(3, perm[:, None].expand(b, c, nb, vol))
    chosen = (rand((b, nb), g, x.device) < fraction) & apply.to(x.device)[:, None]
    blocks = torch.where(chosen[:, None, :, None], shuffled, blocks)
    blocks = blocks.reshape(b, c, n[0], n[1], n[2], sides[0], sides[1], sides[2])
    region = blocks.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(region.shape)
    out = x.clone()
    out[:, :, sl[0], sl[1], sl[2]] = region
    return out, {"window": tuple(sides), "offset": tuple(offsets)}


def sample_paint_boxes(
    batch: int, size: Sequence[int], outpaint: torch.Tensor, generator: torch.Generator,
    device: torch.device | str = "cpu", max_boxes: int = 5, continue_rate: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes of MG's in-/out-painting (per sample, up to ``max_boxes``).

    In-painting boxes have sides uniform in ``[s // 6, s // 3]``; out-painting boxes in
    ``[s - 4 s // 7, s - 3 s // 7]`` (s: patch side, voxels). Corners lie at least 3 voxels from
    the border where the patch allows it. Box k+1 exists with probability ``continue_rate`` after
    box k; the first in-painting box too, the first out-painting box always.

    Returns:
        lo, hi: (B, max_boxes, 3) long corners (hi exclusive); active: (B, max_boxes) bool.
    """
    device = torch.device(device)
    size_t = torch.tensor(list(size), device=device)
    out = outpaint.to(device)[:, None, None]
    side_lo = torch.where(out, size_t - 4 * size_t // 7, size_t // 6).clamp_min(1)
    side_hi = torch.where(out, size_t - 3 * size_t // 7, size_t // 3).clamp_min(1)
    side_lo, side_hi = side_lo.expand(batch, max_boxes, 3), side_hi.expand(batch, max_boxes, 3)
    side = randint_between(side_lo, side_hi, generator)
    margin_hi = size_t - side - 3
    start_lo = torch.where(margin_hi >= 3, torch.full_like(side, 3), torch.zeros_like(side))
    start_hi = torch.where(margin_hi >= 3, margin_hi, (size_t - side).clamp_min(0))
    lo = randint_between(start_lo, start_hi, generator)
    go = rand((batch, max_boxes), generator, device) < continue_rate
    go[:, 0] |= outpaint.to(device)
    active = torch.cumprod(go.long(), dim=1).bool()
    return lo, lo + side, active


def paint(
    x01: torch.Tensor, apply: torch.Tensor, outpaint: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """MG's in-/out-painting of ``x01`` (B, C, D, H, W) in [0, 1] with uniform [0, 1) noise.

    In-painting (``outpaint`` False) replaces the union of its boxes with noise; out-painting
    replaces everything outside the union of its boxes. Samples where ``apply`` is False are
    unchanged.

    Returns:
        (painted, changed (B, 1, D, H, W) bool: the voxels replaced by noise,
        ``{"lo", "hi", "active"}`` the boxes of :func:`sample_paint_boxes`).
    """
    b, _, *size = x01.shape
    lo, hi, active = sample_paint_boxes(b, size, outpaint, generator, x01.device)
    union = torch.zeros((b, 1, *size), dtype=torch.bool, device=x01.device)
    for k in range(lo.shape[1]):
        union |= box_mask(lo[:, k], hi[:, k], size) & active[:, k].view(-1, 1, 1, 1, 1)
    out5 = outpaint.to(x01.device).view(-1, 1, 1, 1, 1)
    changed = torch.where(out5, ~union, union) & apply.to(x01.device).view(-1, 1, 1, 1, 1)
    noise = rand(x01.shape, generator, x01.device).to(x01.dtype)
    return torch.where(changed, noise, x01), changed, {"lo": lo, "hi": hi, "active": active}


def genesis_transform(
    x01: torch.Tensor, generator: torch.Generator, shuffle_fraction: float = 0.75, bezier_points: int = 1000,
    **rates: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The full MG pipeline on ``x01`` (B, C, D, H, W) in [0, 1]: (distorted input, target, decisions).

    Example:
        >>> inp, target, d = genesis_transform(torch.rand(2, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    """
    d = sample_decisions(x01.shape[0], generator, x01.device, **{**MG_RATES, **rates})
    target = mirror(x01, d["flip"])
    inp, _ = local_pixel_shuffle(target, d["local"], generator, shuffle_fraction)
    inp = nonlinear_intensity(inp, d["nonlinear"], d["decreasing"], generator, bezier_points)
    inp, _, _ = paint(inp, d["paint"], d["outpaint"], generator)
    return inp, target, d


class ModelsGenesis(PretextMethod):
    """Models Genesis restoration pre-training around a ResEnc U-Net (``num_classes == in_channels``).

    Args:
        backbone: the ResEnc U-Net (its own decoder and head predict the restored volume).
        nonlinear_rate, local_rate, paint_rate, outpaint_rate, flip_rate: MG's rates
            (defaults: the official 0.9, 0.5, 0.9, 0.8, 0.4; in-painting rate = 1 - outpaint_rate).
        shuffle_fraction: fraction of the windows shuffled by local pixel shuffling.
        bezier_points: samples of each Bezier curve.

    Example:
        >>> from s3d.nn import build_resenc_unet
        >>> mg = ModelsGenesis(build_resenc_unet("tiny", in_channels=1, num_classes=1))
        >>> out = mg(torch.randn(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> out.loss.shape
        torch.Size([])
    """

    def __init__(self, backbone: nn.Module, nonlinear_rate: float = 0.9, local_rate: float = 0.5,
                 paint_rate: float = 0.9, outpaint_rate: float = 0.8, flip_rate: float = 0.4,
                 shuffle_fraction: float = 0.75, bezier_points: int = 1000) -> None:
        super().__init__()
        check_backbone(backbone, "mg")
        cfg = backbone.config
        if cfg.num_classes != cfg.in_channels:
            raise ValueError(f"mg: the backbone reconstructs its input, so num_classes must equal "
                             f"in_channels; "
                             f"got num_classes={cfg.num_classes}, in_channels={cfg.in_channels}")
        rates = {"nonlinear_rate": nonlinear_rate, "local_rate": local_rate, "paint_rate": paint_rate,
                 "outpaint_rate": outpaint_rate, "flip_rate": flip_rate, "shuffle_fraction": shuffle_fraction}
        for k, v in rates.items():
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"mg: {k} must lie in [0, 1], got {v}")
        if bezier_points < 2:
            raise ValueError(f"mg: bezier_points must be >= 2, got {bezier_points}")
        self.backbone = backbone
        self.rates = {k: float(v) for k, v in rates.items() if k != "shuffle_fraction"}
        self.shuffle_fraction = float(shuffle_fraction)
        self.bezier_points = int(bezier_points)
        # only the highest-resolution head is used (deep supervision off)
        for head in list(backbone.decoder.seg_layers)[:-1]:
            head.requires_grad_(False)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> PretextOutput:
        """Distort ``x`` (B, C, D, H, W, z-scored), restore it, score the MSE over all voxels.

        Returns:
            :class:`PretextOutput` (loss, reconstruction, target (the flipped original),
            extras ``{"input": distorted input}``), all in z-score units.
        """
        self.backbone.check_input(x)
        g = device_generator(x, generator)
        dims = (1, 2, 3, 4)
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        scale = (hi - lo).clamp_min(1e-6)
        x01 = ((x - lo) / scale).clamp(0, 1)
        inp01, _, d = genesis_transform(x01, g, self.shuffle_fraction, self.bezier_points, **self.rates)
        inp = inp01 * scale + lo
        target = mirror(x, d["flip"])
        pred = self.backbone(inp)
        if isinstance(pred, (list, tuple)):
            pred = pred[0]
        loss = F.mse_loss(pred.float(), target.float())
        return PretextOutput(loss, pred, target, {"input": inp})
