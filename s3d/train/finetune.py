"""Fine-tuning a (pretrained) ResEnc U-Net on an nnU-Net dataset: transfer, schedules, the loop.

Order of this file: weight transfer (:func:`prepare_model`), the schedule presets of the paper's
Table 2 (:data:`SCHEDULES`), loss, patch sampling and augmentation, then the :class:`Trainer` and
:func:`finetune`.

Schedules are data: a :class:`Schedule` row says what is transferred, whether there is a
decoder-only warm-up (warm-up 1), a warm-up of all weights (warm-up 2), whether the encoder stays
frozen, and the peak learning rate. :meth:`Schedule.plan` turns it into :class:`Phase` s with step
ranges; each warm-up lasts 5 % of the total steps (12.5k of the paper's 250k) unless given. Warm-ups
ramp the lr linearly from 0 to the peak (timm's warm-up), training phases decay it with PolyLR
(exponent 0.9, timm's ``PolyLRScheduler``), stepped after every optimiser step.

"Decoder only" means the encoder (stem included) gets no update at all: its parameters are not in
the optimiser *and* have ``requires_grad=False``, so neither gradients, momentum nor weight decay
can move them. (The reference implementation optimises ``decoder.parameters()``, which there
includes the encoder because DNA's decoder holds a reference to it.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s3d._fs import atomic_path, write_json_atomic
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet

Strategy = Literal["all", "encoder"]
Trains = Literal["all", "decoder"]

#: The paper's fine-tuning length: 250 steps per epoch x 1000 epochs.
PAPER_STEPS = 250_000
#: The paper's warm-up length (each warm-up phase), steps.
PAPER_WARMUP_STEPS = 12_500
#: Table 8 total lengths (warm-ups fixed at 12.5k + 12.5k steps, the rest is the training stage).
TABLE8_STEPS = (25_000, 37_500, 50_000, 75_000, 150_000, 275_000)


# ---- transfer ------------------------------------------------------------------------------------
def prepare_model(
    source: nn.Module | str | os.PathLike[str] | None,
    *,
    in_channels: int,
    num_classes: int,
    strategy: Strategy = "all",
    stem: Literal["replicate", "random"] = "replicate",
    config: str | Any = "resenc_l",
    deep_supervision: bool = False,
    **load_kwargs: Any,
) -> ResEncUNet:
    """A network for fine-tuning with ``in_channels`` inputs and ``num_classes`` outputs.

    Args:
        source: a pretrained :class:`~s3d.nn.ResEncUNet`; a registry name, Hub repo, model
            directory or checkpoint path for :func:`s3d.hub.load_pretrained`; or ``None`` to train
            from scratch (``build_resenc_unet(config)``, He init).
        in_channels: image channels of the downstream data. When the source has fewer (1 at
            pre-training), the stem is adapted as ``stem`` says.
        num_classes: output classes; a new segmentation head when it differs from the source.
        strategy: ``"all"`` transfers encoder and decoder; ``"encoder"`` keeps a random decoder.
        stem: ``"replicate"`` (Table 6's best: pretrained stem replicated over channels) or
            ``"random"`` (fresh stem).
        config: architecture preset for ``source=None``.
        deep_supervision: return logits at every decoder resolution (training).
        **load_kwargs: passed to :func:`s3d.hub.load_pretrained` (``revision``, ``strict``, ...).

    Returns:
        The model (train mode, CPU); ``model.transfer_report`` holds the hub's ``LoadReport`` (or
        ``None`` from scratch).

    Example:
        >>> net = prepare_model("s3d-b", in_channels=2, num_classes=3, strategy="all")
        >>> net.transfer_report.stem
        'replicated'
    """
    if strategy not in ("all", "encoder"):
        raise ValueError(f"strategy: expected 'all' or 'encoder', got {strategy!r}")
    if stem not in ("replicate", "random"):
        raise ValueError(f"stem: expected 'replicate' or 'random', got {stem!r}")
    report = None
    if source is None:
        model = build_resenc_unet(config, in_channels=in_channels, num_classes=num_classes)
    elif isinstance(source, nn.Module):
        from s3d.hub.adapt import LoadReport, adapt_state_dict

        if not isinstance(source, ResEncUNet):
            raise TypeError(f"source: expected a ResEncUNet, got {type(source).__name__}")
        model = build_resenc_unet(source.config, in_channels=in_channels, num_classes=num_classes,
                                  deep_supervision=False)
        state, report = adapt_state_dict(source.state_dict(), model.state_dict(), stem=stem,
                                         decoder=strategy == "all", report=LoadReport(source="nn.Module"))
        model.load_state_dict(state, strict=True)
    else:
        from s3d.hub import load_pretrained

        model, report = load_pretrained(source, in_channels=in_channels, num_classes=num_classes, stem=stem,
                                        decoder=strategy == "all", output_loading_info=True, **load_kwargs)
    model.deep_supervision = deep_supervision
    model.transfer_report = report  # type: ignore[attr-defined]
    return model.train()


def encoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the encoder, stem included (everything a decoder-only phase must not move)."""
    return list(model.encoder.parameters())


def decoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the decoder (transposed convs, decoder stages, segmentation heads), not the encoder."""
    enc = {id(p) for p in model.encoder.parameters()}
    return [p for p in model.decoder.parameters() if id(p) not in enc]


# ---- schedules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """A stretch of steps with one set of trainable weights and one lr shape.

    Attributes:
        name: ``warmup_decoder``, ``warmup_all``, ``train`` or ``train_decoder``.
        trains: ``"all"`` or ``"decoder"`` (encoder and stem frozen).
        lr: ``"ramp"`` (linear 0 -> peak over the phase) or ``"poly"`` (peak -> 0, exponent 0.9).
        start, stop: step range [start, stop).
        peak_lr: the phase's peak learning rate.
    """

    name: str
    trains: Trains
    lr: Literal["ramp", "poly"]
    start: int
    stop: int
    peak_lr: float

    @property
    def steps(self) -> int:
        """Length of the phase, steps."""
        return self.stop - self.start


@dataclass(frozen=True)
class Schedule:
    """One row of the paper's Table 2 as data.

    Attributes:
        name: registry key.
        transfer: ``"all"`` (encoder + decoder, new head), ``"encoder"`` (random decoder) or
            ``"none"`` (from scratch).
        decoder_warmup: warm-up 1, only the decoder trains (stem frozen), lr ramps 0 -> peak.
        full_warmup: warm-up 2, all weights train, lr ramps 0 -> peak.
        frozen_encoder: the encoder never trains (the training stage is decoder-only too).
        peak_lr: maximal learning rate.
        description: what the row is, with the paper's average DSC where quoted.
    """

    name: str
    transfer: Literal["all", "encoder", "none"]
    decoder_warmup: bool
    full_warmup: bool
    frozen_encoder: bool
    peak_lr: float
    description: str = ""

    def plan(self, total_steps: int = PAPER_STEPS, warmup_steps: int | None = None,
             peak_lr: float | None = None) -> list[Phase]:
        """The phases with step ranges for a run of ``total_steps`` (warm-ups included).

        Args:
            total_steps: all optimiser steps of the run.
            warmup_steps: steps of each warm-up phase; ``None`` = 5 % of ``total_steps`` (12.5k of 250k).
            peak_lr: override the row's peak lr.

        Example:
            >>> [(p.name, p.start, p.stop) for p in get_schedule("best").plan(1000)]
            [('warmup_decoder', 0, 50), ('warmup_all', 50, 100), ('train', 100, 1000)]
        """
        peak = float(self.peak_lr if peak_lr is None else peak_lr)
        if warmup_steps is None:
            w = round(total_steps * PAPER_WARMUP_STEPS / PAPER_STEPS)
        else:
            w = int(warmup_steps)
        n_warm = int(self.decoder_warmup) + int(self.full_warmup)
        if total_steps < 1 or w < (1 if n_warm else 0) or total_steps - n_warm * w < 1:
            raise ValueError(f"schedule {self.name!r}: total_steps={total_steps} leaves no training stage "
                             f"after {n_warm} warm-up(s) of {w} steps; use more steps or fewer warm-up steps")
        phases, t = [], 0
        if self.decoder_warmup:
            phases.append(Phase("warmup_decoder", "decoder", "ramp", t, t + w, peak))
            t += w
        if self.full_warmup:
            phases.append(Phase("warmup_all", "all", "ramp", t, t + w, peak))
            t += w
        trains: Trains = "decoder" if self.frozen_encoder else "all"
        name = "train_decoder" if self.frozen_encoder else "train"
        phases.append(Phase(name, trains, "poly", t, total_steps, peak))
        return phases


def _row(name: str, transfer: str, dec: bool, full: bool, frozen: bool, lr: float, desc: str) -> Schedule:
    return Schedule(name, transfer, dec, full, frozen, lr, desc)  # type: ignore[arg-type]


#: Named presets covering the rows of the paper's Table 2 (average DSC over D1-D5 where quoted).
SCHEDULES: dict[str, Schedule] = {s.name: s for s in [
    _row("scratch", "none", False, False, False, 1e-2,
         "nnU-Net default: from scratch, no warm-up, PolyLR from 1e-2 (Table 2 baseline, 69.93 DSC)"),
    _row("no_warmup", "all", False, False, False, 1e-2, "transfer all, no warm-up, peak lr 1e-2"),
    _row("no_warmup_lr1e-3", "all", False, False, False, 1e-3, "transfer all, no warm-up, peak lr 1e-3"),
    _row("warmup_all", "all", False, True, False, 1e-2, "transfer all, warm-up of all weights, peak lr 1e-2"),
    _row("warmup_all_lr1e-3", "all", False, True, False, 1e-3,
         "transfer all, warm-up of all weights, peak lr 1e-3"),
    _row("warmup_all_lr1e-4", "all", False, True, False, 1e-4,
         "transfer all, warm-up of all weights, peak lr 1e-4"),
    _row("decoder_warmup", "encoder", True, False, False, 1e-2,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-2"),
    _row("decoder_warmup_lr1e-3", "encoder", True, False, False, 1e-3,
         "transfer encoder, decoder-only warm-up, then all weights, peak lr 1e-3"),
    _row("frozen_encoder", "all", True, False, True, 1e-2,
         "transfer all, encoder frozen for the whole run (decoder warm-up, decoder training), peak lr 1e-2"),
    _row("frozen_encoder_lr1e-3", "all", True, False, True, 1e-3,
         "transfer all, encoder frozen for the whole run, peak lr 1e-3"),
    _row("sawtooth_lr1e-2", "all", True, True, False, 1e-2,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-2"),
    _row("best", "all", True, True, False, 1e-3,
         "the paper's best (71.76 DSC): transfer all, warm-up 1 decoder only (stem frozen), warm-up 2 "
         "all weights, then all weights with PolyLR from peak lr 1e-3"),
    _row("sawtooth_lr1e-4", "all", True, True, False, 1e-4,
         "transfer all, decoder warm-up, warm-up of all weights, then all weights, peak lr 1e-4"),
]}


def get_schedule(name: str | Schedule) -> Schedule:
    """A preset from :data:`SCHEDULES` by name (a :class:`Schedule` passes through).

    Example:
        >>> get_schedule("best").peak_lr
        0.001
    """
    if isinstance(name, Schedule):
        return name
    try:
        return SCHEDULES[name]
    except KeyError:
        raise KeyError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}") from None


def phase_at(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase holding ``step`` (0-based; steps past the end belong to the last phase)."""
    for i, p in enumerate(phases):
        if step < p.stop:
            return i
    return len(phases) - 1


