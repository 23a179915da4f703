"""``engine="auto"``: time the encoder engines on the run's own input and keep the fastest.

Like cuDNN's benchmark mode, the first forward of :class:`s3d.SparseMAEWrapper` for a new
:class:`EngineKey` (device, network, input shape and dtype, autocast, mask cell, masking, grad mode)
runs every candidate on that call's ``(x, mask)``:

* ``"dense"``, the masked-dense reference;
* ``"blocks"`` at each crossover edge of :data:`CROSSOVER_EDGES` (``min_block_edge`` of
  :func:`s3d.sparse.block_engine.block_encoder_forward`: the smallest block edge, in voxels at a
  stage's resolution, that still runs in block layout). Edges that give the same
  :func:`~s3d.sparse.block_engine.block_plan` are one candidate; an edge that puts no layer in
  blocks is the dense engine and is dropped.

Each candidate runs ``warmup`` times, then up to ``repeats`` times round-robin (fewer when one round
exceeds ``budget_s``); the median decides. With gradients enabled a run is the encoder's forward
plus ``torch.autograd.grad`` with respect to its parameters (the backward of a training step, without
touching ``.grad`` or DDP's hooks); under ``no_grad`` it is the forward only. The torch RNG states are
restored afterwards and the wrapper then computes its output normally with the winner, so measuring
changes no number. The choice is cached in this process (:func:`cached_choices`), logged on the
``s3d.sparse.autotune`` logger (INFO) with every candidate's time, and under ``torch.distributed``
rank 0's choice is broadcast to all ranks (grad-enabled forwards only; those run on every rank).
``S3D_ENGINE_AUTOTUNE=0`` turns measuring off: ``"auto"`` then uses the fixed per-device table
(:func:`s3d.sparse.wrapper.resolve_engine`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from s3d.sparse.block_engine import block_plan, default_min_block_edge
from s3d.sparse.plan import MaskPlan

logger = logging.getLogger(__name__)

#: Crossover edges (voxels) tried for the blocks engine; measured CPU best was 4, the CUDA guess 8.
CROSSOVER_EDGES: tuple[int, ...] = (4, 8, 16, 32)

#: The clock the measurement reads (seconds); tests replace it with a fake one.
clock: Callable[[], float] = time.perf_counter

#: Runs per candidate: untimed-for-the-choice warm-ups, timed repeats at most, and the time (s) one
#: key's timed rounds may take (repeats shrink to 1 when a warm-up round says they would take longer).
WARMUP, REPEATS, BUDGET_S = 1, 3, 20.0

#: Choices made in this process, by key.
_CACHE: dict[EngineKey, EngineChoice] = {}


def autotune_enabled() -> bool:
    """False when the environment sets ``S3D_ENGINE_AUTOTUNE`` to ``0``/``false``/``no``/``off``."""
    return os.environ.get("S3D_ENGINE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class EngineKey:
    """What an engine choice holds for: one device, network, input and masking.

    Attributes:
        device: e.g. ``"cuda:0 NVIDIA H100"`` or ``"cpu 16 threads"``.
        network: the backbone config's name and a hash of its full repr (plus ``+ckpt`` when the
            encoder checkpoints its stages).
        shape: input shape (B, C, D, H, W), voxels.
        dtype: input dtype, plus the autocast dtype (``"float32/bfloat16"``) and ``",cl"`` for
            channels_last_3d.
        cell: mask cell edge per axis at the input resolution, voxels.
        masking: the wrapper's mask ratio spec for sampled masks (``"ratio U(0.6, 0.9)"``), or the
            masked fraction of a given mask rounded to 0.05 (``"masked 0.75"``).
        grad: timed as forward + backward (True) or forward only (False).
    """

    device: str
    network: str
    shape: tuple[int, ...]
    dtype: str
    cell: tuple[int, ...]
    masking: str
    grad: bool

    def describe(self) -> str:
        """One-line summary for logs."""
        return (f"{self.network} input {tuple(self.shape)} {self.dtype} cells {tuple(self.cell)} {self.masking} "
                f"on {self.device}")


class Candidate(NamedTuple):
    """One engine setting to time: ``engine`` name, its ``min_block_edge`` (None = not used) and label."""

    engine: str
    min_block_edge: int | None
    label: str


@dataclass
class EngineChoice:
    """The engine ``"auto"`` runs for one :class:`EngineKey`.

    Attributes:
        engine: ``"dense"`` or ``"blocks"``.
        min_block_edge: crossover edge for ``"blocks"`` (voxels), None for ``"dense"``.
        timings_ms: median milliseconds per candidate label (``"dense"``, ``"blocks@8"``, ...); empty
            when not measured (``source`` says where the choice came from).
        key: what it was chosen for.
        source: ``"measured"``, ``"rank 0"`` (broadcast under torch.distributed), ``"checkpoint"``
            (restored by a resumed run) or ``"table"`` (measuring off).
    """

    engine: str
    min_block_edge: int | None
    timings_ms: dict[str, float]
    key: EngineKey
    source: str = "measured"

    @property
    def label(self) -> str:
        """``"dense"`` or ``"blocks@EDGE"``."""
        return "dense" if self.engine == "dense" else f"blocks@{self.min_block_edge}"

    def message(self) -> str:
        """The log line: the choice, what it is for and every candidate's time."""
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in self.timings_ms.items()) or "not timed"
        what = "fwd+bwd" if self.key.grad else "fwd"
        return (f"sparse encoder engine 'auto' -> {self.label} ({self.source}) for {self.key.describe()}; "
                f"encoder {what}: {times}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (metrics.jsonl, checkpoints)."""
        return {"engine": self.engine, "min_block_edge": self.min_block_edge, "timings_ms": dict(self.timings_ms),
                "key": {**asdict(self.key), "shape": list(self.key.shape), "cell": list(self.key.cell)},
                "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> EngineChoice:
        """Inverse of :meth:`to_dict` (``source`` overrides the stored one)."""
        k = dict(d["key"])
        key = EngineKey(**{**k, "shape": tuple(k["shape"]), "cell": tuple(k["cell"])})
        return cls(str(d["engine"]), None if d["min_block_edge"] is None else int(d["min_block_edge"]),
                   {str(a): float(b) for a, b in d["timings_ms"].items()}, key, source or str(d["source"]))


def cached_choices() -> dict[EngineKey, EngineChoice]:
    """A copy of this process's cache of choices."""
    return dict(_CACHE)


def clear_cache() -> None:
    """Forget every choice (the next ``"auto"`` forward of each key measures again)."""
    _CACHE.clear()


def engine_key(encoder: nn.Module, config: Any, x: torch.Tensor, plan: MaskPlan, ratio: Any | None) -> EngineKey:
    """The :class:`EngineKey` of one forward.

    Args:
        encoder: the backbone's encoder (its ``checkpointing`` flag is part of the key).
        config: the backbone's config (its repr is hashed).
        x: the input (B, C, D, H, W).
        plan: the forward's :class:`~s3d.sparse.plan.MaskPlan` (its cell, and its masked fraction for a
            given mask).
        ratio: the wrapper's mask ratio spec when the mask was sampled, None for a given mask.

    Example:
        >>> from s3d import build_resenc_unet
        >>> net = build_resenc_unet("tiny", num_classes=1)
        >>> plan = MaskPlan.build(torch.ones(2, 1, 2, 2, 2), (32, 32, 32), net.config.stage_strides())
        >>> k = engine_key(net.encoder, net.config, torch.zeros(2, 1, 32, 32, 32), plan, 0.75)
        >>> k.shape, k.cell, k.masking
        ((2, 1, 32, 32, 32), (16, 16, 16), 'ratio 0.75')
    """
    dev = x.device
    if dev.type == "cuda":
        device = f"{dev} {torch.cuda.get_device_name(dev)}"
    elif dev.type == "cpu":
        device = f"cpu {torch.get_num_threads()} threads"
    else:
        device = str(dev)
    digest = hashlib.sha1(repr(config).encode()).hexdigest()[:8]
    network = f"{getattr(config, 'name', type(encoder).__name__)}-{digest}"
    if getattr(encoder, "checkpointing", False):
        network += "+ckpt"
    dtype = str(x.dtype).removeprefix("torch.")
    if torch.is_autocast_enabled(dev.type):
        dtype += "/" + str(torch.get_autocast_dtype(dev.type)).removeprefix("torch.")
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        dtype += ",cl"
    if ratio is not None:
        lo, hi = (ratio, ratio) if isinstance(ratio, (int, float)) else tuple(ratio)
        masking = f"ratio {lo:g}" if lo == hi else f"ratio U({lo:g}, {hi:g})"
    else:
        masking = f"masked {round(20 * plan.masked_fraction()) / 20:.2f}"
    return EngineKey(device, network, tuple(int(s) for s in x.shape), dtype, plan.cell, masking,
                     torch.is_grad_enabled())


def engine_candidates(encoder: nn.Module, cell: Sequence[int], edges: Sequence[int] = CROSSOVER_EDGES
                      ) -> list[Candidate]:
    """``"dense"`` plus ``"blocks"`` at every crossover edge that gives a distinct block plan.

    Example:
        >>> from s3d import build_resenc_unet
        >>> [c.label for c in engine_candidates(build_resenc_unet("tiny").encoder, (16, 16, 16))]
        ['dense', 'blocks@4', 'blocks@8', 'blocks@16']
    """
    out, plans = [Candidate("dense", None, "dense")], set()
    for edge in edges:
        plan = tuple(block_plan(encoder, tuple(cell), edge))
        if plan[0] and plan not in plans:
            plans.add(plan)
            out.append(Candidate("blocks", int(edge), f"blocks@{edge}"))
    return out


def measure_engines(
    engines: Mapping[str, Callable[..., list[torch.Tensor]]],
    candidates: Sequence[Candidate],
    encoder: nn.Module,
    x: torch.Tensor,
    plan: MaskPlan,
    *,
    warmup: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Median milliseconds of each candidate on this input (``inf`` for one that ran out of GPU memory).

    Args:
        engines: the engine registry (:data:`s3d.sparse.wrapper.ENGINES`).
        candidates: what to time (:func:`engine_candidates`).
        encoder: the encoder the engines run.
        x: the input (B, C, D, H, W).
        plan: the forward's :class:`~s3d.sparse.plan.MaskPlan`, which every candidate runs on.
        warmup: runs per candidate that only size the repeats (None: :data:`WARMUP`).
        repeats: timed runs per candidate at most (None: :data:`REPEATS`).
        budget_s: repeats shrink (to 1 at least) so that the timed rounds take about this long, seconds
            (None: :data:`BUDGET_S`).
    """
    warmup = WARMUP if warmup is None else warmup
    repeats = REPEATS if repeats is None else repeats
    budget_s = BUDGET_S if budget_s is None else budget_s
    params = [p for p in encoder.parameters() if p.requires_grad]
    backward = torch.is_grad_enabled() and bool(params)
    cuda = x.device.type == "cuda"

    def run_once(c: Candidate) -> float:
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = clock()
        feats = engines[c.engine](encoder, x, plan, min_block_edge=c.min_block_edge)
        if backward:
            torch.autograd.grad(sum(f.float().sum() for f in feats), params, allow_unused=True)
        del feats
        if cuda:
            torch.cuda.synchronize(x.device)
        return clock() - t0

    def safe(c: Candidate) -> float:
        try:
            return run_once(c)
        except torch.OutOfMemoryError:
            if cuda:
                torch.cuda.empty_cache()
            return float("inf")

    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    rng_devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=rng_devices):
        first = 0.0
        for _ in range(max(0, warmup)):
            first = sum(safe(c) for c in candidates)
        n = repeats if first * repeats <= budget_s else max(1, int(budget_s // max(first, 1e-9)))
        for _ in range(max(1, n)):
            for c in candidates:
                times[c.label].append(safe(c))
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def _broadcast(choice: EngineChoice, device: torch.device) -> EngineChoice:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and choice.key.grad):
        return choice
    obj = [choice.to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0, device=device if dist.get_backend() == "nccl" else None)
    if dist.get_rank() == 0:
        return choice
    theirs = EngineChoice.from_dict(obj[0], source="rank 0")
    theirs.key = choice.key  # this rank's device name
    return theirs


@torch.compiler.disable
def choose_engine(
    engines: Mapping[str, Callable[..., list[torch.Tensor]]],
    encoder: nn.Module,
    x: torch.Tensor,
    key: EngineKey,
    plan: MaskPlan,
    *,
    edges: Sequence[int] = CROSSOVER_EDGES,
    **measure_kw: Any,
) -> EngineChoice:
    """The cached choice for ``key``, or measure the candidates on ``x``, log and cache the fastest.

    Ties go to the earlier candidate (dense first). Under ``torch.distributed`` with gradients on,
    every rank measures and all adopt rank 0's choice.

    Example:
        >>> from s3d import build_resenc_unet
        >>> from s3d.sparse.wrapper import ENGINES
        >>> net = build_resenc_unet("tiny", num_classes=1)
        >>> x, keep = torch.randn(1, 1, 32, 32, 32), torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
        >>> plan = MaskPlan.build(keep, x.shape[2:], net.config.stage_strides())
        >>> key = engine_key(net.encoder, net.config, x, plan, None)
        >>> with torch.no_grad():
        ...     choice = choose_engine(ENGINES, net.encoder, x, key, plan)
        >>> choice.label in [c.label for c in engine_candidates(net.encoder, (16, 16, 16))]
        True
    """
    if key in _CACHE:
        return _CACHE[key]
    candidates = engine_candidates(encoder, key.cell, edges)
    timings = measure_engines(engines, candidates, encoder, x, plan, **measure_kw)
    best = min(candidates, key=lambda c: timings[c.label])  # min keeps the first of equal times
    if timings[best.label] == float("inf"):
        raise torch.OutOfMemoryError(f"engine 'auto': every candidate ran out of memory for {key.describe()}")
    choice = _broadcast(EngineChoice(best.engine, best.min_block_edge, timings, key), x.device)
    _CACHE[key] = choice
    logger.info(choice.message())
    return choice


def table_choice(key: EngineKey, engine: str, device: torch.device) -> EngineChoice:
    """The unmeasured choice (``S3D_ENGINE_AUTOTUNE=0``): ``engine`` at the device's default edge."""
    edge = default_min_block_edge(device) if engine == "blocks" else None
    return EngineChoice(engine, edge, {}, key, source="table")
