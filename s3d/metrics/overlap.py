"""Volumetric Dice with an explicit policy for empty masks."""

from __future__ import annotations

import enum

import numpy as np


class EmptyPolicy(str, enum.Enum):
    """What a metric returns when the reference and/or the prediction of a class is empty.

    The cases that need a policy are "both empty" and "reference empty, prediction not":

    ============================  ==============  ============================
    policy                        both empty      reference empty, pred not
    ============================  ==============  ============================
    ``NAN`` (default, nnU-Net)    NaN             0.0
    ``ONE``                       1.0             0.0
    ``ZERO``                      0.0             0.0
    ``IGNORE_EMPTY_REF``          NaN             NaN
    ============================  ==============  ============================

    A non-empty reference with an empty prediction is always 0.0. ``NAN`` follows nnU-Net, whose
    summaries average with ``nanmean`` so that such cases drop out of the mean of that class.
    ``ONE`` scores perfect agreement on absent structures; ``IGNORE_EMPTY_REF`` drops every case
    whose reference is empty, also when the prediction has false positives (MONAI's
    ``DiceMetric(ignore_empty=True)`` behaves this way). Strings work too: ``"nan"``, ``"one"``,
    ``"zero"``, ``"ignore_empty_ref"``.

    Example:
        >>> EmptyPolicy("one") is EmptyPolicy.ONE
        True
    """

    NAN = "nan"
    ONE = "one"
    ZERO = "zero"
    IGNORE_EMPTY_REF = "ignore_empty_ref"


def as_policy(policy: EmptyPolicy | str) -> EmptyPolicy:
    """Return ``policy`` as an :class:`EmptyPolicy`; a clear ``ValueError`` for unknown names."""
    try:
        return EmptyPolicy(policy)
    except ValueError:
        names = ", ".join(repr(p.value) for p in EmptyPolicy)
        raise ValueError(f"empty policy {policy!r} is not one of {names}") from None


def empty_value(ref_empty: bool, pred_empty: bool, policy: EmptyPolicy | str) -> float | None:
    """The score fixed by ``policy`` for empty masks, or ``None`` when the metric must be computed."""
    policy = as_policy(policy)
    if ref_empty and policy is EmptyPolicy.IGNORE_EMPTY_REF:
        return float("nan")
    if ref_empty and pred_empty:
        return {EmptyPolicy.NAN: float("nan"), EmptyPolicy.ONE: 1.0, EmptyPolicy.ZERO: 0.0}[policy]
    if ref_empty or pred_empty:
        return 0.0
    return None


def binary_mask(name: str, mask: np.ndarray) -> np.ndarray:
    """``mask`` as a bool array; ``ValueError`` naming ``name`` unless it is bool or holds only 0 and 1.

    Example:
        >>> binary_mask("pred", np.array([0, 1, 1])).tolist()
        [False, True, True]
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        values = np.unique(mask)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (bool or 0/1), found values {values[:8]}")
        mask = mask.astype(bool)
    return mask


def dice(
    pred: np.ndarray,
    ref: np.ndarray,
    empty: EmptyPolicy | str = EmptyPolicy.NAN,
    valid: np.ndarray | None = None,
) -> float:
    """Dice similarity coefficient ``2 |P & R| / (|P| + |R|)`` of two binary masks.

    Args:
        pred: predicted mask, any shape (usually (D, H, W)), bool or 0/1.
        ref: reference mask, same shape.
        empty: policy for empty masks, see :class:`EmptyPolicy` (default: nnU-Net's, NaN when both
            are empty).
        valid: optional bool mask of the same shape; voxels where it is False (e.g. the ignore label
            of the reference) are left out of both masks.

    Returns:
        Dice in [0, 1], or NaN as the policy says.

    Example:
        >>> a = np.zeros((4, 4, 4), bool); a[:2] = True
        >>> dice(a, a)
        1.0
    """
    pred, ref = binary_mask("pred", pred), binary_mask("ref", ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred has shape {pred.shape} but ref has shape {ref.shape}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        pred, ref = pred & valid, ref & valid
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fixed = empty_value(n_ref == 0, n_pred == 0, empty)
    if fixed is not None:
        return fixed
    inter = int(np.count_nonzero(pred & ref))
    return 2.0 * inter / (n_pred + n_ref)
