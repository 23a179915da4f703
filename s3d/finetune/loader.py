"""The fine-tuning data stream: the batch of every step from its own seed, prepared ahead of the step.

Reproducibility: the patches of step ``t`` on rank ``r`` are drawn from a generator seeded by
``stream_seed(seed, r, t, PATCHES)`` and their augmentation from ``stream_seed(seed, r, t, AUGMENT)``
(:func:`s3d.runtime.optim.stream_seed`), so a batch is a function of ``(seed, rank, step)``: it can
be made in any order, on any thread, and a resumed run draws exactly the batches it would have drawn.

Overlap: :class:`PatchPrefetcher` samples the patches of the next steps on background threads
(reading memory-mapped cached cases mostly copies memory, which releases the GIL) while the network
trains on the current one; on CUDA the host batches are pinned and copied to the GPU on a side stream
one step ahead, so neither the sampling nor the host-to-device copy sits on the training step's path.

Example:
    >>> make = lambda t: sample_step(cases, 2, (64, 64, 64), seed=0, rank=0, step=t)
    >>> with PatchPrefetcher(make, start=0, stop=100, device=torch.device("cpu"), threads=2) as batches:
    ...     x, y = batches.get(0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from s3d.finetune.patches import CachedCase, sample_patches
from s3d.runtime.optim import stream_seed

#: purposes of the per-step random streams (:func:`s3d.runtime.optim.stream_seed`)
PATCHES, AUGMENT = 1, 2

Batch = tuple[torch.Tensor, torch.Tensor]


def foreground_flags(global_batch: int, fraction: float, rank: int = 0, world_size: int = 1) -> list[bool]:
    """Which samples of this rank's share are forced onto foreground: the global batch's last
    ``round(B * fraction)`` samples, rank ``r`` holding samples ``[r * B / W, (r + 1) * B / W)``.

    So a DDP run oversamples foreground exactly as one process with the whole batch does.

    Example:
        >>> foreground_flags(2, 0.33), foreground_flags(2, 0.33, rank=0, world_size=2)
        ([False, True], [False])
    """
    local = global_batch // world_size
    n_fg = round(global_batch * fraction)
    return [g >= global_batch - n_fg for g in range(rank * local, (rank + 1) * local)]


def sample_step(cases: Sequence[CachedCase], batch_size: int, patch_size: Sequence[int], *, seed: int,
                rank: int, step: int, foreground: Sequence[bool] | None = None,
                foreground_fraction: float = 0.33) -> Batch:
    """The (unaugmented) patches of optimiser step ``step`` on ``rank``: x (B, C, D, H, W), y (B, D, H, W), CPU.

    Example:
        >>> x, y = sample_step(cases, 2, (32, 32, 32), seed=0, rank=0, step=10)
    """
    gen = torch.Generator().manual_seed(stream_seed(seed, rank, step, PATCHES))
    return sample_patches(cases, batch_size, patch_size, gen, foreground_fraction, foreground=foreground)


def augment_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``'s augmentation on ``rank``."""
    return torch.Generator().manual_seed(stream_seed(seed, rank, step, AUGMENT))


