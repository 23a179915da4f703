"""Which labels a dataset defines (``dataset.json``) and label maps that hold only those labels.

A label map read from a file is checked before it is scored: NaN/Inf, values that are not integers and
labels that ``dataset.json`` does not define are errors that name the file. Values within
:data:`ROUND_TOL` of an integer (float resampling: 0.99999994, 1.0000001) are rounded and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s3d.data.labels import check_labels

#: largest |v - round(v)| of a float label value that is rounded to the integer label (see docs/evaluation.md)
ROUND_TOL = 1e-3


@dataclass(frozen=True)
class LabelSet:
    """Foreground classes to evaluate: name -> label values (a tuple of several = a region)."""

    classes: dict[str, tuple[int, ...]]
    ignore_label: int | None = None

    @property
    def values(self) -> frozenset[int]:
        """Every label value a label map may hold: background 0, the classes' values and the ignore label."""
        out = {0, *(v for vs in self.classes.values() for v in vs)}
        if self.ignore_label is not None:
            out.add(self.ignore_label)
        return frozenset(out)


def load_labels(labels: str | os.PathLike[str] | Mapping[str, Any]) -> LabelSet:
    """Read the ``labels`` of an nnU-Net ``dataset.json`` (or take that mapping directly).

    Values are ints or lists of ints (nnU-Net regions); ``background`` (0) is skipped and a key
    named ``ignore`` gives the ignore label. The labels must follow nnU-Net's rules
    (:func:`s3d.data.labels.check_labels`: background 0, consecutive values, ``ignore`` the highest).

    Raises:
        ValueError: naming the file, if it is not JSON, has no ``labels`` mapping with a foreground label,
            or breaks nnU-Net's label rules.

    Example:
        >>> load_labels({"background": 0, "tumour": 1, "ignore": 2}).classes
        {'tumour': (1,)}
    """
    source = str(labels) if not isinstance(labels, Mapping) else "labels"
    if not isinstance(labels, Mapping):
        try:
            data = json.loads(Path(labels).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8 text
            raise ValueError(f"{labels}: cannot read as dataset.json ({type(e).__name__}: {e}); "
                             "--labels takes an nnU-Net dataset.json") from e
        if not isinstance(data, Mapping) or "labels" not in data:
            raise ValueError(f"{labels}: no 'labels' key (expected an nnU-Net dataset.json)")
        labels = data["labels"]
        if not isinstance(labels, Mapping):
            raise ValueError(f"{source}: 'labels' must map names to label values "
                             f"(e.g. {{\"background\": 0, \"tumour\": 1}}), found {type(labels).__name__}")
    classes: dict[str, tuple[int, ...]] = {}
    ignore = None
    for name, value in labels.items():
        values = tuple(value) if isinstance(value, list | tuple) else (value,)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{source}: label {name!r} must be an int or a list of ints, found {value!r}")
    check_labels(labels, source)
    for name, value in labels.items():
        values = tuple(value) if isinstance(value, list | tuple) else (value,)
        if name == "ignore":
            ignore = int(values[0])
        elif values != (0,):
            classes[str(name)] = tuple(int(v) for v in values)
    if not classes:
        raise ValueError(f"{source}: no foreground label found")
    return LabelSet(classes, ignore)


def to_label_map(
    values: np.ndarray, labels: LabelSet | None = None, name: str = "label map", tol: float = ROUND_TOL
) -> tuple[np.ndarray, int]:
    """The integer label map of ``values`` (as read from a file), or a ``ValueError`` naming ``name``.

    Integer (and bool) arrays pass unchanged. Float arrays must be finite and within ``tol`` of an integer
    everywhere; those values are rounded (float resampling makes 0.99999994 of 1). With ``labels``, every
    value must be one that ``labels`` defines (:attr:`LabelSet.values`).

    Args:
        values: (D, H, W) label map, any numeric dtype.
        labels: the labels the map may hold; ``None`` skips that check.
        name: what to call the map in errors (the file path).
        tol: largest allowed ``|v - round(v)|``.

    Returns:
        ``(labels, n_rounded)``: an integer array of the same shape and the number of voxels that were
        within ``tol`` of an integer but not equal to it.

    Example:
        >>> to_label_map(np.array([0.0, 0.99999994, 2.0000002], np.float32))
        (array([0, 1, 2], dtype=int32), 2)
    """
    arr = np.asarray(values)
    n_rounded = 0
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr, n_rounded = _round_floats(arr, name, tol)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: voxel type {arr.dtype} is not a label map (expected integer labels)")
    if labels is not None and arr.size:
        _check_defined(arr, labels, name)
    return arr, n_rounded


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _round_floats(arr: np.ndarray, name: str, tol: float) -> tuple[np.ndarray, int]:
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = int(arr.size - np.count_nonzero(finite)) - n_nan
        raise ValueError(f"{name}: {n_nan + n_inf} voxel(s) are NaN or Inf ({n_nan} NaN, {n_inf} Inf; first at "
                         f"voxel {_first(~finite)}); a label map holds integer labels only - check the step that "
                         "wrote it")
    rounded = np.rint(arr)
    dev = np.abs(arr - rounded)
    far = dev > tol
    if far.any():
        at = _first(far)
        raise ValueError(f"{name}: {int(np.count_nonzero(far))} voxel(s) are not integer labels (e.g. "
                         f"{float(arr[at]):.6g} at voxel {at}; up to {float(dev.max()):.3g} from an integer, more "
                         f"than the {tol:g} that is rounded); resample label maps with nearest-neighbour interpolation")
    lo, hi = float(rounded.min(initial=0)), float(rounded.max(initial=0))
    if lo < -(2**31) or hi >= 2**31:
        raise ValueError(f"{name}: label values from {lo:g} to {hi:g} do not fit a 32-bit integer label map")
    return rounded.astype(np.int32), int(np.count_nonzero(dev))


def _present(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (bincount when they are small and non-negative)."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < 1 << 16:
        return np.flatnonzero(np.bincount(arr.ravel().astype(np.intp, copy=False), minlength=hi + 1))
    return np.unique(arr)


def _check_defined(arr: np.ndarray, labels: LabelSet, name: str) -> None:
    defined = labels.values
    unknown = [int(v) for v in _present(arr) if int(v) not in defined]
    if not unknown:
        return
    counts = [int(np.count_nonzero(arr == v)) for v in unknown[:10]]
    listed = ", ".join(f"{v} ({n} voxel{'s' if n != 1 else ''})" for v, n in zip(unknown, counts, strict=False))
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    raise ValueError(f"{name}: label value(s) {listed}{more} are not defined in dataset.json's labels "
                     f"(defined: {', '.join(map(str, sorted(defined)))}); relabel the file or add the label "
                     "to dataset.json")
