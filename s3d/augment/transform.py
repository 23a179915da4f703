"""Apply drawn parameters to a batch (:func:`apply`) or draw and apply in one call (:class:`Augment`)."""

from __future__ import annotations

import torch

from s3d.augment.config import AugmentConfig
from s3d.augment.intensity import intensity_transform
from s3d.augment.params import AugmentParams
from s3d.augment.spatial import mirror, rotate_and_scale


def apply(x: torch.Tensor, params: AugmentParams, labels: torch.Tensor | None = None, *,
          label_interpolation: str = "linear") -> tuple[torch.Tensor, torch.Tensor | None]:
    """nnU-Net's order: rotation and scaling of images and labels, intensity transforms of the images,
    then mirroring of both.

    Args:
        x: images (B, C, D, H, W), floating point, on any device.
        params: drawn for this batch (:meth:`AugmentConfig.sample`), B samples and C channels.
        labels: optional label maps (B, D, H, W), integer, on ``x``'s device.
        label_interpolation: ``"linear"`` (one-hot, trilinear, argmax; nnU-Net's) or ``"nearest"``.

    Returns:
        ``(x, labels)`` augmented (``labels`` is ``None`` when not given); shapes and dtypes kept.

    Raises:
        ValueError: ``x`` is not 5-D, ``labels`` does not match it, or ``params`` has other shapes.

    Example:
        >>> x = torch.randn(2, 1, 8, 8, 8)
        >>> torch.equal(apply(x, AugmentParams.identity(2))[0], x)
        True
    """
    if x.dim() != 5:
        raise ValueError(f"x: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    if labels is not None and (labels.shape[0] != x.shape[0] or labels.shape[1:] != x.shape[2:]):
        raise ValueError(f"labels: expected (B, D, H, W) = {(x.shape[0], *x.shape[2:])}, got {tuple(labels.shape)}")
    params.check(x.shape[0], x.shape[1])
    x, labels = rotate_and_scale(x, params, labels, label_interpolation=label_interpolation)
    x = mirror(intensity_transform(x, params), params.flip)
    return x, (None if labels is None else mirror(labels, params.flip))


class Augment:
    """Draw :class:`AugmentParams` from a CPU generator and apply them.

    Args:
        config: probabilities and ranges; default :class:`AugmentConfig` () (fine-tuning, nnU-Net's).

    Example:
        >>> aug = Augment(AugmentConfig.pretraining())
        >>> x = aug(torch.randn(2, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 labels: torch.Tensor | None = None):
        """Augment ``x`` (B, C, D, H, W) and optional ``labels`` (B, D, H, W).

        Returns:
            The images, or ``(images, labels)`` when ``labels`` is given.
        """
        params = self.config.sample(x.shape[0], generator, channels=x.shape[1])
        out, lab = apply(x, params, labels, label_interpolation=self.config.label_interpolation)
        return out if labels is None else (out, lab)
