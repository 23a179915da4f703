"""Progress bars for long work (tqdm), one look for every job and command.

Without tqdm installed (a bare PyTorch image, docs/install.md) the work runs without bars, and the
first bar that was asked for says once, in one line on stderr (where the bars go), how to get them.

Example:
    >>> for case in progress(["a", "b"], desc="predict", unit="case"):
    ...     pass
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from s3d._optional import MissingDependency, optional_import

_warned = False


class _NoBar:
    """What a disabled tqdm bar does, without tqdm: iterate, count, and print ``write`` lines."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, initial: int) -> None:
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else int(self.total or 0)  # type: ignore[arg-type]

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n") -> None:
        print(s, file=file or sys.stdout, end=end)


def progress(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it", total: int | None = None,
             initial: int = 0, enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps); silent when not ``enabled``.

    Args:
        iterable: what to iterate, or ``None`` for a bar updated with ``.update(n)``.
        desc, unit: the bar's label and unit (``"step"``, ``"case"``, ``"tile"``, ``"file"``).
        total, initial: length and starting position (a resumed run starts at its step).
        enabled: show it (``False`` for ``--no-progress`` and non-main ranks; the ``TQDM_DISABLE``
            environment variable, as tqdm reads it, turns every bar off).
        leave: keep the finished bar on screen.
    """
    global _warned
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    if off:
        return _NoBar(iterable, total, initial)
    try:
        tqdm = optional_import("tqdm.auto", "showing progress bars", "tqdm").tqdm
    except MissingDependency as e:
        if not _warned:
            _warned = True
            print(f"s3d: {e} (continuing without progress bars)", file=sys.stderr)
        return _NoBar(iterable, total, initial)
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=leave, dynamic_ncols=True)
