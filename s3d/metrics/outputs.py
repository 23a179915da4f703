"""The files of a folder evaluation: ``per_case.csv`` and ``summary.json``, written atomically, never stale."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3d.metrics.evaluate import FolderEvaluation

#: the files :func:`write_evaluation` writes (never listed as ignored inputs of a prediction folder)
OUTPUTS = ("per_case.csv", "summary.json")


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

