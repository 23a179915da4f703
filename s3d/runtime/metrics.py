"""The ``metrics.jsonl`` log every training job writes: one JSON object per line.

Each record has a ``"step"``; training records add ``"loss"``, ``"lr"``..., validation records
``"val_loss"`` or ``"val_dice"``. A line torn by a kill is skipped on reading, and a resumed run
first drops the records of steps after its checkpoint (:meth:`MetricsLog.truncate`), so the log
reads as one uninterrupted run.

Example:
    >>> log = MetricsLog("runs/a/metrics.jsonl")
    >>> log.append({"step": 1, "loss": 0.9})
    >>> log.values("loss")
    {1: 0.9}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from s3d._fs import write_text_atomic

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Append, read and truncate one ``metrics.jsonl`` file.

    Args:
        path: the file (``RUN/metrics.jsonl``; :meth:`of_run` builds it from a run folder).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def of_run(cls, run_dir: str | os.PathLike[str]) -> MetricsLog:
        """The log of a run folder, ``run_dir/metrics.jsonl``."""
        return cls(Path(run_dir) / METRICS_NAME)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (a JSON-able dict with a ``"step"``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, in order (none when the file does not exist)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def values(self, key: str) -> dict[int, float]:
        """``{step: value}`` of ``key`` over the records that have it."""
        return {int(r["step"]): float(r[key]) for r in self.records() if key in r and "step" in r}

    def truncate(self, step: int) -> None:
        """Keep only records of steps ``<= step`` (written before the checkpoint a run resumes from)."""
        if self.path.exists():
            keep = [r for r in self.records() if r.get("step", 0) <= step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def clear(self) -> None:
        """Remove the file (a run that starts from step 0)."""
        self.path.unlink(missing_ok=True)


def read_metrics(run_dir: str | os.PathLike[str], key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of ``key`` from a run folder's ``metrics.jsonl``.

    Example:
        >>> read_metrics("runs/a")[1]
        1.02
    """
    return MetricsLog.of_run(run_dir).values(key)
