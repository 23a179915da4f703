"""What an ``s3d demo`` run measured, and the text made from it: tables over seeds, conclusion, report.md."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The demo's arms: the pre-trained weights with their recipe, random weights through exactly that recipe
#: (the control), random weights with scratch's own recipe.
ARMS = ("s3d", "control", "scratch")


@dataclass
class RunResult:
    """One fine-tuning run of the comparison (one arm, one training-set size, one seed)."""

    n_train: int
    init: str  # "s3d" (pre-trained weights), "control" (random weights, s3d's recipe) or "scratch"
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
    probe: dict[str, Any] | None = None


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


def deltas(runs: list[RunResult], n: int, versus: str = "control") -> list[float]:
    """Per-seed ΔDice (s3d - ``versus``) at ``n`` labelled cases, paired by seed.

    Example:
        >>> deltas([RunResult(5, "s3d", 0.8, 0, {}, 1, 1, ""), RunResult(5, "control", 0.7, 0, {}, 1, 1, "")], 5)
        [0.10000000000000009]
    """
    a = {r.seed: r.dice for r in _runs(runs, n, "s3d")}
    b = {r.seed: r.dice for r in _runs(runs, n, versus)}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def _case_means(rs: list[RunResult], cls: str | None = None) -> dict[str, float]:
    """Per test case: the Dice (of class ``cls``, or the foreground mean) averaged over seeds."""
    cases = sorted({c for r in rs for c in r.dice_per_case})
    if cls is None:
        return {c: _mean([r.dice_per_case[c] for r in rs if c in r.dice_per_case]) for c in cases}
    return {c: _mean([r.dice_per_case_class.get(c, {}).get(cls, float("nan")) for r in rs]) for c in cases}


def wins(runs: list[RunResult], n: int, cls: str | None = None, versus: str = "control") -> tuple[int, int, int]:
    """(test cases s3d wins, cases ``versus`` wins, cases in all) by seed-averaged Dice, of one class or the mean.

    Example:
        >>> a = RunResult(5, "s3d", 0.8, 0, {"c1": 0.9, "c2": 0.5}, 1, 1, "")
        >>> b = RunResult(5, "control", 0.7, 0, {"c1": 0.8, "c2": 0.6}, 1, 1, "")
        >>> wins([a, b], 5)
        (1, 1, 2)
    """
    a, b = _case_means(_runs(runs, n, "s3d"), cls), _case_means(_runs(runs, n, versus), cls)
    common = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
    return sum(a[c] > b[c] for c in common), sum(b[c] > a[c] for c in common), len(common)


def _spread(d: list[float]) -> str:
    return f"{_mean(d):+.3f}" + (f" [{min(d):+.3f}, {max(d):+.3f}]" if len(d) > 1 else "")


def results_table(runs: list[RunResult]) -> str:
    """Markdown table: per training-set size, Dice and NSD of every arm over seeds, ΔDice of s3d against the
    control and against scratch (per seed: mean [min, max]), test cases s3d wins against the control."""
    seeds = sorted({r.seed for r in runs})
    arms = [a for a in ARMS if any(r.init == a for r in runs)]
    k = len(seeds)
    head = ["labelled cases", *(f"Dice {a}" for a in arms)]
    head += [f"ΔDice s3d − {b} (mean [min, max] over {k} seeds)" for b in arms if b != "s3d"]
    head += [*(f"NSD {a}" for a in arms)]
    head += ["test cases s3d better than control"] if "control" in arms else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n in sorted({r.n_train for r in runs}):
        cells = [str(n), *(_pm([r.dice for r in _runs(runs, n, a)]) for a in arms)]
        cells += [_spread(deltas(runs, n, b)) for b in arms if b != "s3d"]
        cells += [_pm([r.nsd for r in _runs(runs, n, a)]) for a in arms]
        if "control" in arms:
            better, _, total = wins(runs, n)
            cells.append(f"{better}/{total}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_table(runs: list[RunResult]) -> str:
    """Markdown table: per class and training-set size, the Dice of every arm and the test cases s3d and the
    control each win.

    Example:
        >>> r = RunResult(5, "s3d", 0.5, 0.5, {"c": 0.5}, 10, 1.0, "x", dice_per_class={"GM": 0.8},
        ...               dice_per_case_class={"c": {"GM": 0.8}})
        >>> s = RunResult(5, "control", 0.4, 0.4, {"c": 0.4}, 10, 1.0, "x", dice_per_class={"GM": 0.7},
        ...               dice_per_case_class={"c": {"GM": 0.7}})
        >>> class_table([r, s]).splitlines()[2]
        '| 5 | GM | 0.800 | 0.700 | +0.100 | 1 | 0 |'
    """
    names = list(dict.fromkeys(k for r in runs for k in r.dice_per_class))
    arms = [a for a in ARMS if any(r.init == a for r in runs)]
    lines = ["| labelled cases | class | " + " | ".join(f"Dice {a}" for a in arms) + " | ΔDice s3d − control | "
             "test cases s3d wins | test cases control wins |", "|---:|---|" + "---:|" * (len(arms) + 3)]
    for n in sorted({r.n_train for r in runs}):
        for k in names:
            dice = {a: _mean([r.dice_per_class.get(k, float("nan")) for r in _runs(runs, n, a)]) for a in arms}
            wa, wb, _ = wins(runs, n, k)
            diff = dice.get("s3d", float("nan")) - dice.get("control", float("nan"))
            cells = " | ".join(fmt_score(dice[a]) for a in arms)
            lines.append(f"| {n} | {k} | {cells} | {diff:+.3f} | {wa} | {wb} |")
    return "\n".join(lines)


def _verdicts(runs: list[RunResult], versus: str) -> dict[int, str]:
    out = {}
    for n in sorted({r.n_train for r in runs}):
        d = deltas(runs, n, versus)
        out[n] = "beat" if d and min(d) > 0 else "lost" if d and max(d) < 0 else "tie"
    return out


def conclusion(runs: list[RunResult]) -> str:
    """Sentences derived from the measured per-seed ΔDice of s3d against the control (never a fixed claim),
    then against scratch.

    s3d "beats" an arm at a size when every seed's ΔDice is > 0 (the spread over seeds excludes zero),
    "loses" when every seed's ΔDice is < 0, and is level otherwise.
    """
    sizes = sorted({r.n_train for r in runs})
    k = len({r.seed for r in runs})
    over = f"over {k} seed{'s' if k > 1 else ''}"
    parts = []
    for versus, what in (("control", "the control (random weights through the same recipe)"), ("scratch", "it")):
        if not any(r.init == versus for r in runs):
            continue
        v = _verdicts(runs, versus)
        span = ", ".join(f"{n} cases: {_mean(deltas(runs, n, versus)):+.3f}" for n in sizes)
        won = [n for n in sizes if v[n] == "beat"]
        lost = [n for n in sizes if v[n] == "lost"]
        if len(won) == len(sizes):
            verdict = "beat " + what + " on every seed at every training-set size"
        elif not won:
            verdict = "did NOT beat " + what + " on every seed at any training-set size"
        else:
            rest = [n for n in sizes if n not in won]
            verdict = (f"beat {what} on every seed with {', '.join(map(str, won))} labelled cases but not with "
                       f"{', '.join(map(str, rest))}")
        if lost:
            verdict += f" (it lost on every seed with {', '.join(map(str, lost))})"
        parts.append(f"{verdict} (mean ΔDice {span}; {over})")
    if not parts:
        return "In this run, no arm was compared with the pre-trained weights."
    text = "In this run, fine-tuning the pre-trained weights " + parts[0] + "."
    if len(parts) > 1:
        text += " Compared with scratch (random weights, scratch's own recipe), it " + parts[1] + "."
    return text
