"""Worker processes that stay quiet: a map over jobs in a process pool that Ctrl-C ends cleanly.

Ctrl-C in a terminal sends SIGINT to every process of the foreground group, workers included. Here
the workers ignore it (their parent decides): they start with SIGINT blocked (the parent blocks it while
it spawns them, and a child inherits the mask), so a Ctrl-C during a worker's interpreter start-up cannot
kill it with a "Fatal Python error", and they unblock it only once it is ignored. The parent, on
``KeyboardInterrupt`` or any other exception, terminates them at once (SIGTERM, which a worker turns
into ``SystemExit`` so that its temporary files are removed): no traceback from a worker or from a
pool thread, no job left running after the command has ended.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def _worker_start(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the workers
    _set_sigint_blocked(False)  # blocked since the spawn (see the module's docstring); a pending one is dropped
    signal.signal(signal.SIGTERM, _exit_cleanly)  # ... with SIGTERM: finally blocks remove temporary files
    _exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def _set_sigint_blocked(blocked: bool) -> None:
    """Block or unblock SIGINT for this thread (POSIX; elsewhere nothing)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, {signal.SIGINT})


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when its parent dies (even by SIGKILL).

    On Linux the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``), which works even
    while the worker is inside C code holding the GIL; elsewhere a thread polls ``os.getppid()``.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        import time

        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="s3d-parent-watch", daemon=True).start()


def map_in_processes(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int, *, ordered: bool = True,
                     initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """``fn(job)`` for every job in ``workers`` spawned processes, yielded as each finishes.

    ``fn`` and the jobs must be picklable; ``fn`` should report failures in its result rather than
    raise (an exception in a worker ends the map, re-raised here). The workers ignore SIGINT and end
    with the parent; when the caller stops early (Ctrl-C, an exception, ``close()`` of the generator)
    they are terminated.

    Args:
        fn: a module-level function.
        jobs: its arguments, one per call.
        workers: processes (>= 1).
        ordered: yield in job order (``False``: as they finish).
        initializer, initargs: run once in each worker after the signal set-up.

    Example:
        >>> list(map_in_processes(abs, [-1, -2], workers=2))
        [1, 2]
    """
    import multiprocessing as mp

    jobs = list(jobs)
    pool = None
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        if sys.platform != "win32":  # started first: starting it unblocks SIGINT again (multiprocessing's code)
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        _set_sigint_blocked(True)  # the workers (and the pool's threads) inherit the mask
    try:
        pool = mp.get_context("spawn").Pool(min(workers, max(1, len(jobs))), initializer=_worker_start,
                                            initargs=(os.getpid(), initializer, initargs))
        if main_thread:
            _set_sigint_blocked(False)  # a Ctrl-C pressed meanwhile is raised here, and ends the pool below
        results = pool.imap(fn, jobs, chunksize=1) if ordered else pool.imap_unordered(fn, jobs, chunksize=1)
        yield from results
        pool.close()
    except BaseException:
        if main_thread:
            _set_sigint_blocked(False)
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.join()
