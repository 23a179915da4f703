"""The result of a folder evaluation (:class:`FolderEvaluation`) and its files: ``per_case.csv`` and
``summary.json``, written atomically, never stale."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3d.metrics.labels import ROUND_TOL

#: the files :func:`write_evaluation` writes (never listed as ignored inputs of a prediction folder)
OUTPUTS = ("per_case.csv", "summary.json")


@dataclass
class FolderEvaluation:
    """Result of :func:`evaluate_folder`: per-case metrics, per-case errors, rounding counts and the summary.

    ``rounded[case]`` is ``{"prediction": voxels, "reference": voxels}`` for the cases whose float label
    values were rounded (within ``ROUND_TOL`` of an integer); cases with exact integer labels are absent.
    """

    per_case: dict[str, dict[str, dict[str, float]]]
    errors: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)
    rounded: dict[str, dict[str, int]] = field(default_factory=dict)

    def case_means(self, metric: str = "dice") -> dict[str, float]:
        """Foreground mean of ``metric`` per case (nanmean over classes; NaN if all classes are NaN)."""
        out = {}
        for case, classes in self.per_case.items():
            vals = np.array([c[metric] for c in classes.values()], dtype=float)
            out[case] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        return out

    def table(self) -> str:
        """The summary as a printable table."""
        lines = [f"{'class':<24}{'dice':>10}{'nsd':>10}"]
        for name, m in self.summary["mean"].items():
            lines.append(f"{name:<24}{_fmt(m['dice']):>10}{_fmt(m['nsd']):>10}")
        fg = self.summary["foreground_mean"]
        lines.append(f"{'foreground mean':<24}{_fmt(fg['dice']):>10}{_fmt(fg['nsd']):>10}")
        lines.append(f"{self.summary['n_cases']} cases evaluated, {len(self.errors)} failed")
        if self.rounded:
            total = sum(sum(r.values()) for r in self.rounded.values())
            lines.append(f"rounded {total} voxels to the nearest integer label (all within {ROUND_TOL:g}) "
                         f"in {len(self.rounded)} case(s)")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def discard_evaluation(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove an earlier run's ``per_case.csv`` and ``summary.json`` from ``out_dir`` (so that they are never
    taken for this run's); returns those that could not be removed (e.g. a read-only folder).

    Example:
        >>> discard_evaluation("runs/d1/pred")  # doctest: +SKIP
        []
    """
    left = []
    for name in OUTPUTS:
        path = Path(out_dir) / name
        try:
            path.unlink(missing_ok=True)
        except OSError:
            if path.exists():
                left.append(path)
    return left


def write_evaluation(result: FolderEvaluation, out_dir: str | os.PathLike[str]) -> None:
    """Write ``per_case.csv`` (one row per case and class) and then ``summary.json``, each atomically.

    An earlier ``summary.json`` is removed first, so a write that fails half-way never leaves an old
    summary next to a new ``per_case.csv``.

    Raises:
        OSError: naming the file that could not be written (and saying when an old summary is left there).

    Example:
        >>> write_evaluation(evaluate_folder("preds/", "labelsTr/", "dataset.json"), "eval/")  # doctest: +SKIP
    """
    from s3d import _fs

    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "dice", "nsd", "n_ref", "n_pred"])
    for case, classes in sorted(result.per_case.items()):
        for name, m in classes.items():
            writer.writerow([case, name, repr(m["dice"]), repr(m["nsd"]), int(m["n_ref"]), int(m["n_pred"])])
    stale = discard_evaluation(out)
    path = out / OUTPUTS[0]
    try:
        _fs.write_text_atomic(path, buf.getvalue())
        path = out / OUTPUTS[1]
        _fs.write_text_atomic(path, json.dumps(_json_safe(result.summary), indent=2) + "\n")
    except OSError as e:
        old = f"; the {', '.join(p.name for p in stale)} there is from an earlier run" if stale else ""
        written = "" if path.name == OUTPUTS[0] else f" ({OUTPUTS[0]} was written)"
        advice = "; free disk space or choose another --out" if isinstance(e, _fs.DiskFullError) else ""
        raise OSError(f"cannot write {path}: {e.strerror or e}{advice}{written}{old}") from e