def _timm_scheduler(phase: Phase, poly_exponent: float):
    from timm.scheduler import PolyLRScheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=phase.peak_lr)
    if phase.lr == "ramp":
        return PolyLRScheduler(opt, t_initial=max(2, phase.steps), warmup_t=phase.steps, warmup_lr_init=0.0,
                               warmup_prefix=True, t_in_epochs=False)
    return PolyLRScheduler(opt, t_initial=phase.steps, power=poly_exponent, lr_min=0.0, t_in_epochs=False)


_SCHED_CACHE: dict[tuple[Phase, float], Any] = {}


def lr_at(phases: Sequence[Phase], step: int, poly_exponent: float = 0.9) -> float:
    """Learning rate of optimiser step ``step`` (0-based): timm's linear warm-up or PolyLR in the phase.

    Ramp phases give ``peak * t / steps``, poly phases ``peak * (1 - t / steps) ** poly_exponent``,
    with ``t = step - phase.start``.

    Example:
        >>> lr_at(get_schedule("best").plan(1000), 100)
        0.001
    """
    phase = phases[phase_at(phases, step)]
    key = (phase, poly_exponent)
    if key not in _SCHED_CACHE:
        _SCHED_CACHE[key] = _timm_scheduler(phase, poly_exponent)
    t = min(step - phase.start, phase.steps)
    sched = _SCHED_CACHE[key]
    sched.step_update(num_updates=t)          # timm's public per-step API sets the group's lr
    return float(sched.optimizer.param_groups[0]["lr"])


# ---- loss ----------------------------------------------------------------------------------------
class DiceCELoss(nn.Module):
    """Soft Dice (foreground classes) + cross-entropy, as nnU-Net; optional deep supervision.

    ``loss = CE(logits, y) + (1 - mean_k Dice_k)`` with Dice over the batch and all voxels
    ("batch Dice", nnU-Net's 3d default) and smoothing 1e-5. With a list of logits (deep
    supervision, highest resolution first), the target is nearest-downsampled to each output and
    the losses are weighted ``1 / 2**i``, the lowest resolution with 0, normalised to sum 1
    (nnU-Net's weights).

    Example:
        >>> loss = DiceCELoss()(torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 8, 8, 8)))
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, K, D, H, W) against integer labels (B, D, H, W)."""
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        k = logits.shape[1]
        probs = torch.softmax(logits, 1)[:, 1:]
        onehot = F.one_hot(target, k).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
        axes = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
        inter = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        return ce + (1 - dice.mean())

    @staticmethod
    def deep_supervision_weights(n: int) -> list[float]:
        """nnU-Net's weights for ``n`` outputs: ``1/2**i``, last 0 (if n > 1), normalised to sum 1."""
        w = [1 / 2**i for i in range(n)]
        if n > 1:
            w[-1] = 0.0
        s = sum(w)
        return [x / s for x in w]

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.single(logits, target)
        total = logits[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.deep_supervision_weights(len(logits)), logits, strict=True):
            if w == 0:
                continue
            t = target
            if out.shape[2:] != target.shape[1:]:
                t = F.interpolate(target[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()
            total = total + w * self.single(out, t)
        return total


# ---- patches and augmentation --------------------------------------------------------------------
@dataclass
class CachedCase:
    """A preprocessed case in memory (or memory-mapped): data (C, D, H, W), seg (D, H, W), locations."""

    name: str
    data: np.ndarray
    seg: np.ndarray
    locs: np.ndarray


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, max(1, high), (1,), generator=gen))


