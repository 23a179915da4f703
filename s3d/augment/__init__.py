"""Batched augmentation on the training device: one module for images and image/label pairs.

One coordinate convention, one config class, one parameter object:

- :class:`AugmentConfig` holds every probability and range. ``AugmentConfig()`` is the fine-tuning
  default, nnU-Net v2's training augmentation (rotation, scaling, Gaussian noise, Gaussian blur,
  brightness, contrast, low-resolution simulation, inverted gamma, gamma, mirroring, in that order);
  :meth:`AugmentConfig.pretraining` is the paper's light pre-training augmentation (rotation,
  scaling, mirroring only).
- :meth:`AugmentConfig.sample` draws an :class:`AugmentParams` for a batch from a CPU
  ``torch.Generator``: every random value a transform uses is in it, so a draw can be replayed
  exactly (and a spatial one inverted, :func:`~s3d.augment.spatial.sampling_matrices`).
- :func:`apply` applies the parameters to images (B, C, D, H, W) and, if given, label maps
  (B, D, H, W): the same spatial transform moves both (images trilinear, labels as one-hot maps
  trilinearly then argmax, as nnU-Net, or nearest), the same flips mirror both, intensity transforms
  touch images only.

Geometry (:mod:`~s3d.augment.spatial`): spatial axes are the array's (D, H, W) voxel axes. An output
voxel ``p`` reads the input at ``M (p - c) + c``, ``c`` the patch centre, ``M = scale * R^T``: a
rotation by +90 degrees about axis 0 equals ``torch.rot90(x, 1, dims=(3, 4))``, and a scale > 1 shows
more of the image (content shrinks), as in batchgenerators. Samples with neither rotation nor scaling
are not resampled (bit-exact); mirroring is an exact ``torch.flip``.

Example:
    >>> aug = Augment()                                   # fine-tuning defaults
    >>> x, y = aug(images, torch.Generator().manual_seed(0), labels=labels)
    >>> x = Augment(AugmentConfig.pretraining())(images, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from s3d.augment.config import AugmentConfig
from s3d.augment.params import AugmentParams
from s3d.augment.spatial import mirror, plane_rotation, sampling_matrices
from s3d.augment.transform import Augment, apply

__all__ = ["Augment", "AugmentConfig", "AugmentParams", "apply", "mirror", "plane_rotation", "sampling_matrices"]
