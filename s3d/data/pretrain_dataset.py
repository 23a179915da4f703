"""Pre-training data: uniform image sampling, random crops with padding, a sharded DataLoader.

Every crop is a pure function of ``(seed, rank, index)``: the image is drawn uniformly from the
rank's shard and the crop corner uniformly (see :func:`s3d.data.store.random_crop_start`), with a
NumPy generator seeded by those three numbers. So the "sampler position" of a run is just the
step it is at: resuming at step ``s`` starts the index stream at ``s * local_batch`` and yields
the same crops as an uninterrupted run, whatever the number of DataLoader workers.

Workers only read crops from the stored volumes (``.b2nd`` or ``.npy``, :mod:`s3d.data.store`);
augmentation runs batched on the training device (:mod:`s3d.augment`). :class:`LoaderStats` measures
whether the training step waits for data (``loader_wait`` and ``loader_queue`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from s3d.data.store import open_volume, random_crop_start, read_crop


def shard_cases(cases: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The cases of ``rank``: every ``world_size``-th one starting at ``rank``.

    Example:
        >>> shard_cases(list("abcde"), 1, 2)
        ['b', 'd']
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if len(cases) < world_size:
        raise ValueError(f"{len(cases)} training image(s) cannot be sharded over {world_size} processes; "
                         f"need at least one per process")
    return list(cases[rank::world_size])


def split_subjects(
    cases: Sequence[dict[str, Any]], val_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split cases into (train, val) by subject, so no subject is in both.

    ``ceil(val_fraction * n_subjects)`` subjects (at least one when ``val_fraction > 0`` and there are
    two or more subjects) go to validation, chosen by a seeded permutation of the sorted subject ids.

    Example:
        >>> cases = [{"subject": s} for s in "aabbc"]
        >>> [len(p) for p in split_subjects(cases, 0.3)]
        [3, 2]
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    subjects = sorted({c["subject"] for c in cases})
    n_val = math.ceil(val_fraction * len(subjects)) if len(subjects) >= 2 else 0
    n_val = min(n_val, len(subjects) - 1)
    order = np.random.default_rng(seed).permutation(len(subjects))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [c for c in cases if c["subject"] not in val_subjects]
    val = [c for c in cases if c["subject"] in val_subjects]
    return train, val


class _VolumeCache:
    """A small per-process LRU of open volumes (opening is cheap, but not free on network disks).

    Open volumes are not pickled: a DataLoader worker starts with an empty cache of its own.
    """

    def __init__(self, size: int = 64) -> None:
        self.size, self.maps = size, OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "maps": OrderedDict()}

    def __call__(self, path: str) -> np.ndarray:
        vol = self.maps.pop(path, None)
        if vol is None:
            vol = open_volume(path)
        self.maps[path] = vol
        while len(self.maps) > self.size:
            self.maps.popitem(last=False)
        return vol


def _damaged(path: str, e: Exception) -> ValueError:
    """The error for a stored volume that cannot be read: names the file and how to redo it."""
    text = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
    return ValueError(f"{text}; the prepared volume is damaged: delete it (and its .json) and run "
                      f"`s3d pretrain --prepare-only` on the raw data again to redo it")


class RandomCropDataset(Dataset):
    """Index ``i`` -> a random (C, *patch_size) float32 crop of a uniformly drawn image.

    Args:
        files: stored volumes (C, D, H, W), ``.b2nd`` or ``.npy``, of this rank (see :func:`shard_cases`).
        patch_size: crop size (D, H, W), voxels; smaller images are zero-padded at a random offset.
        seed: run seed.
        rank: process rank (makes the streams of different ranks independent).

    Example:
        >>> ds = RandomCropDataset(["prep/cases/a.b2nd"], (64, 64, 64))
        >>> ds[0].shape
        torch.Size([1, 64, 64, 64])
    """

    def __init__(self, files: Sequence[str], patch_size: Sequence[int], seed: int = 0, rank: int = 0) -> None:
        if not files:
            raise ValueError("RandomCropDataset: no files")
        self.files = [str(f) for f in files]
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed, self.rank = int(seed), int(rank)
        self._cache = _VolumeCache()

    def __len__(self) -> int:
        return 2**62  # indices are addresses in an endless stream

    def locate(self, index: int) -> tuple[int, tuple[int, int, int]]:
        """(file index, crop corner) of stream position ``index``."""
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        k = int(rng.integers(len(self.files)))
        try:
            shape = self._cache(self.files[k]).shape[1:]
        except Exception as e:
            raise _damaged(self.files[k], e) from e
        return k, random_crop_start(shape, self.patch_size, rng)

    def __getitem__(self, index: int) -> torch.Tensor:
        k, start = self.locate(index)
        try:
            crop = read_crop(self._cache(self.files[k]), start, self.patch_size)
        except Exception as e:
            raise _damaged(self.files[k], e) from e
        return torch.from_numpy(crop)


class CenterCropDataset(Dataset):
    """Fixed (C, *patch_size) centre crops of every file, for validation and snapshots."""

    def __init__(self, files: Sequence[str], patch_size: Sequence[int]) -> None:
        self.files = [str(f) for f in files]
        self.patch_size = tuple(int(p) for p in patch_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        vol = open_volume(self.files[index])
        start = [(n - p) // 2 for n, p in zip(vol.shape[1:], self.patch_size, strict=True)]
        return torch.from_numpy(read_crop(vol, start, self.patch_size))


class StepSampler(Sampler[int]):
    """Stream positions ``start_step * batch_size`` .. ``stop_step * batch_size - 1``, in order."""

    def __init__(self, batch_size: int, start_step: int, stop_step: int) -> None:
        self.batch_size, self.start_step, self.stop_step = int(batch_size), int(start_step), int(stop_step)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start_step * self.batch_size, self.stop_step * self.batch_size))

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.batch_size


def build_pretrain_loader(
    files: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    start_step: int,
    stop_step: int,
    seed: int = 0,
    rank: int = 0,
    workers: int = 4,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader yielding (batch_size, C, *patch_size) float32 crops for steps [start_step, stop_step).

    Args:
        files: this rank's volumes.
        batch_size: crops per step on this rank (the global batch divided by the world size).
        start_step: first step (0, or the checkpoint's step when resuming).
        workers: DataLoader worker processes (0 = main process).
        pin_memory: page-locked batches for fast host-to-GPU copies (default: when CUDA is available).
        prefetch_factor: batches each worker prepares ahead.

    Example:
        >>> loader = build_pretrain_loader(files, (160,) * 3, 6, 0, 250_000, workers=8)
    """
    ds = RandomCropDataset(files, patch_size, seed=seed, rank=rank)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    return DataLoader(ds, batch_size=batch_size, sampler=StepSampler(batch_size, start_step, stop_step),
                      num_workers=workers, drop_last=True,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **kwargs)


