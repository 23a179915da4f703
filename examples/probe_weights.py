"""Probe a set of weights: does its frozen encoder help a fresh decoder more than a random encoder does?

Writes a small synthetic tissue dataset (CSF/GM/WM, the demo's data) and runs the frozen-encoder probe
of the shipped ``s3d-demo`` weights against random weights of the same network: for every seed, a fresh
decoder trains on the frozen encoder of each, on a few labelled cases, for a fixed small budget, and
is scored on the held-out cases (sliding windows, as ``s3d predict``). The same from the shell:
``s3d probe --weights s3d-demo --data OUT/Dataset900_DemoTissue --spacing 3.5 3.5 3.5``.

    python examples/probe_weights.py OUT            # 25 cases, 3 seeds, 150 steps (~5 min on 2 CPU cores)
    python examples/probe_weights.py OUT --quick    # CI size: 6 cases, 1 seed, 4 steps
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from s3d.data.synthetic import write_demo_dataset
from s3d.finetune import probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (dataset and probe runs)")
    ap.add_argument("--weights", default="s3d-demo", help="weights to probe (default: s3d-demo, shipped)")
    ap.add_argument("--quick", action="store_true", help="CI size")
    a = ap.parse_args()
    n_cases, seeds, steps, shape, spacing = (6, (0,), 4, (32, 40, 32), 5.0) if a.quick else \
        (25, (0, 1, 2), 150, (48, 56, 48), 3.5)
    ds = a.out / "Dataset900_DemoTissue"
    source = "mni" if importlib.util.find_spec("nilearn") and not a.quick else "phantom"  # s3d-demo saw mni
    if not (ds / "dataset.json").exists():
        write_demo_dataset(ds, task="tissue", source=source, num_train=n_cases, num_test=0, shape=shape,
                           spacing_mm=spacing, progress=False)
    result = probe(a.weights, ds, a.out / "probe", n_train=2 if a.quick else 5, seeds=seeds, steps=steps,
                   patch_size=(32, 32, 32), target_spacing_mm=(spacing,) * 3, progress=False)
    for run in result.runs:
        print(f"seed {run.seed} {run.init:7s}: validation Dice {run.dice:.3f} on {', '.join(run.val_cases)}")
    print(result.summary())


if __name__ == "__main__":
    main()
