"""Segmentation metrics: Dice, NSD (surface Dice), folder evaluation and bootstrapped ranking.

scipy (``pip install "s3d[scipy]"``) is needed by :func:`nsd`, matplotlib (``pip install
"s3d[plot]"``) by :func:`plot_rank_stability`; both are imported only when used.
"""

from s3d.metrics.evaluate import FolderEvaluation, evaluate_case, evaluate_folder
from s3d.metrics.labels import ROUND_TOL, LabelSet, load_labels, to_label_map
from s3d.metrics.outputs import discard_evaluation, write_evaluation
from s3d.metrics.overlap import EmptyPolicy, dice
from s3d.metrics.ranking import (
    BootstrapRanks,
    RankTable,
    bootstrap_ranks,
    plot_rank_stability,
    rank_methods,
    rank_scores,
)
from s3d.metrics.surface import nsd, surfel_area_table, surfels

__all__ = [
    "ROUND_TOL",
    "BootstrapRanks",
    "EmptyPolicy",
    "FolderEvaluation",
    "LabelSet",
    "RankTable",
    "bootstrap_ranks",
    "dice",
    "discard_evaluation",
    "evaluate_case",
    "evaluate_folder",
    "load_labels",
    "nsd",
    "plot_rank_stability",
    "rank_methods",
    "rank_scores",
    "surfel_area_table",
    "surfels",
    "to_label_map",
    "write_evaluation",
]
