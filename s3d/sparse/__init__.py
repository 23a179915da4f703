"""Sparse masked-autoencoder pre-training (S3D): block masks, masked encoder primitives,
mask tokens and densification, and :class:`SparseMAEWrapper`.

Mask polarity everywhere in s3d: ``keep``/``mask`` holds 1 (True) for visible voxels or cells
and 0 (False) for masked ones.
"""

from s3d.nn.masked import expand_keep, masked_instance_norm, stage_keeps
from s3d.sparse.block_engine import DEFAULT_MIN_BLOCK_EDGE, BlockLayout, block_encoder_forward, block_plan
from s3d.sparse.densify import Densifier
from s3d.sparse.mask import block_grid_size, check_mask_ratio, realised_mask_ratio, sample_block_mask
from s3d.sparse.wrapper import ENGINES, MAEOutput, SparseMAEWrapper, keep_at_input, masked_mse_loss

__all__ = [
    "DEFAULT_MIN_BLOCK_EDGE",
    "BlockLayout",
    "block_encoder_forward",
    "block_plan",
    "ENGINES",
    "Densifier",
    "MAEOutput",
    "SparseMAEWrapper",
    "block_grid_size",
    "check_mask_ratio",
    "expand_keep",
    "keep_at_input",
    "masked_instance_norm",
    "masked_mse_loss",
    "realised_mask_ratio",
    "sample_block_mask",
    "stage_keeps",
]
