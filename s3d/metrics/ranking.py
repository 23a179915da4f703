"""Ranking methods across datasets (Table 3 of the paper) and bootstrapped rank stability (Fig. 3)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ScoreTable = Mapping[str, Mapping[str, Sequence[float]]]
"""dataset -> method -> per-case scores (the same cases, in the same order, for every method)."""


@dataclass
class RankTable:
    """Per-dataset mean scores and ranks, and the average rank of each method.

    Attributes:
        datasets: dataset names, in table order (rows).
        methods: method names (columns).
        means: (D, M) nanmean score of each method on each dataset.
        ranks: (D, M) rank within each dataset, 1 = best; ties share the average rank.
        mean_rank: (M,) average of the per-dataset ranks (Table 3's "Avg. Rank").
    """

    datasets: list[str]
    methods: list[str]
    means: np.ndarray
    ranks: np.ndarray
    mean_rank: np.ndarray

    def to_text(self, digits: int = 2) -> str:
        """A printable table: one row per dataset, then the average score and the average rank."""
        width = max(10, *(len(m) + 2 for m in self.methods))
        first = max(16, *(len(d) + 2 for d in self.datasets))
        head = f"{'dataset':<{first}}" + "".join(f"{m:>{width}}" for m in self.methods)
        rows = [head]
        for d, name in enumerate(self.datasets):
            cells = "".join(f"{self.means[d, m]:>{width}.4f}" for m in range(len(self.methods)))
            rows.append(f"{name:<{first}}{cells}")
        avg = np.nanmean(self.means, axis=0)
        rows.append(f"{'average':<{first}}" + "".join(f"{v:>{width}.4f}" for v in avg))
        rows.append(f"{'average rank':<{first}}" + "".join(f"{v:>{width}.{digits}f}" for v in self.mean_rank))
        return "\n".join(rows)


def _check_table(table: ScoreTable) -> tuple[list[str], list[str], list[np.ndarray]]:
    if not table:
        raise ValueError("the score table is empty: expected {dataset: {method: [per-case scores]}}")
    datasets = list(table)
    methods = list(table[datasets[0]])
    if len(methods) < 2:
        raise ValueError(f"dataset {datasets[0]!r}: ranking needs at least two methods, found {methods}")
    arrays = []
    for d in datasets:
        if set(table[d]) != set(methods):
            raise ValueError(f"dataset {d!r} has methods {sorted(table[d])}, expected {sorted(methods)}")
        rows = [np.asarray(table[d][m], dtype=float) for m in methods]
        n = {len(r) for r in rows}
        if len(n) != 1 or 0 in n or any(r.ndim != 1 for r in rows):
            counts = {m: len(r) for m, r in zip(methods, rows, strict=True)}
            raise ValueError(f"dataset {d!r}: every method needs the same, non-zero number of per-case "
                             f"scores (paired cases), found {counts}")
        arrays.append(np.stack(rows))  # (M, C)
    return datasets, methods, arrays


def rank_scores(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank along the last axis, 1 = best; ties get the average of their ranks; NaN ranks last.

    Example:
        >>> rank_scores(np.array([0.9, 0.7, 0.9]))
        array([1.5, 3. , 1.5])
    """
    s = np.asarray(scores, dtype=float)
    s = s if higher_is_better else -s
    s = np.where(np.isnan(s), -np.inf, s)
    better = (s[..., None, :] > s[..., :, None]).sum(-1)
    ties = (s[..., None, :] == s[..., :, None]).sum(-1) - 1
    return 1.0 + better + 0.5 * ties


def _nanmean_last(x: np.ndarray) -> np.ndarray:
    finite = ~np.isnan(x)
    count = finite.sum(-1)
    total = np.where(finite, x, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def rank_methods(table: ScoreTable, higher_is_better: bool = True) -> RankTable:
    """Rank methods on each dataset by their mean score and average the ranks across datasets.

    Args:
        table: ``{dataset: {method: per-case scores}}``; NaN scores are skipped (nanmean).
        higher_is_better: True for Dice/NSD.

    Returns:
        A :class:`RankTable`.

    Example:
        >>> t = rank_methods({"D1": {"a": [0.9, 0.8], "b": [0.7, 0.6]}, "D2": {"a": [0.5], "b": [0.6]}})
        >>> t.mean_rank.tolist()
        [1.5, 1.5]
    """
    datasets, methods, arrays = _check_table(table)
    means = np.stack([_nanmean_last(a) for a in arrays])  # (D, M)
    ranks = rank_scores(means, higher_is_better)
    return RankTable(datasets, methods, means, ranks, ranks.mean(axis=0))


@dataclass
class BootstrapRanks:
    """Rank distributions from :func:`bootstrap_ranks`.

    Attributes:
        datasets: dataset names.
        methods: method names.
        ranks: (n, D, M) rank of each method on each dataset in each bootstrap draw.
        aggregate: (n, M) rank of each method by its average rank over datasets, per draw.
        seed: the seed the draws came from.
    """

    datasets: list[str]
    methods: list[str]
    ranks: np.ndarray
    aggregate: np.ndarray
    seed: int | None

    def frequency(self, rank: float = 1.0, dataset: str | None = None) -> dict[str, float]:
        """Fraction of draws in which each method has ``rank`` (on ``dataset``, or aggregated)."""
        r = self.aggregate if dataset is None else self.ranks[:, self.datasets.index(dataset)]
        return {m: float(np.mean(r[:, i] == rank)) for i, m in enumerate(self.methods)}

    def interval(self, dataset: str | None = None, q: tuple[float, float] = (2.5, 97.5)) -> np.ndarray:
        """(M, 3) median and the ``q`` percentiles of each method's rank."""
        r = self.aggregate if dataset is None else self.ranks[:, self.datasets.index(dataset)]
        return np.stack([np.median(r, 0), np.percentile(r, q[0], 0), np.percentile(r, q[1], 0)], 1)


def bootstrap_ranks(
    table: ScoreTable, n: int = 1000, seed: int | None = 0, higher_is_better: bool = True
) -> BootstrapRanks:
    """Resample cases with replacement per dataset, re-rank, and collect the rank distributions.

    In every draw each dataset's cases are resampled once (the same case indices for every method,
    so comparisons stay paired), methods are ranked by their mean over the resampled cases, and the
    aggregated rank is the rank of each method's average rank over datasets.

    Args:
        table: ``{dataset: {method: per-case scores}}``.
        n: number of bootstrap draws.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same result.
        higher_is_better: True for Dice/NSD.

    Returns:
        A :class:`BootstrapRanks`.

    Example:
        >>> b = bootstrap_ranks({"D1": {"a": [0.9, 0.8, 0.95], "b": [0.1, 0.2, 0.3]}}, n=100, seed=1)
        >>> b.frequency(1.0)["a"]
        1.0
    """
    if n < 1:
        raise ValueError(f"n (bootstrap draws) must be >= 1, found {n}")
    datasets, methods, arrays = _check_table(table)
    rng = np.random.default_rng(seed)
    ranks = np.empty((n, len(datasets), len(methods)))
    for d, scores in enumerate(arrays):
        idx = rng.integers(0, scores.shape[1], size=(n, scores.shape[1]))  # (n, C)
        means = _nanmean_last(scores[:, idx])  # (M, n)
        ranks[:, d] = rank_scores(means.T, higher_is_better)
    aggregate = rank_scores(-ranks.mean(axis=1))  # lower average rank = better
    return BootstrapRanks(datasets, methods, ranks, aggregate, seed)


def plot_rank_stability(
    boot: BootstrapRanks, path: str | os.PathLike[str], title: str | None = None, dpi: int = 120
) -> None:
    """Blob plot of the rank distributions (one panel per dataset, plus "aggregated"), saved as PNG.

    Blob area is the fraction of draws with that rank; the black dot is the median rank and the
    black line spans the 95% interval (2.5th to 97.5th percentile). Needs matplotlib
    (``pip install "s3d[plot]"``). The file is written atomically.

    Example:
        >>> plot_rank_stability(bootstrap_ranks(table), "rank_stability.png")  # doctest: +SKIP
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('plot_rank_stability needs matplotlib: pip install "s3d[plot]"') from e
    from s3d._fs import atomic_path

    panels = [(d, boot.ranks[:, i]) for i, d in enumerate(boot.datasets)]
    if len(boot.datasets) > 1 or not panels:
        panels.append(("aggregated", boot.aggregate))
    n_methods = len(boot.methods)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(max(3.0, 0.6 * n_methods + 1.5) * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    x = np.arange(n_methods)
    for p, (name, r) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, p + 1)
        for m in range(n_methods):
            values, counts = np.unique(r[:, m], return_counts=True)
            ax.scatter(np.full(values.shape, m), values, s=600 * counts / r.shape[0],
                       alpha=0.5, color=f"C{m % 10}", linewidths=0)
            lo, hi = np.percentile(r[:, m], [2.5, 97.5])
            ax.vlines(m, lo, hi, color="black", linewidth=1.2)
            ax.plot(m, np.median(r[:, m]), "o", color="black", markersize=3)
        ax.set_xticks(x, boot.methods, rotation=45, ha="right")
        ax.set_ylim(n_methods + 0.5, 0.5)
        ax.set_yticks(np.arange(1, n_methods + 1))
        ax.set_ylabel("rank")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
