"""``s3d demo``: the paper's story on built-in data, on a laptop, in minutes."""

from s3d.demo.run import (
    DemoResult,
    DemoSettings,
    RunResult,
    conclusion,
    demo_settings,
    line_plot,
    plan_steps,
    results_table,
    run_demo,
    time_train_step,
)

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
