"""``s3d demo``: what pre-training buys a user with few labels, on built-in data, on a laptop, in minutes.

A model zoo works this way round: pre-training is done once, at scale; the user loads the weights and
fine-tunes briefly. One call of :func:`run_demo` shows that, with the library's public functions:

1. generate a cohort with :mod:`s3d.data.synthetic` (subjects that really differ: anatomy, contrast,
   acquisition; a labelled nnU-Net dataset with held-out test cases and a few unlabelled volumes);
2. run the S3D workflow in miniature: a short sparse-MAE pre-training of a ``tiny`` ResEnc U-Net on
   the unlabelled volumes (:func:`s3d.pretrain.run`), for the reconstruction figure;
3. three arms on 2 and 10 labelled cases, for several seeds: fine-tune the weights pre-trained once at
   scale (``s3d``: ``s3d-demo``, shipped with s3d and made by ``s3d demo --make-weights``,
   :mod:`~s3d.demo.weights`), random weights through exactly that recipe (``control``), and random
   weights with scratch's recipe (``scratch``); the recipes were chosen on validation cases
   (:data:`~s3d.demo.settings.RECIPES`);
4. predict the held-out test cases and score Dice and NSD (:mod:`~s3d.demo.compare`); probe the
   weights' frozen encoder against a random one (:func:`s3d.finetune.probe`);
5. print the table (mean and spread over seeds, ΔDice against the control and scratch, per-class Dice,
   test cases won) and write ``OUT/report.md`` and ``OUT/results.json`` with the probe, learning curves,
   the MAE reconstruction and prediction overlays (every panel titled).

Modules: :mod:`~s3d.demo.settings` (sizes, seeds, recipes, plan), :mod:`~s3d.demo.run` (the
orchestration), :mod:`~s3d.demo.compare` (one arm: fine-tune, predict, score), :mod:`~s3d.demo.report`
(results over seeds, tables, conclusion), :mod:`~s3d.demo.markdown` (report.md),
:mod:`~s3d.demo.figures` (PNG plots and overlays), :mod:`~s3d.demo.weights` (the shipped weights).

Example:
    >>> from s3d.demo import demo_settings, run_demo
    >>> result = run_demo(demo_settings("s3d-demo", quick=True))
    >>> result.report
    PosixPath('s3d-demo/report.md')
"""

from s3d.demo.compare import finetune_and_score
from s3d.demo.report import DemoResult, RunResult, class_table, conclusion, deltas, results_table, wins
from s3d.demo.run import plan, run_demo, weights_info
from s3d.demo.settings import (
    DEMO_WEIGHTS,
    RECIPES,
    DemoSettings,
    FinetuneRecipe,
    demo_settings,
    plan_steps,
    time_train_step,
)
from s3d.demo.weights import WeightsRecipe, make_demo_weights
from s3d.runtime.plot import line_plot

__all__ = [
    "DEMO_WEIGHTS",
    "RECIPES",
    "DemoResult",
    "DemoSettings",
    "FinetuneRecipe",
    "RunResult",
    "WeightsRecipe",
    "class_table",
    "conclusion",
    "deltas",
    "demo_settings",
    "finetune_and_score",
    "line_plot",
    "make_demo_weights",
    "plan",
    "plan_steps",
    "results_table",
    "run_demo",
    "time_train_step",
    "weights_info",
    "wins",
]
