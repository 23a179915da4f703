"""What of a source was used: counts per rejection rule and per source dataset (``s3d pretrain --report``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from s3d.data.scan.headers import RULES


def _rule(entry: dict[str, Any]) -> str:
    if entry["status"] == "ok":
        return "ok"
    return entry.get("rule") or "unrecorded"  # manifests written before rules were recorded


def manifest_report(manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts of a manifest: ``by_rule`` ({rule: files}, ``"ok"`` for used ones), ``by_dataset``
    ({dataset: {rule: files}}) and ``total``. A 4D image split into volumes counts once per volume.

    Example:
        >>> manifest_report(read_manifest("prep/"))["by_rule"]
        {'ok': 40, 'fov': 2, 'unreadable': 1}
    """
    entries = manifest["entries"]
    by_rule = Counter(_rule(e) for e in entries)
    by_dataset: dict[str, Counter] = {}
    for e in entries:
        by_dataset.setdefault(e.get("dataset") or "?", Counter())[_rule(e)] += 1
    order = ["ok", *[r for r in RULES if r in by_rule], *sorted(r for r in by_rule if r != "ok" and r not in RULES)]
    return {"total": len(entries),
            "by_rule": {r: by_rule[r] for r in order if by_rule[r]},
            "by_dataset": {d: dict(c) for d, c in sorted(by_dataset.items())}}


def format_report(manifest: dict[str, Any], name: str = "manifest.json", top: int | None = None) -> str:
    """A plain-text table of :func:`manifest_report`: one line per rule, then one per dataset
    (files, used, and the count of every rule), largest datasets first (``top`` limits them).

    Example:
        >>> print(format_report(read_manifest("prep/")))  # doctest: +SKIP
    """
    rep = manifest_report(manifest)
    total, by_rule = rep["total"], rep["by_rule"]
    used = by_rule.get("ok", 0)
    lines = [f"{name}: {total} file(s)/volume(s) listed, {used} used ({100 * used / max(total, 1):.1f} %)", "",
             f"{'rule':<12} {'files':>8}  meaning"]
    for r, n in by_rule.items():
        meaning = "used for training" if r == "ok" else RULES.get(r, "")
        lines.append(f"{r:<12} {n:>8}  {meaning}")
    rules = [r for r in by_rule if r != "ok"]
    datasets = sorted(rep["by_dataset"].items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    if top is not None:
        datasets = datasets[:top]
    width = max([7, *(len(d) for d, _ in datasets)])
    lines += ["", f"{'dataset':<{width}} {'files':>7} {'used':>7} " + " ".join(f"{r:>10}" for r in rules)]
    for d, c in datasets:
        lines.append(f"{d:<{width}} {sum(c.values()):>7} {c.get('ok', 0):>7} "
                     + " ".join(f"{c.get(r, 0):>10}" for r in rules))
    left = len(rep["by_dataset"]) - len(datasets)
    if left > 0:
        lines.append(f"... {left} more dataset(s)")
    return "\n".join(lines)
