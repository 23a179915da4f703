"""``s3d demo --quick``: the CI smoke run of the front door (data, pre-training, fine-tuning, report)."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from s3d.cli import main
from s3d.demo import RunResult, conclusion, line_plot, plan_steps, results_table, time_train_step

pytest.importorskip("scipy")  # resampling (pre-training data) and NSD need it


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else float("nan")


def test_quick_demo_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--source", "phantom", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = out / "report.md"
    assert f"report: {report.resolve()}" in printed
    assert "| labelled cases | Dice S3D | Dice scratch |" in printed

    # the table in the report holds the numbers that were measured (results.json) ...
    results = json.loads((out / "results.json").read_text())
    text = report.read_text()
    runs = {(r["n_train"], r["init"]): r for r in results["runs"]}
    assert set(runs) == {(5, "s3d"), (5, "scratch")}
    number = r" \| ([-+0-9.]+)"
    row = re.search(r"^\| 5" + number * 5 + r" \|", text, re.M)
    assert row is not None, text
    assert float(row[1]) == pytest.approx(runs[(5, "s3d")]["dice"], abs=5e-4)
    assert float(row[2]) == pytest.approx(runs[(5, "scratch")]["dice"], abs=5e-4)
    assert float(row[4]) == pytest.approx(runs[(5, "s3d")]["nsd"], abs=5e-4)
    # ... and those equal Dice recomputed here from the written predictions and test labels
    ds = out / "data" / "Dataset900_DemoTissue"
    names = {v: k for k, v in json.loads((ds / "dataset.json").read_text())["labels"].items()}
    for (_, init), r in runs.items():
        per_case, per_class = [], []
        for ref_path in sorted((ds / "labelsTs").glob("*.nii.gz")):
            ref = np.asarray(nib.load(str(ref_path)).dataobj)
            pred_path = out / "runs" / f"finetune_{init}_n5" / "pred" / ref_path.name
            pred = np.asarray(nib.load(str(pred_path)).dataobj)
            assert pred.shape == ref.shape
            per_class.append([_dice(pred, ref, k) for k in (1, 2, 3)])
            per_case.append(np.nanmean(per_class[-1]))
        assert r["dice"] == pytest.approx(float(np.mean(per_case)), abs=1e-6), init
        # the per-class table: class means over the test cases, each printed in the report
        class_means = np.nanmean(np.asarray(per_class), axis=0)
        assert list(r["dice_per_class"]) == [names[k] for k in (1, 2, 3)]
        assert list(r["dice_per_class"].values()) == pytest.approx(list(class_means), abs=1e-6)
        cells = " | ".join(f"{v:.3f}" for v in class_means)
        assert f"| 5 | {init} | {cells} |" in text
        assert 0.0 <= r["nsd"] <= 1.0
    # the conclusion follows the measured sign
    delta = runs[(5, "s3d")]["dice"] - runs[(5, "scratch")]["dice"]
    assert ("did NOT beat" in text) == (delta <= 0)

    # every figure the report links exists and shows something (not blank)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"figures/data.png", "figures/predictions.png", "figures/mae_reconstruction.png",
            "figures/pretrain_loss.png", "figures/finetune_loss.png"} <= set(links)
    for link in links:
        img = np.asarray(Image.open(out / link).convert("L"), dtype=np.float32)
        assert img.shape[0] > 50 and img.shape[1] > 100, link
        assert img.std() > 10, link  # not a flat image
    # overlays carry label colours: the predictions panel is not grey-only
    rgb = np.asarray(Image.open(out / "figures" / "predictions.png").convert("RGB"), dtype=np.int16)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 30).mean() > 0.01

    # a second run into the same folder replaces the previous demo
    assert main(["demo", "--quick", "--source", "phantom", "--out", str(out), "--no-progress",
                 "--pretrain-steps", "2", "--finetune-steps", "4"]) == 0
    assert main(["demo", "--quick", "--out", str(out), "--finetune-steps", "2"]) == 1


def test_demo_refuses_a_foreign_folder(tmp_path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "not written by s3d demo" in capsys.readouterr().out
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _run(n: int, init: str, dice: float) -> RunResult:
    return RunResult(n, init, dice, dice, {"a": dice, "b": dice}, 10, 1.0, "x")


def test_conclusion_and_table_follow_the_numbers() -> None:
    won = [_run(5, "s3d", 0.8), _run(5, "scratch", 0.7), _run(10, "s3d", 0.85), _run(10, "scratch", 0.8)]
    assert "beat training from scratch at every" in conclusion(won)
    lost = [_run(5, "s3d", 0.6), _run(5, "scratch", 0.7)]
    assert "did NOT beat" in conclusion(lost)
    mixed = [_run(5, "s3d", 0.8), _run(5, "scratch", 0.7), _run(10, "s3d", 0.7), _run(10, "scratch", 0.8)]
    assert "with 5 labelled cases but not with 10" in conclusion(mixed)
    table = results_table(won)
    assert "| 5 | 0.800 | 0.700 | +0.100 |" in table and "| 2/2 |" in table


def test_plan_steps_fits_the_budget() -> None:
    pre, ft = plan_steps(600.0, 0.6, 0.5, 6)
    # the planned work stays within the 80 % of the budget not reserved, and uses most of it
    assert 0.75 * 600 <= pre * 0.6 + 6 * ft * 0.5 <= 0.80 * 600 + 1e-6
    assert pre * 0.6 == pytest.approx(0.4 * 0.8 * 600, abs=0.6)  # 40 % of it pre-trains
    assert plan_steps(1.0, 10.0, 10.0, 6) == (20, 20)  # floors when there is no time
    assert plan_steps(1e9, 0.1, 0.1, 6) == (4000, 4000)  # caps on fast machines


def test_time_train_step_measures_both_kinds() -> None:
    import torch

    torch.set_num_threads(1)
    seg = time_train_step((32, 32, 32), 1, "cpu", repeats=1)
    mae = time_train_step((32, 32, 32), 1, "cpu", mae=True, repeats=1)
    assert 0 < seg < 60 and 0 < mae < 60


def test_line_plot_draws_every_series() -> None:
    img = np.asarray(line_plot({"a": [(0, 1.0), (10, 0.2)], "b": [(0, 0.5), (10, 0.6)]}, "t", "x", "y"))
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours
