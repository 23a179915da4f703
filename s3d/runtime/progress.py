"""Progress bars for long work (tqdm), one look for every job and command.

Example:
    >>> for case in progress(["a", "b"], desc="predict", unit="case"):
    ...     pass
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


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
    from tqdm.auto import tqdm

    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=off, leave=leave,
                dynamic_ncols=True)