class BatchStream:
    """The training batches of one rank: patches of step ``t`` from ``(seed, rank, t)``, augmented on
    the training device with their own per-step generator.

    Args:
        cases: the training cases.
        patch_size: (D, H, W) voxels.
        device: the training device (augmentation runs there).
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        global_batch: patches per step over all processes (``world_size`` divides it).
        foreground_fraction: share of the global batch centred on foreground (its last samples).
        augment: apply :class:`s3d.augment.Augment` (fine-tuning defaults).
        channels_last: return x in channels_last_3d (CUDA only).

    Example:
        >>> stream = BatchStream(cases, (32, 32, 32), torch.device("cpu"), seed=0, global_batch=2)
        >>> x, y = stream.batch(0)
    """

    def __init__(self, cases: Sequence[CachedCase], patch_size: Sequence[int], device: torch.device, *,
                 seed: int, rank: int = 0, global_batch: int, world_size: int = 1,
                 foreground_fraction: float = 0.33, augment: bool = True, channels_last: bool = False) -> None:
        self.cases, self.patch_size, self.device = cases, tuple(int(p) for p in patch_size), device
        self.seed, self.rank = seed, rank
        self.local_batch = global_batch // world_size
        self.foreground = foreground_flags(global_batch, foreground_fraction, rank, world_size)
        self.augment, self.channels_last = augment, channels_last and device.type == "cuda"

    def patches(self, step: int) -> Batch:
        """The unaugmented patches of ``step`` (CPU): :func:`sample_step`."""
        return sample_step(self.cases, self.local_batch, self.patch_size, seed=self.seed, rank=self.rank,
                           step=step, foreground=self.foreground)

    def batch(self, step: int, prefetcher: PatchPrefetcher | None = None) -> Batch:
        """The batch of ``step`` on the device, augmented; patches from ``prefetcher`` when given."""
        if prefetcher is not None:
            x, y = prefetcher.get(step)
        else:
            x, y = self.patches(step)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.augment:
            from s3d.augment import Augment

            x, y = Augment()(x, augment_generator(self.seed, self.rank, step), labels=y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x, y


class PatchPrefetcher:
    """Hands out the batch of each step, prepared ahead on ``threads`` background threads.

    Args:
        make: ``make(step) -> (x, y)`` on the CPU, a pure function of the step (e.g. :func:`sample_step`).
        start, stop: the steps ``[start, stop)`` the run will ask for, in order.
        device: where :meth:`get` returns the batch. On CUDA host batches are pinned and copied on a
            side stream one step ahead.
        threads: background threads (0: make each batch when asked, in the caller's thread).
        depth: batches prepared ahead (default ``2 * threads``, at least 2).

    Example:
        >>> with PatchPrefetcher(make, 0, 10, torch.device("cpu")) as batches:
        ...     for t in range(10):
        ...         x, y = batches.get(t)
    """

    def __init__(self, make: Callable[[int], Batch], start: int, stop: int, device: torch.device,
                 threads: int = 2, depth: int | None = None) -> None:
        if threads < 0:
            raise ValueError(f"threads: must be >= 0, got {threads}")
        self.make, self.stop, self.device = make, stop, device
        self.cuda = device.type == "cuda"
        self.depth = max(2, 2 * threads) if depth is None else max(1, depth)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="s3d-patches") if threads else None
        self._host: dict[int, Future[Batch]] = {}
        self._next = start
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._copied: dict[int, Batch] = {}

    def _prepare(self, step: int) -> Batch:
        x, y = self.make(step)
        if self.cuda:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _fill(self, step: int) -> None:
        assert self._pool is not None
        self._next = max(self._next, step)
        while self._next < min(self.stop, step + 1 + self.depth):
            self._host[self._next] = self._pool.submit(self._prepare, self._next)
            self._next += 1

    def _host_batch(self, step: int) -> Batch:
        if self._pool is None:
            return self._prepare(step)
        self._fill(step)
        fut = self._host.pop(step, None)
        return fut.result() if fut is not None else self._prepare(step)

    def _copy(self, batch: Batch) -> Batch:
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            return batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)

    def get(self, step: int) -> Batch:
        """The batch of ``step`` on ``self.device`` (steps must be asked for in increasing order)."""
        for old in [s for s in self._host if s < step]:  # skipped steps (not expected in a run)
            self._host.pop(old).cancel()
        if not self.cuda:
            return self._host_batch(step)
        x, y = self._copied.pop(step, None) or self._copy(self._host_batch(step))
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)  # type: ignore[arg-type]
        x.record_stream(current)
        y.record_stream(current)
        nxt = self._host.get(step + 1)
        if nxt is not None and nxt.done():  # queue the next copy now, so it overlaps this step
            self._copied[step + 1] = self._copy(self._host.pop(step + 1).result())
        return x, y

    def close(self) -> None:
        """Stop the background threads (pending batches are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._host.clear()
        self._copied.clear()

    def __enter__(self) -> PatchPrefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AUGMENT", "PATCHES", "BatchStream", "PatchPrefetcher", "augment_generator", "foreground_flags",
           "sample_step"]
