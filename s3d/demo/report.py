"""What an ``s3d demo`` run measured, and the text made from it: tables over seeds, conclusion, report.md."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARMS = ("s3d", "scratch")


@dataclass
class RunResult:
    """One fine-tuning run of the comparison (one arm, one training-set size, one seed)."""

    n_train: int
    init: str  # "s3d" (from the pre-trained weights) or "scratch"
    dice: float
    nsd: float
    dice_per_case: dict[str, float]
    steps: int
    seconds: float
    run_dir: str
    val_dice: list[tuple[int, float]] = field(default_factory=list)
    loss: list[tuple[int, float]] = field(default_factory=list)
    dice_per_class: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    dice_per_case_class: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: str = ""
    recipe: str = ""


@dataclass
class DemoResult:
    """What :func:`~s3d.demo.run_demo` measured and wrote."""

    report: Path
    runs: list[RunResult]
    table: str
    conclusion: str
    timings_s: dict[str, float]
    settings: dict[str, Any]


def fmt_score(x: float) -> str:
    """A score for tables and logs: three decimals, ``"n/a"`` when not finite.

    Example:
        >>> fmt_score(0.91234), fmt_score(float("nan"))
        ('0.912', 'n/a')
    """
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def _pm(xs: list[float]) -> str:
    sd = _sd(xs)
    return fmt_score(_mean(xs)) + ("" if not math.isfinite(sd) else f" ± {sd:.3f}")


def _runs(runs: list[RunResult], n: int, init: str) -> list[RunResult]:
    return sorted((r for r in runs if r.n_train == n and r.init == init), key=lambda r: r.seed)


def deltas(runs: list[RunResult], n: int) -> list[float]:
    """Per-seed ΔDice (S3D - scratch) at ``n`` labelled cases, paired by seed.

    Example:
        >>> deltas([RunResult(5, "s3d", 0.8, 0, {}, 1, 1, ""), RunResult(5, "scratch", 0.7, 0, {}, 1, 1, "")], 5)
        [0.10000000000000009]
    """
    a = {r.seed: r.dice for r in _runs(runs, n, "s3d")}
    b = {r.seed: r.dice for r in _runs(runs, n, "scratch")}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _case_means(rs: list[RunResult], cls: str | None = None) -> dict[str, float]:
    """Per test case: the Dice (of class ``cls``, or the foreground mean) averaged over seeds."""
    cases = sorted({c for r in rs for c in r.dice_per_case})
    if cls is None:
        return {c: _mean([r.dice_per_case[c] for r in rs if c in r.dice_per_case]) for c in cases}
    return {c: _mean([r.dice_per_case_class.get(c, {}).get(cls, float("nan")) for r in rs]) for c in cases}


def wins(runs: list[RunResult], n: int, cls: str | None = None) -> tuple[int, int, int]:
    """(test cases S3D wins, cases scratch wins, cases in all) by seed-averaged Dice, of one class or the mean.

    Example:
        >>> a = RunResult(5, "s3d", 0.8, 0, {"c1": 0.9, "c2": 0.5}, 1, 1, "")
        >>> b = RunResult(5, "scratch", 0.7, 0, {"c1": 0.8, "c2": 0.6}, 1, 1, "")
        >>> wins([a, b], 5)
        (1, 1, 2)
    """
    a, b = _case_means(_runs(runs, n, "s3d"), cls), _case_means(_runs(runs, n, "scratch"), cls)
    common = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
    return sum(a[c] > b[c] for c in common), sum(b[c] > a[c] for c in common), len(common)


def results_table(runs: list[RunResult]) -> str:
    """Markdown table: per training-set size, Dice and NSD of both arms over seeds, ΔDice per seed, wins."""
    seeds = sorted({r.seed for r in runs})
    lines = [f"| labelled cases | Dice S3D | Dice scratch | ΔDice (mean [min, max] over {len(seeds)} seeds) | "
             "NSD S3D | NSD scratch | test cases S3D better |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r.n_train for r in runs}):
        a, b = _runs(runs, n, "s3d"), _runs(runs, n, "scratch")
        d = deltas(runs, n)
        better, _, total = wins(runs, n)
        spread = f" [{min(d):+.3f}, {max(d):+.3f}]" if len(d) > 1 else ""
        lines.append(f"| {n} | {_pm([r.dice for r in a])} | {_pm([r.dice for r in b])} | {_mean(d):+.3f}{spread} | "
                     f"{_pm([r.nsd for r in a])} | {_pm([r.nsd for r in b])} | {better}/{total} |")
    return "\n".join(lines)


def class_table(runs: list[RunResult]) -> str:
    """Markdown table: per class and training-set size, the Dice of each arm and the test cases each wins.

    Example:
        >>> r = RunResult(5, "s3d", 0.5, 0.5, {"c": 0.5}, 10, 1.0, "x", dice_per_class={"GM": 0.8},
        ...               dice_per_case_class={"c": {"GM": 0.8}})
        >>> s = RunResult(5, "scratch", 0.4, 0.4, {"c": 0.4}, 10, 1.0, "x", dice_per_class={"GM": 0.7},
        ...               dice_per_case_class={"c": {"GM": 0.7}})
        >>> class_table([r, s]).splitlines()[2]
        '| 5 | GM | 0.800 | 0.700 | +0.100 | 1 | 0 |'
    """
    names = list(dict.fromkeys(k for r in runs for k in r.dice_per_class))
    lines = ["| labelled cases | class | Dice S3D | Dice scratch | ΔDice | test cases S3D wins | "
             "test cases scratch wins |", "|---:|---|---:|---:|---:|---:|---:|"]
    for n in sorted({r.n_train for r in runs}):
        for k in names:
            a = _mean([r.dice_per_class.get(k, float("nan")) for r in _runs(runs, n, "s3d")])
            b = _mean([r.dice_per_class.get(k, float("nan")) for r in _runs(runs, n, "scratch")])
            wa, wb, _ = wins(runs, n, k)
            lines.append(f"| {n} | {k} | {fmt_score(a)} | {fmt_score(b)} | {a - b:+.3f} | {wa} | {wb} |")
    return "\n".join(lines)


def conclusion(runs: list[RunResult]) -> str:
    """One sentence derived from the measured per-seed ΔDice (never a fixed claim).

    The pre-trained arm "beats" scratch at a size when every seed's ΔDice is > 0 (the spread over seeds
    excludes zero), "ties" when the mean ΔDice is within +-0.005 or the seeds disagree, and "loses" when
    every seed's ΔDice is < 0.
    """
    sizes = sorted({r.n_train for r in runs})
    verdict = {}
    for n in sizes:
        d = deltas(runs, n)
        verdict[n] = "beat" if min(d) > 0 else "lost" if max(d) < 0 else "tie"
    span = ", ".join(f"{n} cases: {_mean(deltas(runs, n)):+.3f}" for n in sizes)
    k = len({r.seed for r in runs})
    over = f"over {k} seed{'s' if k > 1 else ''}"
    if all(v == "beat" for v in verdict.values()):
        return f"In this run, fine-tuning the pre-trained weights beat training from scratch at every training-set " \
               f"size, on every seed (mean ΔDice {span}; {over})."
    if not any(v == "beat" for v in verdict.values()):
        return (f"In this run, fine-tuning the pre-trained weights did NOT beat training from scratch on every seed "
                f"at any training-set size (mean ΔDice {span}; {over}).")
    won = [n for n in sizes if verdict[n] == "beat"]
    rest = [n for n in sizes if verdict[n] != "beat"]
    return (f"In this run, fine-tuning the pre-trained weights beat training from scratch on every seed with "
            f"{', '.join(map(str, won))} labelled cases but not with {', '.join(map(str, rest))} "
            f"(mean ΔDice {span}; {over}).")
