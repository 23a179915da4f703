"""Time and peak-memory measurement for ``s3d info --forward`` and the scripts in benchmarks/."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of the code in a ``with`` block, in bytes above what was in use at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process resident set
    size sampled every ``interval_s`` seconds by a background thread (includes allocator slack).
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak_bytes = self._max - self._base


@dataclass
class Timing:
    """Median wall seconds and median process CPU seconds (all threads) per call, peak memory (bytes).

    CPU time is less distorted than wall time by other processes on a shared machine.
    """

    seconds: float
    peak_bytes: int
    cpu_seconds: float = 0.0


def measure(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 3,
            warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times, then ``repeats`` times; median wall and CPU time, peak memory."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    wall.sort()
    cpu.sort()
    return Timing(wall[len(wall) // 2], mem.peak_bytes, cpu[len(cpu) // 2])
