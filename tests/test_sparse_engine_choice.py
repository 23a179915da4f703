"""The unmeasured per-device table behind engine="auto", and any tiling mask works with "blocks".

How "auto" measures: tests/test_sparse_autotune.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_probe import forward_and_engine
from tolerance import assert_yardstick, max_rel

import s3d
import s3d.sparse.block_engine as block_engine_mod
from s3d.sparse.wrapper import AUTO_ENGINE, resolve_engine


def test_auto_engine_per_device() -> None:
    """What "auto" stands for without measuring (``S3D_ENGINE_AUTOTUNE=0``)."""
    assert resolve_engine("auto", torch.device("cpu")) == "blocks" == AUTO_ENGINE["cpu"]
    assert resolve_engine("auto", torch.device("cuda", 0)) == "dense"  # not measured on GPUs yet
    assert resolve_engine("dense", torch.device("cpu")) == "dense"
    assert s3d.SparseMAEWrapper(s3d.build_resenc_unet("tiny", num_classes=1)).engine == "auto"


@pytest.mark.parametrize(
    ("grid", "min_edge"),
    [
        # 16^3 cells: stem and stages 0-2 in blocks at the CPU default (edge 4)
        pytest.param(2, None, marks=pytest.mark.numerical),
        pytest.param(4, None, marks=pytest.mark.numerical),  # 8^3 cells: stem and stages 0-1 in blocks
        # 1-voxel cells: only with the crossover lowered to 1 (stem and stage 0 in blocks); not in the
        # second-ISA pass (time: 32^3 one-voxel blocks take minutes under SSE4.1)
        (32, 1),
    ],
)
def test_blocks_engine_takes_masks_on_any_grid_that_tiles_the_input(grid: int, min_edge: int | None) -> None:
    """A wrapper built for 16^3 blocks takes a keep grid of another cell size; blocks == dense.

    The blocks engine is judged against a float64 run of the dense engine, with the float32 dense engine
    as the yardstick (tests/tolerance.py).
    """
    torch.manual_seed(0)
    net = s3d.build_resenc_unet("tiny", num_classes=1).eval()
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, grid, grid, grid, generator=gen) > 0.5
    keep[:, :, 0, 0, 0] = True
    mae = s3d.SparseMAEWrapper(net, block_size=16)
    mae64 = copy.deepcopy(mae).double()
    mae64.engine = "dense"
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        if min_edge is not None:
            mp.setitem(block_engine_mod.DEFAULT_MIN_BLOCK_EDGE, "cpu", min_edge)
        for engine in ("dense", "blocks"):
            mae.engine = engine  # same wrapper: same mask tokens and densify convs
            with torch.no_grad():
                out, ran = forward_and_engine(mae, x, mask=keep)
            assert ran == engine
            outs[engine] = out.reconstruction
    with torch.no_grad():
        ref = mae64(x.double(), mask=keep).reconstruction
    assert_yardstick(max_rel(outs["blocks"], ref), max_rel(outs["dense"], ref), f"blocks, grid {grid}")


def test_one_voxel_cells_run_masked_dense_at_the_cpu_default() -> None:
    """Why the grid-32 case above lowers the crossover: at the default, "blocks" IS the dense forward.

    A 1-voxel cell is below the measured CPU crossover edge (4 voxels, docs/block_engine.md), so
    :func:`block_plan` puts no layer in block layout and the blocks engine calls the encoder's own
    masked-dense forward: the two engines then give bitwise equal results.
    """
    torch.manual_seed(0)
    net = s3d.build_resenc_unet("tiny", num_classes=1).eval()
    edge = block_engine_mod.default_min_block_edge("cpu")
    assert edge > 1 and block_engine_mod.block_plan(net.encoder, 1, edge) == [False] * 6
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5
    mae = s3d.SparseMAEWrapper(net, block_size=16)
    outs = {}
    for engine in ("dense", "blocks"):
        mae.engine = engine
        with torch.no_grad():
            out, ran = forward_and_engine(mae, x, mask=keep)
        assert ran == "dense"
        outs[engine] = out.reconstruction
    assert torch.equal(outs["blocks"], outs["dense"])
