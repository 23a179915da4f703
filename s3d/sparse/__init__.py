"""Sparse masked-autoencoder pre-training (S3D): block masks, the mask plan, masked encoder primitives,
mask tokens and densification, and :class:`SparseMAEWrapper`.

Mask polarity everywhere in s3d: 1 (True) = visible, 0 (False) = masked (stated in :mod:`s3d.sparse.plan`).
"""

from s3d.nn.masked import expand_keep, masked_instance_norm, stage_keeps
from s3d.sparse.block_engine import DEFAULT_MIN_BLOCK_EDGE, block_encoder_forward, block_plan, blocks_engine
from s3d.sparse.densify import Densifier
from s3d.sparse.engines import ENGINES, EncoderEngine
from s3d.sparse.layout import BlockLayout
from s3d.sparse.mask import block_grid_size, check_mask_ratio, realised_mask_ratio, sample_block_mask
from s3d.sparse.plan import MaskPlan
from s3d.sparse.primus_mae import PrimusMAEWrapper, sample_token_keep
from s3d.sparse.wrapper import MAEOutput, SparseMAEWrapper, keep_at_input, masked_mse_loss

__all__ = [
    "PrimusMAEWrapper",
    "sample_token_keep",
    "DEFAULT_MIN_BLOCK_EDGE",
    "BlockLayout",
    "block_encoder_forward",
    "block_plan",
    "blocks_engine",
    "ENGINES",
    "EncoderEngine",
    "MaskPlan",
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