def sample_patches(
    cases: Sequence[CachedCase], batch_size: int, patch_size: Sequence[int], gen: torch.Generator,
    foreground_fraction: float = 0.33,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random patches; the last ``round(B * foreground_fraction)`` are centred on foreground.

    Foreground patches (nnU-Net's oversampling) pick a label present in the case, then one of its
    voxels, and centre the patch there. Cases smaller than the patch are zero-padded.

    Returns:
        x (B, C, *patch_size) float32, y (B, *patch_size) int64 (CPU).

    Example:
        >>> x, y = sample_patches(cases, 2, (32, 32, 32), torch.Generator().manual_seed(0))
    """
    ps = tuple(int(p) for p in patch_size)
    n_fg = round(batch_size * foreground_fraction)
    xs, ys = [], []
    for i in range(batch_size):
        case = cases[_randint(gen, len(cases))]
        shape = case.seg.shape
        hi = [max(0, s - p) for s, p in zip(shape, ps, strict=True)]
        force_fg = i >= batch_size - n_fg and len(case.locs) > 0
        if force_fg:
            labels = np.unique(case.locs[:, 0])
            lab = labels[_randint(gen, len(labels))]
            rows = np.flatnonzero(case.locs[:, 0] == lab)
            centre = case.locs[rows[_randint(gen, len(rows))], 1:]
            lo = [min(max(0, int(c) - p // 2), h) for c, p, h in zip(centre, ps, hi, strict=True)]
        else:
            lo = [_randint(gen, h + 1) for h in hi]
        sl = tuple(slice(a, a + p) for a, p in zip(lo, ps, strict=True))
        x = np.asarray(case.data[(slice(None), *sl)], dtype=np.float32)
        y = np.asarray(case.seg[sl], dtype=np.int64)
        pad = [(0, p - s) for p, s in zip(ps, y.shape, strict=True)]
        if any(b for _, b in pad):
            x = np.pad(x, [(0, 0), *pad])
            y = np.pad(y, pad)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles (rad) about the three axes -> (B, 3, 3) rotation matrices."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


@dataclass
class AugmentConfig:
    """nnU-Net-like augmentation probabilities and ranges (per sample).

    Attributes:
        p_rotation, rotation_deg: rotate about each axis by U(-deg, deg).
        p_scale, scale: isotropic zoom factor U(lo, hi) (>1 zooms in).
        p_mirror: flip each axis independently.
        p_brightness, brightness: multiply each channel by U(lo, hi).
        p_contrast, contrast: scale around the channel mean by U(lo, hi), clipped to the old range.
        p_gamma, gamma: gamma U(lo, hi) on the [0, 1]-rescaled channel, mean and std kept.
        p_noise, noise_var: additive Gaussian noise with variance U(0, noise_var).
    """

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_var: float = 0.1


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                  cfg: AugmentConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on its device: rotation/scaling (one ``grid_sample``), mirroring, intensity.

    Random draws come from ``gen`` (CPU) so a run is reproducible from the generator's state on any
    device; noise uses a device generator seeded from ``gen``.

    Args:
        x: images (B, C, D, H, W) float; y: labels (B, D, H, W) int64; same device.

    Returns:
        (x, y) augmented, same shapes and dtypes.

    Example:
        >>> xa, ya = augment_batch(x, y, torch.Generator().manual_seed(0))
    """
    cfg = cfg or AugmentConfig()
    b, c = x.shape[:2]
    dev = x.device
    # spatial: rotation + scaling as one affine per sample (identity where not drawn)
    rot = (_rand(gen, b) < cfg.p_rotation).double()[:, None] * (_rand(gen, b, 3) * 2 - 1) * math.radians(
        cfg.rotation_deg)
    do_scale = _rand(gen, b) < cfg.p_scale
    zoom = torch.where(do_scale, cfg.scale[0] + _rand(gen, b) * (cfg.scale[1] - cfg.scale[0]), torch.ones(b,
                                                                                                         dtype=torch.float64))
    spatial = (rot.abs().sum(1) > 0) | do_scale
    if bool(spatial.any()):
        theta = torch.zeros(b, 3, 4, dtype=torch.float64)
        theta[:, :, :3] = _rotation_matrices(rot) / zoom[:, None, None]
        theta = theta.to(dev, torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        xs = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ys = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
        keep = spatial.to(dev)
        x = torch.where(keep.view(b, 1, 1, 1, 1), xs.to(x.dtype), x)
        y = torch.where(keep.view(b, 1, 1, 1), ys[:, 0].round().long(), y)
    # mirroring
    flips = _rand(gen, b, 3) < cfg.p_mirror
    for axis in range(3):
        m = flips[:, axis].to(dev)
        if bool(m.any()):
            x = torch.where(m.view(b, 1, 1, 1, 1), x.flip(2 + axis), x)
            y = torch.where(m.view(b, 1, 1, 1), y.flip(1 + axis), y)
    # intensity, per sample and channel
    def draw(p: float, lo: float, hi: float) -> torch.Tensor:
        on = _rand(gen, b, c) < p
        v = lo + _rand(gen, b, c) * (hi - lo)
        return torch.where(on, v, torch.ones_like(v)).to(dev, torch.float32).view(b, c, 1, 1, 1)

    x = x * draw(cfg.p_brightness, *cfg.brightness)
    cf = draw(cfg.p_contrast, *cfg.contrast)
    if bool((cf != 1).any()):
        mean = x.mean((2, 3, 4), keepdim=True)
        lo, hi = x.amin((2, 3, 4), keepdim=True), x.amax((2, 3, 4), keepdim=True)
        x = torch.where(cf != 1, torch.minimum(torch.maximum((x - mean) * cf + mean, lo), hi), x)
    g = draw(cfg.p_gamma, *cfg.gamma)
    if bool((g != 1).any()):
        mean, std = x.mean((2, 3, 4), keepdim=True), x.std((2, 3, 4), keepdim=True)
        lo = x.amin((2, 3, 4), keepdim=True)
        rng = (x.amax((2, 3, 4), keepdim=True) - lo).clamp_min(1e-7)
        xg = ((x - lo) / rng).clamp(0, 1) ** g * rng + lo
        xg_std = xg.std((2, 3, 4), keepdim=True).clamp_min(1e-7)
        xg = (xg - xg.mean((2, 3, 4), keepdim=True)) / xg_std * std + mean
        x = torch.where(g != 1, xg, x)
    noise_on = _rand(gen, b) < cfg.p_noise
    var = _rand(gen, b) * cfg.noise_var
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    if bool(noise_on.any()):
        dgen = torch.Generator(device=dev).manual_seed(seed)
        sd = (var.sqrt() * noise_on).to(dev, torch.float32).view(b, 1, 1, 1, 1)
        x = x + torch.randn(x.shape, generator=dgen, device=dev, dtype=x.dtype) * sd
    return x, y


# ---- validation ----------------------------------------------------------------------------------
def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label in ``labels`` (NaN where the label is in neither map)."""
    out = {}
    for v in labels:
        p, t = pred == v, target == v
        denom = int(p.sum()) + int(t.sum())
        out[int(v)] = float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


@torch.no_grad()
def predict_tiled(model: nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                  autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """Labels (D, H, W) of a preprocessed case (C, D, H, W) by non-overlapping patch tiles (validation).

    The full prediction with Gaussian-weighted overlapping windows is :mod:`s3d.infer`; this cheap
    tiling only tracks progress during training.
    """
    ps = [int(p) for p in patch_size]
    shape = data.shape[1:]
    padded = [max(p, math.ceil(s / p) * p) for s, p in zip(shape, ps, strict=True)]
    x = np.zeros((data.shape[0], *padded), dtype=np.float32)
    x[(slice(None), *(slice(0, s) for s in shape))] = data
    out = np.zeros(padded, dtype=np.int64)
    xt = torch.from_numpy(x)
    for d in range(0, padded[0], ps[0]):
        for h in range(0, padded[1], ps[1]):
            for w in range(0, padded[2], ps[2]):
                sl = (slice(d, d + ps[0]), slice(h, h + ps[1]), slice(w, w + ps[2]))
                tile = xt[(slice(None), *sl)][None].to(device)
                with (autocast() if autocast else _null()):
                    logits = model(tile)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                out[sl] = logits.float().argmax(1)[0].cpu().numpy()
    return out[tuple(slice(0, s) for s in shape)]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


# ---- configuration and the loop ------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; saved to ``out_dir/finetune_config.json``.

    Attributes:
        dataset: nnU-Net v2 raw dataset folder (with dataset.json).
        out_dir: run folder (split, metrics, checkpoints, final model).
        pretrained: registry name / Hub repo / path for :func:`s3d.hub.load_pretrained`; ``None`` = scratch.
        schedule: a :data:`SCHEDULES` name.
        steps: total optimiser steps, warm-ups included (paper: 250k).
        warmup_steps: steps of each warm-up; ``None`` = 5 % of ``steps``.
        peak_lr: override the schedule's peak lr.
        strategy: ``"all"`` / ``"encoder"``; ``None`` = the schedule's transfer.
        stem: ``"replicate"`` or ``"random"`` for multi-channel data.
        train_stem_in_decoder_warmup: also train the stem during warm-up 1 (Table 6 "unfrozen").
        config: architecture preset when training from scratch.
        batch_size: patches per step.
        patch_size: (D, H, W) voxels; ``None`` = median case shape rounded up to the network
            stride, capped at 160.
        target_spacing_mm: resampling target (mm).
        deep_supervision: deep-supervision loss.
        foreground_fraction: share of each batch centred on foreground (nnU-Net: 0.33).
        augment: nnU-Net-like augmentation.
        val_fraction: share of cases held out (at least one); the split is saved to ``split.json``.
        n_train: use only the first N training cases of the seeded split (low-data regime).
        val_every, checkpoint_every: steps between validations / checkpoints.
        seed: seeds the split, patch sampling and augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; off on CPU), ``"bf16"``, ``"fp16"``,
            ``"off"``.
        channels_last: channels_last_3d memory format (GPU only; measure it, InstanceNorm may be slower).
        grad_clip: max gradient norm (nnU-Net: 12).
        momentum, weight_decay, poly_exponent: SGD and PolyLR settings (0.99, 3e-5, 0.9).
        num_val_cases: validate on at most this many held-out cases (``None`` = all).
        progress: show a tqdm bar.
    """

    dataset: str
    out_dir: str
    pretrained: str | None = None
    schedule: str = "best"
    steps: int = PAPER_STEPS
    warmup_steps: int | None = None
    peak_lr: float | None = None
    strategy: str | None = None
    stem: str = "replicate"
    train_stem_in_decoder_warmup: bool = False
    config: str = "resenc_l"
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None
    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    deep_supervision: bool = True
    foreground_fraction: float = 0.33
    augment: bool = True
    val_fraction: float = 0.2
    n_train: int | None = None
    val_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    grad_clip: float = 12.0
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    num_val_cases: int | None = None
    progress: bool = True

    #: fields that must match when resuming
    RESUME_KEYS = ("schedule", "steps", "warmup_steps", "peak_lr", "batch_size", "seed", "config", "strategy",
                   "stem", "deep_supervision", "n_train", "target_spacing_mm")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.foreground_fraction <= 1 or not 0 < self.val_fraction < 1:
            raise ValueError(f"foreground_fraction must be in [0, 1] and val_fraction in (0, 1), got "
                             f"{self.foreground_fraction} and {self.val_fraction}")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        self.target_spacing_mm = tuple(float(v) for v in self.target_spacing_mm)  # type: ignore[assignment]
        get_schedule(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig keys {unknown}")
        return cls(**d)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device`` (``None`` = full fp32; always ``None`` on CPU)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp: expected auto, bf16, fp16 or off, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_split(
    cases: Sequence[str], val_fraction: float, seed: int, n_train: int | None = None
) -> dict[str, Any]:
    """Seeded train/val split; ``n_train`` keeps the first N training cases (low-data regime).

    Example:
        >>> make_split([f"c{i}" for i in range(10)], 0.2, seed=0)["val"]
        ['c2', 'c8']
    """
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases for a train/validation split, got {len(cases)}")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    val, train = sorted(order[:n_val]), order[n_val:]
    if n_train is not None:
        if not 1 <= n_train <= len(train):
            raise ValueError(f"n_train={n_train}: the split has {len(train)} training case(s)")
        train = train[:n_train]
    return {"seed": seed, "val_fraction": val_fraction, "n_train": n_train, "train": sorted(train),
            "val": val}


def auto_patch_size(
    shapes: Sequence[Sequence[int]], total_stride: Sequence[int], cap: int = 160
) -> tuple[int, ...]:
    """Median case shape rounded up to a multiple of the network stride, capped at ``cap`` voxels."""
    med = np.median(np.asarray(shapes), axis=0)
    return tuple(int(min(max(s, math.ceil(m / s) * s), max(s, cap // s * s)))
                 for m, s in zip(med, total_stride, strict=True))


@dataclass
class StepRecord:
    """What one optimiser step logged."""

    step: int
    loss: float
    lr: float
    phase: str


class Trainer:
    """The fine-tuning loop: one object per run folder.

    ``Trainer(cfg).fit()`` validates and preprocesses the dataset (cached), builds or resumes the
    model, then runs the schedule's phases. Files in ``cfg.out_dir``: ``finetune_config.json``,
    ``split.json``, ``metrics.jsonl`` (one JSON object per step and per validation),
    ``checkpoint_latest.pt`` (model, optimiser, step, RNG; atomic), and at the end ``model/``
    (:func:`s3d.hub.save_pretrained` + ``preprocessing.json``).

    Args:
        cfg: the run.
        model: use this network instead of :func:`prepare_model` (ignored on resume).
        on_step: called as ``on_step(trainer, record)`` after every step (e.g. to stop early).

    Example:
        >>> Trainer(FinetuneConfig("Dataset001", "runs/a", schedule="best", steps=1000)).fit()
    """

    def __init__(self, cfg: FinetuneConfig, model: ResEncUNet | None = None,
                 on_step: Callable[[Trainer, StepRecord], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.schedule = get_schedule(cfg.schedule)
        self.phases = self.schedule.plan(cfg.steps, cfg.warmup_steps, cfg.peak_lr)
        self.on_step = on_step
        self._given_model = model
        self.model: ResEncUNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase_index = -1
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.scaler: torch.amp.GradScaler | None = None
        self.history: list[StepRecord] = []
        self.val_history: list[dict[str, Any]] = []

    # -- data --------------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        from s3d.data.nnunet import (
            PreprocessingSpec,
            cached_cases,
            load_cached_case,
            preprocess_dataset,
            read_dataset_json,
            validate_dataset,
        )

        cfg = self.cfg
        raw = read_dataset_json(cfg.dataset)
        spec = PreprocessingSpec.from_dataset(raw, target_spacing_mm=cfg.target_spacing_mm)
        # voxels of cases already in the cache (unchanged since) were checked when they were preprocessed
        ds = validate_dataset(cfg.dataset, skip_voxels_for=cached_cases(raw, spec))
        self.dataset = ds
        cache = preprocess_dataset(ds, spec, progress=cfg.progress)
        split_path = self.out / "split.json"
        if split_path.exists():
            split = json.loads(split_path.read_text())
            missing = sorted(set(split["train"] + split["val"]) - set(ds.cases))
            if missing:
                raise ValueError(f"{split_path}: case(s) {missing[:5]} are not in {ds.root}; remove the file "
                                 "to make a new split")
            want = {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "n_train": cfg.n_train}
            have = {k: split.get(k) for k in want}
            if have != want:
                raise ValueError(f"{split_path}: made with {have}, this run asks for {want}; "
                                 "use a new out_dir")
        else:
            split = make_split(ds.cases, cfg.val_fraction, cfg.seed, cfg.n_train)
            write_json_atomic(split_path, split)
        self.split = split

        def load(names: Sequence[str]) -> list[CachedCase]:
            out = []
            for n in names:
                data, seg, props, locs = load_cached_case(cache, n)
                out.append(CachedCase(n, data, seg, locs))
            return out

        self.train_cases = load(split["train"])
        self.val_cases = load(split["val"][: cfg.num_val_cases] if cfg.num_val_cases else split["val"])
        self.spec = spec
        self.labels = sorted(v for v in ds.labels.values() if v != 0)

    # -- model and optimiser -----------------------------------------------------------------------
    def _build_model(self, state: dict[str, Any] | None) -> None:
        cfg, ds = self.cfg, self.dataset
        if state is not None:
            from s3d.nn.config import ResEncUNetConfig

            mcfg = ResEncUNetConfig.from_json(state["model_config"])
            model = build_resenc_unet(mcfg)
            model.load_state_dict(state["model"])
        elif self._given_model is not None:
            model = self._given_model
        else:
            transfer = cfg.strategy or self.schedule.transfer
            source = None if transfer == "none" else cfg.pretrained
            if transfer != "none" and cfg.pretrained is None:
                print(f"schedule {self.schedule.name!r} transfers weights but no --pretrained was given: "
                      "training from scratch")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # fresh weights (scratch, new head/decoder/stem) follow the seed
                model = prepare_model(source, in_channels=ds.num_channels, num_classes=ds.num_classes,
                                      strategy="all" if transfer == "none" else transfer,  # type: ignore[arg-type]
                                      stem=cfg.stem, config=cfg.config)  # type: ignore[arg-type]
        model.deep_supervision = cfg.deep_supervision
        model.to(self.device).train()
        if cfg.channels_last and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last_3d)
        if model.config.in_channels != ds.num_channels or model.config.num_classes != ds.num_classes:
            raise ValueError(f"model has {model.config.in_channels} input channel(s) and "
                             f"{model.config.num_classes} classes; the dataset needs {ds.num_channels} and "
                             f"{ds.num_classes}")
        self.model = model
        ps = cfg.patch_size or self.spec.patch_size
        if ps is None:
            ps = auto_patch_size([c.seg.shape for c in self.train_cases], model.config.total_stride)
        from s3d.nn.resenc_unet import check_spatial_size

        problem = check_spatial_size(tuple(ps), model.config.total_stride)
        if problem:
            raise ValueError(f"patch_size {tuple(ps)}: {problem}")
        self.patch_size = tuple(int(p) for p in ps)
        self.spec.patch_size = self.patch_size  # type: ignore[assignment]

    def _trainable(self, phase: Phase) -> list[nn.Parameter]:
        assert self.model is not None
        if phase.trains == "all":
            params = list(self.model.parameters())
        else:
            params = decoder_parameters(self.model)
            if phase.name == "warmup_decoder" and self.cfg.train_stem_in_decoder_warmup:
                params += list(self.model.encoder.stem.parameters())
        ids = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
            if id(p) not in ids:
                p.grad = None
        return params

    def _enter_phase(self, index: int, optimizer_state: dict[str, Any] | None = None) -> None:
        """Switch to phase ``index``; a new SGD when the trainable set changes, else keep momentum."""
        new, old = self.phases[index], (self.phases[self.phase_index] if self.phase_index >= 0 else None)
        params = self._trainable(new)
        opt = self.optimizer
        current = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()
        same = old is not None and current == {id(p) for p in params}
        if self.optimizer is None or not same or optimizer_state is not None:
            self.optimizer = torch.optim.SGD(params, lr=lr_at(self.phases, new.start, self.cfg.poly_exponent),
                                             momentum=self.cfg.momentum, nesterov=True,
                                             weight_decay=self.cfg.weight_decay)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
        self.phase_index = index

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """``out_dir/checkpoint_latest.pt``."""
        return self.out / "checkpoint_latest.pt"

    def save_checkpoint(self) -> None:
        """Write model, optimiser (and its phase), step, RNG and scaler state atomically."""
        assert self.model is not None and self.optimizer is not None
        state = {
            "format": "s3d-finetune-checkpoint/1",
            "step": self.step,
            "optimizer_phase": self.phase_index,
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_json(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "finetune_config": json.dumps(self.cfg.to_dict()),
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> dict[str, Any]:
        path = self.checkpoint_path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["finetune_config"])
        now = self.cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in FinetuneConfig.RESUME_KEYS
                if saved.get(k) != now[k]]
        if diff:
            raise ValueError(f"{path}: cannot resume with different settings ({'; '.join(diff)})")
        return state

    # -- the loop ----------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def _autocast(self):
        if self.amp_dtype is None:
            return _null()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases (tiled prediction in preprocessed space)."""
        assert self.model is not None
        self.model.eval()
        per_case = []
        for case in self.val_cases:
            pred = predict_tiled(self.model, np.asarray(case.data), self.patch_size, self.device,
                                 self._autocast)
            per_case.append(dice_per_label(pred, np.asarray(case.seg), self.labels))
        self.model.train()
        per_label = {str(v): float(np.nanmean([d[v] for d in per_case])) if per_case else float("nan")
                     for v in self.labels}
        mean = float(np.nanmean(list(per_label.values()))) if per_label else float("nan")
        rec = {"step": self.step, "val_dice": mean, "val_dice_per_label": per_label}
        self.val_history.append(rec)
        self._log(rec)
        return rec

    def train_step(self) -> StepRecord:
        """One optimiser step at ``self.step`` (phase switch, lr, batch, forward, backward, clip, update)."""
        assert self.model is not None
        cfg = self.cfg
        index = phase_at(self.phases, self.step)
        if index != self.phase_index:
            self._enter_phase(index)
        assert self.optimizer is not None
        lr = lr_at(self.phases, self.step, cfg.poly_exponent)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = sample_patches(self.train_cases, cfg.batch_size, self.patch_size, self.gen,
                              cfg.foreground_fraction)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.augment:
            x, y = augment_batch(x, y, self.gen)
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(x)
        loss = self.loss_fn(out, y)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        return StepRecord(self.step, float(loss.detach()), lr, self.phases[index].name)

    def fit(self, resume: bool = False) -> ResEncUNet:
        """Run (or, with ``resume``, continue) the schedule; returns the trained model.

        Resuming restores model, optimiser, step and RNG from ``checkpoint_latest.pt``; the lr is a
        function of the step, so it continues exactly where the checkpoint left off.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint() if resume else None
        if not resume and self.checkpoint_path.exists():
            raise FileExistsError(f"{self.checkpoint_path} exists: pass resume=True (--resume) to continue, "
                                  "or use a new out_dir")
        write_json_atomic(self.out / "finetune_config.json", cfg.to_dict())
        self._prepare_data()
        self._build_model(state)
        self.loss_fn = DiceCELoss()
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        if state is not None:
            self.step = int(state["step"])
            self._enter_phase(int(state["optimizer_phase"]), optimizer_state=state["optimizer"])
            self.gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self._truncate_log(self.step)
        elif (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="finetune", disable=not cfg.progress, unit="step")
        t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                self.history.append(rec)
                self._log({"step": rec.step, "loss": rec.loss, "lr": rec.lr, "phase": rec.phase,
                           "time_s": round(time.perf_counter() - t0, 3)})
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", phase=rec.phase)
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    v = self.validate()
                    bar.write(f"step {self.step}: validation Dice {v['val_dice']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, rec)
        finally:
            bar.close()
        self.export(self.out / "model")
        return self.model  # type: ignore[return-value]

    def export(self, directory: str | os.PathLike[str]) -> Path:
        """Save the model (no deep supervision) with ``save_pretrained`` plus ``preprocessing.json``."""
        from s3d.hub import save_pretrained

        assert self.model is not None
        model = self.model
        ds_flag = model.deep_supervision
        model.deep_supervision = False
        try:
            run = {k: v for k, v in self.cfg.to_dict().items() if k not in ("dataset", "out_dir")}
            recipe = {"finetune": run,
                      "steps_done": self.step, "schedule": dataclasses.asdict(self.schedule)}
            out = save_pretrained(model, directory, recipe=recipe)
        finally:
            model.deep_supervision = ds_flag
        self.spec.save(Path(out) / "preprocessing.json")
        return Path(out)


def finetune(dataset: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, resume: bool = False,
             model: ResEncUNet | None = None, **kwargs: Any) -> ResEncUNet:
    """Fine-tune on an nnU-Net v2 raw dataset; keyword arguments are :class:`FinetuneConfig` fields.

    Returns:
        The trained model; ``out_dir/model`` holds it for ``s3d predict -m``.

    Example:
        >>> net = finetune("Dataset001_Brain", "runs/brain", pretrained="s3d-b", schedule="best",
        ...                steps=37_500, warmup_steps=12_500)
    """
    cfg = FinetuneConfig(dataset=str(dataset), out_dir=str(out_dir), **kwargs)
    return Trainer(cfg, model=model).fit(resume=resume)


__all__ = [
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "TABLE8_STEPS",
    "AugmentConfig",
    "DiceCELoss",
    "FinetuneConfig",
    "Phase",
    "Schedule",
    "Trainer",
    "augment_batch",
    "decoder_parameters",
    "encoder_parameters",
    "finetune",
    "get_schedule",
    "lr_at",
    "make_split",
    "phase_at",
    "prepare_model",
    "sample_patches",
]
