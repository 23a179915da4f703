"""Which encoder engine really ran in a ``SparseMAEWrapper`` forward (for the sparse-wrapper tests)."""

from __future__ import annotations

import pytest
import torch

import s3d.sparse.block_engine as block_engine_mod
from s3d.sparse.wrapper import MAEOutput, SparseMAEWrapper


def forward_and_engine(mae: SparseMAEWrapper, x: torch.Tensor, **kw) -> tuple[MAEOutput, str]:
    """``mae(x, **kw)`` and the engine that actually computed the encoder features.

    "dense": the encoder's own (masked-dense) forward ran; "blocks": the block layout
    (:meth:`BlockLayout.to_blocks`) was built and the encoder's forward did not run. The probe looks
    at what executed, not at the engine's name, so swapping one engine's implementation for the
    other's is caught.
    """
    ran = {"dense": 0, "blocks": 0}
    hook = mae.backbone.encoder.register_forward_hook(lambda *_: ran.__setitem__("dense", ran["dense"] + 1))
    to_blocks = block_engine_mod.BlockLayout.to_blocks

    def spy(self, t):
        ran["blocks"] += 1
        return to_blocks(self, t)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(block_engine_mod.BlockLayout, "to_blocks", spy)
            out = mae(x, **kw)
    finally:
        hook.remove()
    assert (ran["dense"] > 0) != (ran["blocks"] > 0), ran
    return out, "dense" if ran["dense"] else "blocks"
