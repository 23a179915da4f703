"""What a prediction writes: a case's label map and probabilities as a pair, and nothing half-written.

Both files of a case are first written under hidden temporary names (``.s3d-partial-...``) in the
output folder, then renamed: the old label map is removed first and the new one is renamed last, so
a label map that exists always belongs with the ``.npz`` next to it (or has none). A run removes its
temporaries when it fails or gets SIGTERM; :func:`sweep_partial` removes those a killed run left
(SIGKILL cannot be caught), and every batch calls it before it starts.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PARTIAL_MARK = ".s3d-partial-"
#: the temporaries of :func:`s3d._fs.atomic_path` (``.{name}.XXXXXXXX{suffixes}``) for the kinds of file we write
_ATOMIC_RE = re.compile(r"^\..+\.[a-z0-9_]{8}(\.nii\.gz|\.nii|\.npz|\.json)$")


def partial_path(path: Path) -> Path:
    """The hidden temporary name of ``path`` while it is being written (same folder, same suffixes)."""
    return path.parent / f"{PARTIAL_MARK}{os.getpid()}-{path.name}"


def is_partial(name: str) -> bool:
    """Whether a file name is a temporary that a prediction run left (hidden, ours)."""
    return name.startswith(".") and (PARTIAL_MARK[1:] in name or _ATOMIC_RE.match(name) is not None)


def sweep_partial(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries an interrupted run left in ``output_dir``; returns what was removed.

    Example:
        >>> sweep_partial("predictions")
        [PosixPath('predictions/.s3d-partial-4121-case_007.nii.gz')]
    """
    removed = []
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for p in sorted(output_dir.iterdir()):
            if is_partial(p.name) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p)
    return removed


def write_case_outputs(
    label_path: str | os.PathLike[str],
    labels: np.ndarray,
    affine: np.ndarray,
    like: str | os.PathLike[str],
    probabilities_path: str | os.PathLike[str] | None = None,
    probabilities: dict[str, np.ndarray] | None = None,
    remove: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Write a label map and (optionally) its probabilities ``.npz``: both or neither.

    Args:
        label_path: the label NIfTI (``like``'s header, ``affine``).
        labels: (D, H, W) integer labels.
        probabilities_path, probabilities: the ``.npz`` and its arrays (``np.savez_compressed``).
        remove: files of an earlier run that must not outlive the new label map (e.g. an old ``.npz``
            when no probabilities are saved); removed before it is renamed into place.

    Raises:
        OSError / ValueError: nothing new is left in place (the old label map is gone too).

    Example:
        >>> write_case_outputs("out/ct_001.nii.gz", labels, affine, like="in/ct_001_0000.nii.gz",
        ...                    probabilities_path="out/ct_001.npz", probabilities={"probabilities": probs})
    """
    from s3d.data.io import write_nifti

    label_path = Path(label_path)
    probs_path = None if probabilities_path is None else Path(probabilities_path)
    tmp_labels = partial_path(label_path)
    tmp_probs = None if probs_path is None else partial_path(probs_path)
    try:
        write_nifti(tmp_labels, labels, affine, like=like)
        if tmp_probs is not None:
            with open(tmp_probs, "wb") as f:
                np.savez_compressed(f, **(probabilities or {}))
        # commit: the old label map goes first and the new one comes last, so a label map that exists
        # always has its own .npz (or none) next to it, whenever the process dies
        label_path.unlink(missing_ok=True)
        for p in remove:
            Path(p).unlink(missing_ok=True)
        if tmp_probs is not None and probs_path is not None:
            os.replace(tmp_probs, probs_path)
        try:
            os.replace(tmp_labels, label_path)
        except BaseException:
            if probs_path is not None:
                probs_path.unlink(missing_ok=True)
            raise
    finally:
        for t in (tmp_labels, tmp_probs):
            if t is not None:
                t.unlink(missing_ok=True)
