"""The encoder engines: how the masked ("sparse") encoder runs, one contract, a registry by name.

An engine is called as ``engine(encoder, x, plan, **options)`` with the forward's
:class:`~s3d.sparse.plan.MaskPlan` and returns the masked encoder features, equal (to rounding) to the
masked-dense reference ``encoder(x, plan.keeps)``. :class:`~s3d.sparse.wrapper.SparseMAEWrapper` picks one
by name (``engine="dense"``, ``"blocks"``) or measures them (``"auto"``, :mod:`s3d.sparse.autotune`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from s3d.sparse.block_engine import blocks_engine
from s3d.sparse.plan import MaskPlan


class EncoderEngine(Protocol):
    """How the masked ("sparse") encoder runs: ``engine(encoder, x, plan, **options)``.

    Returns the encoder features, highest resolution first, exactly 0 at masked positions: whatever
    ``encoder(x, plan.keeps)`` returns, to rounding. It reads the :class:`~s3d.sparse.plan.MaskPlan`
    and derives nothing from the mask itself. Options an engine does not use are ignored (the autotuner
    passes ``min_block_edge``, the crossover edge of the "blocks" engine, voxels).
    """

    def __call__(self, encoder: nn.Module, x: torch.Tensor, plan: MaskPlan, /, **options: Any
                 ) -> list[torch.Tensor]: ...


def dense_engine(encoder: nn.Module, x: torch.Tensor, plan: MaskPlan, /, **_: Any) -> list[torch.Tensor]:
    """The "dense" (masked-dense) engine: dense kernels on zeroed inputs, re-masked after every layer
    (SparK-style), ``encoder(x, plan.keeps)``; the reference every engine equals."""
    return encoder(x, plan.keeps)


#: Registered encoder engines by name (:class:`EncoderEngine`); every engine must return what "dense" returns.
ENGINES: dict[str, EncoderEngine] = {"dense": dense_engine, "blocks": blocks_engine}

#: What ``engine="auto"`` runs per device type WITHOUT measuring (``S3D_ENGINE_AUTOTUNE=0``; normally
#: "auto" times the engines on the run's input, :mod:`s3d.sparse.autotune`). On CPU the block-sparse
#: engine was 1.3x/1.7x/1.9x faster per ResEnc-L step at 60/75/90 % masking (128^3, docs/block_engine.md).
AUTO_ENGINE: dict[str, str] = {"cpu": "blocks"}


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine name ``engine`` stands for on ``device`` without measuring (``"auto"``: :data:`AUTO_ENGINE`,
    else dense). What a wrapper really ran is in :attr:`SparseMAEWrapper.engine_choices`."""
    if engine == "auto":
        return AUTO_ENGINE.get(device.type, "dense")
    return engine
