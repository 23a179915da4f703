"""The random values of one batch's augmentation (:class:`AugmentParams`): replayable, checkable."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AugmentParams:
    """Every random value of one batch's augmentation (B samples, C channels); replayable.

    Fields come in the order the transforms are applied (nnU-Net's): rotation and scaling, Gaussian
    noise, Gaussian blur, brightness, contrast, low-resolution simulation, inverted gamma, gamma,
    mirroring. Each holds its "off" value (in brackets) where the transform is not applied.

    Attributes:
        angles: (B, 3) float64 radians, rotation about axes D, H, W (0).
        scale: (B,) float64 isotropic scale factor (1; > 1 shows more of the image).
        flip: (B, 3) bool, mirror along D, H, W (False).
        noise_sd: (B,) float64 standard deviation of additive Gaussian noise, all channels (0).
        blur_sigma: (B, C, 3) float64 Gaussian blur sigma in voxels along D, H, W (0).
        brightness: (B, C) float64 multiplicative factor (1).
        contrast: (B, C) float64 contrast factor around the channel mean (1).
        lowres_scale: (B, C) float64 zoom factor of the low-resolution simulation, all axes (1).
        gamma_inverted: (B, C) float64 gamma applied to the inverted channel (1).
        gamma: (B, C) float64 gamma on the [0, 1]-rescaled channel (1).
        noise_seed: seed of the device generator that draws the noise field.
    """

    angles: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor
    noise_sd: torch.Tensor
    blur_sigma: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    lowres_scale: torch.Tensor
    gamma_inverted: torch.Tensor
    gamma: torch.Tensor
    noise_seed: int = 0

    @classmethod
    def identity(cls, batch: int, channels: int = 1) -> AugmentParams:
        """Parameters that leave every sample unchanged.

        Example:
            >>> AugmentParams.identity(2).scale
            tensor([1., 1.], dtype=torch.float64)
        """
        f64 = torch.float64

        def ones(*shape: int) -> torch.Tensor:
            return torch.ones(shape, dtype=f64)

        return cls(angles=torch.zeros(batch, 3, dtype=f64), scale=ones(batch),
                   flip=torch.zeros(batch, 3, dtype=torch.bool), noise_sd=torch.zeros(batch, dtype=f64),
                   blur_sigma=torch.zeros(batch, channels, 3, dtype=f64), brightness=ones(batch, channels),
                   contrast=ones(batch, channels), lowres_scale=ones(batch, channels),
                   gamma_inverted=ones(batch, channels), gamma=ones(batch, channels))

    @property
    def batch(self) -> int:
        """B."""
        return int(self.angles.shape[0])

    def check(self, batch: int, channels: int) -> None:
        """Raise ``ValueError`` unless every field has the shape for ``batch`` samples of ``channels`` channels.

        Example:
            >>> AugmentParams.identity(2, 3).check(2, 3)
        """
        per_channel = (batch, channels)
        want = {"angles": (batch, 3), "scale": (batch,), "flip": (batch, 3), "noise_sd": (batch,),
                "blur_sigma": (batch, channels, 3), "brightness": per_channel, "contrast": per_channel,
                "lowres_scale": per_channel, "gamma_inverted": per_channel, "gamma": per_channel}
        bad = {k: tuple(getattr(self, k).shape) for k, v in want.items() if tuple(getattr(self, k).shape) != v}
        if bad:
            raise ValueError(f"params: expected shapes {want} for B={batch}, C={channels}; got {bad}")
