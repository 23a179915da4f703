"""engine="auto" picks the measured default per device, and any tiling mask works with "blocks"."""

from __future__ import annotations

import torch

import s3d
from s3d.sparse.wrapper import AUTO_ENGINE, resolve_engine


def test_auto_engine_per_device() -> None:
    assert resolve_engine("auto", torch.device("cpu")) == "blocks" == AUTO_ENGINE["cpu"]
    assert resolve_engine("auto", torch.device("cuda", 0)) == "dense"  # not measured on GPUs yet
    assert resolve_engine("dense", torch.device("cpu")) == "dense"
    assert s3d.SparseMAEWrapper(s3d.build_resenc_unet("tiny", num_classes=1)).engine == "auto"


def test_blocks_engine_takes_masks_on_any_grid_that_tiles_the_input() -> None:
    net = s3d.build_resenc_unet("tiny", num_classes=1)
    x = torch.randn(2, 1, 32, 32, 32)
    gen = torch.Generator().manual_seed(3)
    for grid in (2, 4, 32):  # 16^3, 8^3 and 1-voxel cells on a wrapper built for 16^3 blocks
        keep = torch.rand(2, 1, grid, grid, grid, generator=gen) > 0.5
        keep[:, :, 0, 0, 0] = True
        outs = {}
        mae = s3d.SparseMAEWrapper(net, block_size=16)
        for engine in ("dense", "blocks"):
            mae.engine = engine  # same wrapper: same mask tokens and densify convs
            with torch.no_grad():
                outs[engine] = mae(x, mask=keep).reconstruction
        torch.testing.assert_close(outs["blocks"], outs["dense"], rtol=1e-4, atol=1e-4)
