"""nnU-Net v2 raw datasets in (moving: split into modules in the next commit)."""

from s3d.data.nnunet.dataset import *  # noqa: F403
