"""Ranking (Table 3 of the paper) and bootstrapped rank stability (Fig. 3)."""

from __future__ import annotations

import numpy as np
import pytest

from s3d.metrics import bootstrap_ranks, plot_rank_stability, rank_methods, rank_scores

METHODS = ["No (Dyn.)", "No (Fixed)", "VoCo", "VF", "MG", "S3D-B", "S3D-L"]
# Table 3 of the paper, mean DSC per test dataset (D1-D11), and its "Avg. Rank" row.
TABLE3_DSC = {
    "D1": [57.81, 59.82, 59.70, 59.29, 58.64, 60.35, 59.85],
    "D2": [63.66, 56.53, 56.25, 61.01, 65.39, 65.24, 64.81],
    "D3": [89.18, 89.24, 88.78, 89.03, 89.38, 89.60, 89.34],
    "D4": [63.28, 65.52, 62.97, 65.76, 65.93, 66.95, 64.58],
    "D5": [85.64, 83.44, 83.07, 84.24, 83.91, 84.08, 84.02],
    "D6": [60.28, 78.17, 77.40, 80.09, 79.67, 80.00, 80.01],
    "D7": [77.94, 79.44, 78.14, 78.96, 78.85, 79.70, 79.89],
    "D8": [59.00, 61.85, 57.47, 61.49, 62.52, 62.11, 61.93],
    "D9": [66.73, 65.90, 67.65, 63.34, 68.00, 68.62, 67.94],
    "D10": [93.07, 92.51, 91.97, 92.16, 92.36, 92.19, 92.90],
    "D11": [46.76, 41.97, 40.16, 44.96, 45.48, 47.26, 44.15],
}
TABLE3_AVG_RANK = [4.64, 4.55, 6.27, 4.36, 3.18, 2.00, 3.00]


def test_rank_methods_reproduces_table3_average_rank():
    table = {d: {m: [v] for m, v in zip(METHODS, row, strict=True)} for d, row in TABLE3_DSC.items()}
    ranks = rank_methods(table)
    np.testing.assert_allclose(np.round(ranks.mean_rank, 2), TABLE3_AVG_RANK)
    assert ranks.ranks[0].tolist() == [7, 3, 4, 5, 6, 1, 2]  # D1
    # S3D-B "Avg. DSC": each DSC printed to 0.01 (+-0.005, so their mean too) and the average as well
    # (+-0.005): 0.01, plus float64 rounding
    np.testing.assert_allclose(ranks.means.mean(0)[5], 72.37, atol=0.0101)
    assert "S3D-B" in ranks.to_text()


def test_rank_scores_ties_nan_and_direction():
    np.testing.assert_array_equal(rank_scores(np.array([0.5, 0.9, 0.5, np.nan])), [2.5, 1, 2.5, 4])
    np.testing.assert_array_equal(rank_scores(np.array([3.0, 1.0, 2.0]), higher_is_better=False), [3, 1, 2])


def _synthetic(seed=0, n_cases=30):
    rng = np.random.default_rng(seed)
    table = {}
    for d in range(3):
        base = rng.uniform(0.5, 0.8, n_cases)
        table[f"D{d}"] = {
            "strong": base + 0.10 + rng.normal(0, 0.02, n_cases),
            "mid_a": base + rng.normal(0, 0.02, n_cases),
            "mid_b": base + rng.normal(0, 0.02, n_cases),
            "weak": base - 0.10 + rng.normal(0, 0.02, n_cases),
        }
    return table


def test_bootstrap_dominant_method_is_first_and_seeded():
    table = _synthetic()
    boot = bootstrap_ranks(table, n=1000, seed=7)
    assert boot.ranks.shape == (1000, 3, 4) and boot.aggregate.shape == (1000, 4)
    assert boot.frequency(1.0)["strong"] >= 0.99
    for d in table:
        assert boot.frequency(1.0, d)["strong"] >= 0.99
        assert boot.frequency(4.0, d)["weak"] >= 0.99
    # the two middle methods are indistinguishable: both ranks occur often
    assert 0.2 < boot.frequency(2.0, "D0")["mid_a"] < 0.8
    again = bootstrap_ranks(table, n=1000, seed=7)
    np.testing.assert_array_equal(boot.ranks, again.ranks)
    np.testing.assert_array_equal(boot.aggregate, again.aggregate)
    other = bootstrap_ranks(table, n=1000, seed=8)
    assert not np.array_equal(boot.ranks, other.ranks)


def test_bootstrap_resamples_cases_with_replacement():
    """One draw by hand: the same case indices for every method of a dataset."""
    table = _synthetic(n_cases=12)
    boot = bootstrap_ranks(table, n=3, seed=11)
    rng = np.random.default_rng(11)
    for d, methods in enumerate(table.values()):
        idx = rng.integers(0, 12, size=(3, 12))
        means = np.stack([np.asarray(methods[m])[idx].mean(1) for m in methods], 1)
        np.testing.assert_array_equal(boot.ranks[:, d], rank_scores(means))


def test_bad_tables_are_named():
    with pytest.raises(ValueError, match="'D2'"):
        rank_methods({"D1": {"a": [1.0], "b": [0.5]}, "D2": {"a": [1.0], "c": [0.5]}})
    with pytest.raises(ValueError, match="paired"):
        bootstrap_ranks({"D1": {"a": [1.0, 0.9], "b": [0.5]}})


def test_rank_stability_png_opens(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    boot = bootstrap_ranks(_synthetic(), n=200, seed=0)
    out = tmp_path / "plots" / "rank_stability.png"
    plot_rank_stability(boot, out, title="Dice")
    img = mpl_image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["rank_stability.png"]  # no temporary file left
