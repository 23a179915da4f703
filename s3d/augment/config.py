"""Augmentation settings (:class:`AugmentConfig`) and how parameters are drawn from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from s3d.augment.params import AugmentParams

LABEL_INTERPOLATIONS = ("linear", "nearest")


@dataclass
class AugmentConfig:
    """Probabilities and ranges of every transform; the defaults are nnU-Net's training augmentation.

    ``AugmentConfig()`` equals nnU-Net v2's default 3D training transforms (``get_training_transforms``
    with batchgeneratorsv2), in its order: rotation and scaling, Gaussian noise, Gaussian blur,
    brightness, contrast, low-resolution simulation, inverted gamma, gamma, mirroring
    (``docs/finetuning.md``, section Augmentation, compares them field by field).
    :meth:`pretraining` is the paper's light pre-training augmentation (spatial transforms only).

    A ``p_*`` without ``_per_channel`` is the probability per sample; a transform that is on then changes
    every channel with its own factor, except blur and low resolution, which also pick each channel
    with ``p_*_per_channel``. Factors drawn "split" (``factor_split``) are U(lo, 1) or U(1, hi) with
    probability 1/2 each (nnU-Net's ``BGContrast``); otherwise U(lo, hi).

    Attributes:
        p_rotation, rotation_deg: rotate about each of the three axes by U(-deg, deg) degrees.
        p_scale, scale_range: isotropic scale factor U(lo, hi) (> 1 shows more of the image).
        label_interpolation: ``"linear"`` (one-hot maps resampled trilinearly, then argmax, as nnU-Net)
            or ``"nearest"``; label voxels sampled from outside the patch are 0 either way.
        p_noise, noise_sd: additive Gaussian noise, standard deviation U(lo, hi), the same for all channels.
        p_blur, p_blur_per_channel, blur_sigma: Gaussian blur, sigma U(lo, hi) voxels per channel and axis.
        p_brightness, brightness: multiply each channel by a split factor.
        p_contrast, contrast: scale around the channel mean by a split factor, clipped to the old range.
        p_lowres, p_lowres_per_channel, lowres_scale: zoom each channel by U(lo, hi) (nearest) and back
            (trilinear), one factor for all axes.
        p_gamma_inverted: gamma (split factor from ``gamma``) on the inverted [0, 1]-rescaled channel.
        p_gamma, gamma: gamma (split factor) on the [0, 1]-rescaled channel; mean and std kept (both gammas).
        factor_split: draw brightness, contrast and gamma factors split at 1 (see above).
        p_mirror: flip each axis independently.
    """

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    label_interpolation: str = "linear"
    p_noise: float = 0.1
    noise_sd: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_per_channel: float = 0.5
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    factor_split: bool = True
    p_mirror: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_") and not 0 <= v <= 1:
                raise ValueError(f"AugmentConfig.{f.name}: a probability in [0, 1], got {v}")
            if isinstance(v, (tuple, list)):
                if len(v) != 2 or not v[0] <= v[1]:
                    raise ValueError(f"AugmentConfig.{f.name}: expected (lo, hi) with lo <= hi, got {v}")
                setattr(self, f.name, (float(v[0]), float(v[1])))
        for name in ("scale_range", "gamma", "blur_sigma", "lowres_scale"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"AugmentConfig.{name}: expected values > 0, got {getattr(self, name)}")
        if self.noise_sd[0] < 0:
            raise ValueError(f"AugmentConfig.noise_sd: a standard deviation >= 0, got {self.noise_sd}")
        if self.lowres_scale[1] > 1:
            raise ValueError(f"AugmentConfig.lowres_scale: a zoom factor in (0, 1], got {self.lowres_scale}")
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(f"AugmentConfig.label_interpolation: one of {LABEL_INTERPOLATIONS}, "
                             f"got {self.label_interpolation!r}")

    @classmethod
    def pretraining(cls) -> AugmentConfig:
        """The paper's pre-training augmentation (nnssl's defaults): with probability 0.2 a rotation by
        U(-30, 30) degrees about each axis, with probability 0.2 a scale U(0.7, 1.4), mirroring with
        probability 0.5 per axis; no intensity transforms.

        Example:
            >>> AugmentConfig.pretraining().p_gamma
            0.0
        """
        return cls(p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
                   p_gamma_inverted=0.0, p_gamma=0.0)

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every probability 0 (the identity).

        Example:
            >>> AugmentConfig.off().p_mirror
            0.0
        """
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.startswith("p_")})

    def sample(self, batch: int, generator: torch.Generator | None = None, *, channels: int = 1) -> AugmentParams:
        """Draw the parameters of ``batch`` samples of ``channels`` channels from ``generator`` (CPU).

        The draws come in a fixed order and number (spatial first, then the intensity transforms in the
        order they are applied), whatever the probabilities: the spatial parameters of a seed do not
        depend on the intensity settings, and pre-training's draws are those of earlier versions.

        Example:
            >>> p = AugmentConfig().sample(4, torch.Generator().manual_seed(0), channels=2)
            >>> p.flip.shape, p.blur_sigma.shape
            (torch.Size([4, 3]), torch.Size([4, 2, 3]))
        """
        g, f64 = generator, torch.float64

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=g, dtype=f64)

        def uniform(bounds: tuple[float, float], *shape: int) -> torch.Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * rand(*shape)

        # spatial: this order and these draws are fixed (pre-training reproducibility across versions)
        rot_on = rand(batch) < self.p_rotation
        angles = (rand(batch, 3) * 2 - 1) * math.radians(self.rotation_deg) * rot_on[:, None]
        scale_on = rand(batch) < self.p_scale
        scale = torch.where(scale_on, uniform(self.scale_range, batch), torch.ones(batch, dtype=f64))
        flip = rand(batch, 3) < self.p_mirror

        def per_sample(p: float) -> torch.Tensor:  # (B, 1) bool
            return (rand(batch) < p)[:, None]

        def split_factor(p: float, bounds: tuple[float, float]) -> torch.Tensor:
            on = per_sample(p)
            lower, u = rand(batch, channels) < 0.5, rand(batch, channels)
            lo, hi = bounds
            if self.factor_split and lo < 1:
                mid = max(lo, 1.0)
                v = torch.where(lower, lo + (1 - lo) * u, mid + (hi - mid) * u)
            else:
                v = lo + (hi - lo) * u
            return torch.where(on, v, torch.ones_like(v))

        noise_on = rand(batch) < self.p_noise
        noise_sd = torch.where(noise_on, uniform(self.noise_sd, batch), torch.zeros(batch, dtype=f64))
        blur_on = per_sample(self.p_blur) & (rand(batch, channels) < self.p_blur_per_channel)
        blur_sigma = uniform(self.blur_sigma, batch, channels, 3) * blur_on[..., None]
        brightness = split_factor(self.p_brightness, self.brightness)
        contrast = split_factor(self.p_contrast, self.contrast)
        lowres_on = per_sample(self.p_lowres) & (rand(batch, channels) < self.p_lowres_per_channel)
        lowres_scale = torch.where(lowres_on, uniform(self.lowres_scale, batch, channels),
                                   torch.ones(batch, channels, dtype=f64))
        gamma_inverted = split_factor(self.p_gamma_inverted, self.gamma)
        gamma = split_factor(self.p_gamma, self.gamma)
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return AugmentParams(angles=angles, scale=scale, flip=flip, noise_sd=noise_sd, blur_sigma=blur_sigma,
                             brightness=brightness, contrast=contrast, lowres_scale=lowres_scale,
                             gamma_inverted=gamma_inverted, gamma=gamma, noise_seed=seed)
