"""The demo's ``report.md``: the measured tables, the conclusion, what ran, the figures."""

from __future__ import annotations

import time
from typing import Any

from s3d.demo.report import RunResult, class_table


def report_md(table: str, concl: str, figures: dict[str, str], timings: dict[str, float],
              settings: dict[str, Any], runs: list[RunResult], pre_loss: list[tuple[int, float]],
              probe: dict[str, Any] | None = None) -> str:
    """The text of ``OUT/report.md`` (every number in it comes from ``runs``, ``probe``, ``timings`` and
    ``pre_loss``)."""
    s = settings
    n_min = min(r.n_train for r in runs)
    seeds = sorted({r.seed for r in runs})
    lines = [
        "# s3d demo report",
        "",
        f"Measured on {time.strftime('%Y-%m-%d %H:%M')} on `{s['device']}` in {timings['total'] / 60:.1f} minutes. "
        "Every number below was measured in this run.",
        "",
        "## Result",
        "",
        f"Test set: {s['num_test']} held-out synthetic cases, task `{s['task']}`. Dice and NSD: the mean over "
        f"foreground classes and test cases of one run, then the mean ± standard deviation over the "
        f"{len(seeds)} fine-tuning seeds {seeds} (each seed draws its own labelled cases, initialisation of new "
        f"weights and patches). ΔDice is paired by seed; [min, max] is its spread over seeds. NSD tolerance "
        f"{s['spacing_mm']} mm (one voxel). 'Test cases s3d better than control': cases whose seed-averaged Dice "
        "is higher with the pre-trained weights than with the control. The arms: `s3d` (the pre-trained weights, "
        "their recipe), `control` (random weights through exactly the `s3d` arm's recipe: what the weights add), "
        "`scratch` (random weights, scratch's own recipe).",
        "",
        table,
        "",
        f"**{concl}**",
        "",
        *_probe_lines(probe),
        "Per class (Dice: mean over test cases and seeds; wins: test cases whose seed-averaged Dice of that class "
        "is higher with that arm):",
        "",
        class_table(runs),
        "",
        "## Which weights each arm used",
        "",
        f"- `s3d`: the pre-trained weights {s['weights_description']}, fine-tuned with "
        f"{s['recipes']['s3d']}.",
        f"- `control`: a random initialisation of the same `{s['architecture']}` network (the network the `s3d` "
        f"arm builds for the seed, before the weights overwrite its encoder), fine-tuned with exactly the `s3d` "
        f"arm's recipe, {s['recipes']['control']}.",
        f"- `scratch`: a random initialisation of the same `{s['architecture']}` network, trained with "
        f"{s['recipes']['scratch']}.",
        "",
        f"Every arm: {s['finetune_steps']} steps of batch {s['batch_size']}, patch {tuple(s['patch_size'])}, the "
        "same labelled cases and seed. The recipes (schedule and learning rate of each arm) were chosen on "
        "validation subjects, never on these test cases (docs/quickstart.md, `benchmarks/demo_ablation.py "
        "--select`).",
        "",
        "## What ran",
        "",
        f"1. Data: `s3d.data.synthetic`, source `{s['source']}`, {s['num_unlabelled']} unlabelled volumes "
        f"(T1/T2/FLAIR/PD), {s['num_labelled']} labelled training cases, {s['num_test']} test cases; "
        f"{tuple(s['shape'])} voxels of {s['spacing_mm']} mm. Subjects differ in head size and shape, pose, "
        "deformations, ventricles, atrophy, lesions, tissue contrast, bias, noise, resolution and field of view.",
        f"2. The S3D workflow in miniature: recipe `s3d-b` (sparse MAE, mask ratio U[0.6, 0.9], SGD Nesterov 0.99, "
        f"lr 1e-2, PolyLR) on a `tiny` ResEnc U-Net for {s['pretrain_steps']} steps on those unlabelled volumes, "
        f"mask cells of 16^3 voxels (the network's total stride). Loss {pre_loss[0][1]:.3f} -> "
        f"{pre_loss[-1][1]:.3f}. This short run shows the workflow and the reconstruction figure; as in a model "
        "zoo, the table fine-tunes weights that were pre-trained once, at scale.",
        "3. Fine-tuning of every arm for every training-set size and seed (`s3d.finetune.run`), prediction of the "
        "test cases (`s3d.infer.predict_folder`, without mirroring, for time) and evaluation "
        "(`s3d.metrics.evaluate_folder`).",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        "",
        "This is a miniature of the paper's low-data experiment (Table 4) on synthetic data with a tiny network "
        "and a short fine-tuning; it shows the workflow, not the paper's numbers. See docs/reproducing.md.",
        "",
        "## Figures",
        "",
        "Data (axial slices): unlabelled T1, T2, FLAIR; a labelled case and its labels.",
        "",
        f"![data]({figures['data']})",
        "",
    ]
    if "mae" in figures:
        lines += ["MAE reconstruction after the short pre-training (rows: three orthogonal slices; columns: input, "
                  "masked input, reconstruction, target; z-score units clipped to +-3).", "",
                  f"![mae]({figures['mae']})", ""]
    lines += [
        f"Predictions on the first test case with {n_min} labelled training cases, seed {seeds[0]} (axial slice; "
        "each panel is titled with its arm and that case's Dice).",
        "",
        f"![predictions]({figures['predictions']})",
        "",
        "Learning curves (fine-tuning: mean over seeds).",
        "",
        f"![pretrain loss]({figures['pretrain_loss']})",
        f"![fine-tuning loss]({figures['finetune_loss']})",
        f"![validation Dice]({figures['val_dice']})",
        "",
        "Files: `data/` (the generated NIfTI cohort), `runs/` (checkpoints, metrics.jsonl, models, predictions), "
        "`results.json` (all numbers).",
        "",
    ]
    return "\n".join(lines)


def _probe_lines(probe: dict[str, Any] | None) -> list[str]:
    """The report's probe section: the shipped weights' encoder against a random one, per seed."""
    if probe is None:
        return []
    rows = ["| seed | probe Dice s3d | probe Dice random | delta |", "|---:|---:|---:|---:|"]
    for seed, a, b in zip(probe["seeds"], probe["per_seed"]["s3d"], probe["per_seed"]["random"], strict=True):
        rows.append(f"| {seed} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    rows.append(f"| mean | {probe['s3d']:.3f} | {probe['random']:.3f} | {probe['s3d'] - probe['random']:+.3f} |")
    return ["## The probe: what the pre-trained encoder holds", "",
            f"A fresh decoder trained on the FROZEN encoder of the pre-trained weights, and on a random encoder of "
            f"the same network (`s3d.finetune.probe`, `s3d probe`): {probe['n_train']} labelled cases, "
            f"{probe['steps']} steps, peak lr {probe['peak_lr']:g}; validation Dice (sliding windows, as `s3d "
            f"predict`) on the training pool's held-out cases {', '.join(probe['val_cases'])} (not the test cases).",
            "", *rows, ""]
