"""Augmentation settings (:class:`AugmentConfig`) and the parameters drawn from them (:class:`AugmentParams`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class AugmentParams:
    """Every random value of one batch's augmentation (B samples, C channels); replayable.

    Attributes:
        angles: (B, 3) float64 radians, rotation about axes D, H, W (0 = none).
        scale: (B,) float64 isotropic scale factor (1 = none; > 1 shows more of the image).
        flip: (B, 3) bool, mirror along D, H, W.
        brightness: (B, C) float64 multiplicative factor (1 = none).
        contrast: (B, C) float64 contrast factor around the channel mean (1 = none).
        gamma: (B, C) float64 gamma on the [0, 1]-rescaled channel (1 = none).
        noise_sd: (B,) float64 standard deviation of additive Gaussian noise (0 = none).
        noise_seed: seed of the device generator that draws the noise field.
    """

    angles: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor
    noise_sd: torch.Tensor
    noise_seed: int = 0

    @classmethod
    def identity(cls, batch: int, channels: int = 1) -> AugmentParams:
        """Parameters that leave every sample unchanged.

        Example:
            >>> AugmentParams.identity(2).scale
            tensor([1., 1.], dtype=torch.float64)
        """
        f64 = torch.float64
        return cls(torch.zeros(batch, 3, dtype=f64), torch.ones(batch, dtype=f64),
                   torch.zeros(batch, 3, dtype=torch.bool), torch.ones(batch, channels, dtype=f64),
                   torch.ones(batch, channels, dtype=f64), torch.ones(batch, channels, dtype=f64),
                   torch.zeros(batch, dtype=f64))

    @property
    def batch(self) -> int:
        """B."""
        return int(self.angles.shape[0])

    def check(self, batch: int, channels: int) -> None:
        """Raise ``ValueError`` unless every field has the shape for ``batch`` samples of ``channels`` channels."""
        want = {"angles": (batch, 3), "scale": (batch,), "flip": (batch, 3), "brightness": (batch, channels),
                "contrast": (batch, channels), "gamma": (batch, channels), "noise_sd": (batch,)}
        bad = {k: tuple(getattr(self, k).shape) for k, v in want.items() if tuple(getattr(self, k).shape) != v}
        if bad:
            raise ValueError(f"params: expected shapes {want} for B={batch}, C={channels}; got {bad}")


@dataclass
class AugmentConfig:
    """Probabilities (per sample; per sample and channel for intensity) and ranges of every transform.

    The defaults are the fine-tuning augmentation (nnU-Net-like); :meth:`pretraining` is the
    paper's light pre-training augmentation (spatial transforms only).

    Attributes:
        p_rotation, rotation_deg: rotate about each of the three axes by U(-deg, deg) degrees.
        p_scale, scale_range: isotropic scale factor U(lo, hi) (> 1 shows more of the image).
        p_mirror: flip each axis independently.
        p_brightness, brightness: multiply the channel by U(lo, hi).
        p_contrast, contrast: scale around the channel mean by U(lo, hi), clipped to the old range.
        p_gamma, gamma: gamma U(lo, hi) on the [0, 1]-rescaled channel, its mean and std kept.
        p_noise, noise_var: additive Gaussian noise with variance U(0, noise_var).
    """

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_var: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_") and not 0 <= v <= 1:
                raise ValueError(f"AugmentConfig.{f.name}: a probability in [0, 1], got {v}")
            if isinstance(v, (tuple, list)):
                if len(v) != 2 or not v[0] <= v[1]:
                    raise ValueError(f"AugmentConfig.{f.name}: expected (lo, hi) with lo <= hi, got {v}")
                setattr(self, f.name, (float(v[0]), float(v[1])))

    @classmethod
    def pretraining(cls) -> AugmentConfig:
        """The paper's pre-training augmentation (nnssl's defaults): with probability 0.2 a rotation by
        U(-30, 30) degrees about each axis, with probability 0.2 a scale U(0.7, 1.4), mirroring with
        probability 0.5 per axis; no intensity transforms.

        Example:
            >>> AugmentConfig.pretraining().p_gamma
            0.0
        """
        return cls(p_brightness=0.0, p_contrast=0.0, p_gamma=0.0, p_noise=0.0)

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every probability 0 (the identity)."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.startswith("p_")})

    def sample(self, batch: int, generator: torch.Generator | None = None, *, channels: int = 1) -> AugmentParams:
        """Draw the parameters of ``batch`` samples of ``channels`` channels from ``generator`` (CPU).

        The draws come in a fixed order (spatial first), so the spatial parameters of a seed do not
        depend on the intensity settings.

        Example:
            >>> p = AugmentConfig().sample(4, torch.Generator().manual_seed(0), channels=2)
            >>> p.flip.shape, p.gamma.shape
            (torch.Size([4, 3]), torch.Size([4, 2]))
        """
        g, f64 = generator, torch.float64

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=g, dtype=f64)

        rot_on = rand(batch) < self.p_rotation
        angles = (rand(batch, 3) * 2 - 1) * math.radians(self.rotation_deg) * rot_on[:, None]
        scale_on = rand(batch) < self.p_scale
        lo, hi = self.scale_range
        scale = torch.where(scale_on, lo + (hi - lo) * rand(batch), torch.ones(batch, dtype=f64))
        flip = rand(batch, 3) < self.p_mirror

        def factor(p: float, bounds: tuple[float, float]) -> torch.Tensor:
            on = rand(batch, channels) < p
            v = bounds[0] + rand(batch, channels) * (bounds[1] - bounds[0])
            return torch.where(on, v, torch.ones_like(v))

        brightness = factor(self.p_brightness, self.brightness)
        contrast = factor(self.p_contrast, self.contrast)
        gamma = factor(self.p_gamma, self.gamma)
        noise_on = rand(batch) < self.p_noise
        noise_sd = (rand(batch) * self.noise_var).sqrt() * noise_on
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return AugmentParams(angles, scale, flip, brightness, contrast, gamma, noise_sd, seed)
