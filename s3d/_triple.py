"""Per-axis values (D, H, W): the one parser of "a number or three" and the one typed 3-tuple.

:func:`to_3tuple` reads what users and configs write (``3`` or ``[3, 3, 1]``) and checks it;
:func:`triple` types three values computed per axis (``tuple[T, T, T]``), so that no caller needs a
type-checker exemption for a tuple built from a generator.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, overload

Triple = tuple[int, int, int]

T = TypeVar("T")


def triple(values: Iterable[T]) -> tuple[T, T, T]:
    """Exactly three values as a typed 3-tuple (one per spatial axis D, H, W).

    Raises:
        ValueError: not exactly three values.

    Example:
        >>> triple(n // 2 for n in (64, 32, 16))
        (32, 16, 8)
    """
    out = tuple(values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values (D, H, W), got {len(out)}: {out!r}")
    return out[0], out[1], out[2]


@overload
def to_3tuple(value: int | Sequence[int], name: str) -> tuple[int, int, int]: ...


@overload
def to_3tuple(value: float | Sequence[float], name: str, kind: type[float]) -> tuple[float, float, float]: ...


def to_3tuple(value: float | Sequence[float], name: str, kind: type = int) -> tuple[Any, Any, Any]:
    """One positive value for every axis, or three (D, H, W), as a 3-tuple of ``kind``.

    ``kind=int`` (sizes, strides, kernels in voxels): each value >= 1; ``kind=float`` (e.g. spacings in
    mm): each value finite and > 0. A bool is not a number here.

    Args:
        value: ``k`` or ``[k_d, k_h, k_w]``.
        name: what the caller calls it, for the error message (``"patch_size"``, ``"--patch-size"``).
        kind: ``int`` or ``float``.

    Raises:
        ValueError: naming ``name``, the expected form and the value.

    Example:
        >>> to_3tuple(3, "kernel_size"), to_3tuple([2, 2, 1], "stride"), to_3tuple(1.5, "spacing_mm", float)
        ((3, 3, 3), (2, 2, 1), (1.5, 1.5, 1.5))
    """
    what = "int" if kind is int else "number"
    bad = ValueError(f"{name}: expected one positive {what} or three (D, H, W), got {value!r}")
    items = [value] * 3 if isinstance(value, numbers.Real) else value
    try:
        values = tuple(items)
    except TypeError:
        raise bad from None
    if len(values) != 3 or any(isinstance(v, bool) for v in values):
        raise bad
    try:
        if kind is int and any(isinstance(v, float) and not v.is_integer() for v in values):
            raise bad  # 2.5 voxels is not a size; 2.0 is
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise bad from None
    if any(not (v >= 1 if kind is int else 0 < v < float("inf")) for v in out):
        raise bad
    return triple(out)
