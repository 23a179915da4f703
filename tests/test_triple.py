"""s3d._triple: the one parser of "a number or three" (sizes, strides, spacings) and the typed 3-tuple."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import s3d._triple as triple_mod
from s3d._triple import to_3tuple, triple


def test_doctests() -> None:
    assert doctest.testmod(triple_mod).failed == 0


@pytest.mark.parametrize(("value", "want"), [(3, (3, 3, 3)), ([2, 2, 1], (2, 2, 1)), ((np.int64(4),) * 3, (4, 4, 4)),
                                             (np.int64(5), (5, 5, 5)), (2.0, (2, 2, 2))])
def test_ints(value, want) -> None:
    out = to_3tuple(value, "x")
    assert out == want and all(type(v) is int for v in out)


@pytest.mark.parametrize("value", [0, -1, True, [1, 2], [1, 2, 3, 4], [1, 0, 1], 2.5, "abc", None, [1, True, 1]])
def test_bad_ints_name_the_argument(value) -> None:
    with pytest.raises(ValueError, match=r"^patch_size: expected one positive int or three \(D, H, W\), got "):
        to_3tuple(value, "patch_size")


def test_floats() -> None:
    assert to_3tuple(1.5, "spacing_mm", float) == (1.5, 1.5, 1.5)
    assert to_3tuple([1, 2, 0.5], "spacing_mm", float) == (1.0, 2.0, 0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), [1.0, 2.0]):
        with pytest.raises(ValueError, match="spacing_mm: expected one positive number or three"):
            to_3tuple(bad, "spacing_mm", float)


def test_triple_takes_exactly_three() -> None:
    assert triple(iter("abc")) == ("a", "b", "c")
    with pytest.raises(ValueError, match="expected 3 values"):
        triple([1, 2])
