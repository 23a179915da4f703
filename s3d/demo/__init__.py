"""``s3d demo``: the paper's story on built-in data, on a laptop, in minutes.

One call of :func:`run_demo` does, in this process and with the library's public functions:

1. generate a cohort with :mod:`s3d.data.synthetic` (unlabelled volumes + a labelled nnU-Net dataset
   with a held-out test split);
2. pre-train a small ResEnc U-Net (``tiny`` preset) with the S3D-B recipe scaled down
   (:func:`s3d.data.scan.prepare`, :func:`s3d.pretrain.run`; mask cells = the network's
   total stride, as 32^3 cells are for ResEnc-L);
3. fine-tune it with the paper's best schedule (:func:`s3d.finetune.run`, ``"best"``) on
   N labelled cases for each N of ``train_sizes``, and train the same network from scratch
   (``"scratch"``) on the same cases for the same number of steps;
4. predict the held-out test cases (:func:`s3d.infer.predict_folder`) and score Dice and NSD
   (:func:`s3d.metrics.evaluate_folder`);
5. write ``OUT/report.md`` with the measured table, learning curves, the MAE reconstruction snapshot and
   prediction overlays (PNG via PIL).

The step counts follow a time budget (``minutes``): a few training steps are timed first and the
remaining time is shared between pre-training (40 %) and the fine-tuning runs (60 %). Every number in
the report is measured in the run that wrote it.

Modules: :mod:`~s3d.demo.settings` (sizes, budget, step planning), :mod:`~s3d.demo.run` (the
orchestration: every call into data preparation, training, inference and metrics), :mod:`~s3d.demo.report`
(results, tables, conclusion, report.md), :mod:`~s3d.demo.figures` (PNG plots and overlays).

Example:
    >>> from s3d.demo import demo_settings, run_demo
    >>> result = run_demo(demo_settings("s3d-demo", quick=True))
    >>> result.report
    PosixPath('s3d-demo/report.md')
"""

from s3d.demo.figures import line_plot
from s3d.demo.report import DemoResult, RunResult, conclusion, results_table
from s3d.demo.run import run_demo
from s3d.demo.settings import DemoSettings, demo_settings, plan_steps, time_train_step

__all__ = [
    "DemoResult",
    "DemoSettings",
    "RunResult",
    "conclusion",
    "demo_settings",
    "line_plot",
    "plan_steps",
    "results_table",
    "run_demo",
    "time_train_step",
]