def _from_worker(e: Exception) -> Exception:
    """A DataLoader worker's exception re-raised by torch carries the worker's traceback in its text;
    keep the original message only (a user error is one line)."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = text.strip().splitlines()[-1]
    msg = last.split(": ", 1)[1] if ": " in last else last
    try:
        return type(e)(msg)
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return RuntimeError(msg)


def _ready_batches(it: Any) -> int | None:
    """Batches a multi-process DataLoader iterator holds ready (received, or waiting in its result
    queue) when the next one is asked for; ``None`` where that cannot be seen (no workers)."""
    try:
        held = sum(1 for v in it._task_info.values() if len(v) == 2)
        return held + it._data_queue.qsize()
    except (AttributeError, NotImplementedError, TypeError):  # workers=0, or a platform without qsize
        return None


class LoaderStats:
    """Wrap a loader to measure how long the consumer waits for each batch, and the queue depth.

    Iterate over it instead of the loader; :meth:`take` returns the figures since its last call:
    ``loader_wait`` (fraction of the elapsed wall time spent waiting in ``next(loader)``; near 0 means
    the data keeps up, near 1 that the GPU waits for data) and ``loader_queue`` (mean number of
    batches ready when one was asked for; absent without worker processes).

    Example:
        >>> stats = LoaderStats(build_pretrain_loader(files, (160,) * 3, 6, 0, 100, workers=8))
        >>> for step, batch in enumerate(stats):
        ...     if step % 10 == 0: print(stats.take())
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._wait, self._depth, self._asked, self._since = 0.0, 0, 0, time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        while True:
            depth = _ready_batches(it)
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise _from_worker(e) from None
            self._wait += time.perf_counter() - t
            if depth is not None:
                self._depth, self._asked = self._depth + depth, self._asked + 1
            yield batch

    def take(self) -> dict[str, float]:
        """``{"loader_wait": fraction, "loader_queue": batches}`` since the last call (then reset)."""
        now = time.perf_counter()
        out = {"loader_wait": self._wait / max(now - self._since, 1e-9)}
        if self._asked:
            out["loader_queue"] = self._depth / self._asked
        self._wait, self._depth, self._asked, self._since = 0.0, 0, 0, now
        return out
