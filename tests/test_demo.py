"""``s3d demo``: the CI smoke run of the front door, its tables over seeds, the shipped weights, the plan."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from s3d.cli import main
from s3d.demo import (
    RunResult,
    class_table,
    conclusion,
    deltas,
    line_plot,
    plan_steps,
    results_table,
    time_train_step,
    wins,
)

pytest.importorskip("scipy")  # resampling (pre-training data) and NSD need it


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else float("nan")


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    # as the README runs it: the default output folder ./s3d-demo, named like the shipped weights
    # "s3d-demo" (a fresh-venv run of `s3d demo` once failed here, reading that folder as the weights)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s3d-demo"
    rc = main(["demo", "--quick", "--source", "phantom", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = out / "report.md"
    assert f"report: {report.resolve()}" in printed
    assert "| labelled cases | Dice s3d | Dice control | Dice scratch |" in printed
    assert "weights s3d-demo (shipped with s3d" in printed  # the demo says which weights each arm used
    assert "control arm: random init of the same network; the s3d arm's recipe" in printed

    results = json.loads((out / "results.json").read_text())
    text = report.read_text()
    runs = {(r["n_train"], r["init"], r["seed"]): r for r in results["runs"]}
    arms = ("s3d", "control", "scratch")
    assert set(runs) == {(5, arm, seed) for arm in arms for seed in (0, 1)}
    assert {r["weights"] for r in results["runs"] if r["init"] == "s3d"} == {"s3d-demo"}
    assert {r["weights"] for r in results["runs"] if r["init"] != "s3d"} == {"random init"}
    # the control runs exactly the s3d arm's recipe
    assert {r["recipe"] for r in results["runs"] if r["init"] == "control"} == \
        {r["recipe"] for r in results["runs"] if r["init"] == "s3d"}

    # every run's Dice equals Dice recomputed here from its written predictions and the test labels
    ds = out / "data" / "Dataset900_DemoTissue"
    names = {v: k for k, v in json.loads((ds / "dataset.json").read_text())["labels"].items()}
    per_case_mean = {}
    for (_, init, seed), r in runs.items():
        per_case, per_class = {}, []
        for ref_path in sorted((ds / "labelsTs").glob("*.nii.gz")):
            ref = np.asarray(nib.load(str(ref_path)).dataobj)
            pred = np.asarray(nib.load(str(out / "runs" / f"finetune_{init}_n5_seed{seed}" / "pred" /
                                           ref_path.name)).dataobj)
            assert pred.shape == ref.shape
            per_class.append([_dice(pred, ref, k) for k in (1, 2, 3)])
            per_case[ref_path.name[: -len(".nii.gz")]] = np.nanmean(per_class[-1])
        per_case_mean[(init, seed)] = per_case
        # float64 means of Dice of integer counts (error ~1e-16); abs 1e-6 allows a report rounded to 6 digits
        assert r["dice"] == pytest.approx(float(np.mean(list(per_case.values()))), abs=1e-6), (init, seed)
        assert list(r["dice_per_class"]) == [names[k] for k in (1, 2, 3)]
        assert list(r["dice_per_class"].values()) == pytest.approx(list(np.nanmean(per_class, 0)), abs=1e-6)
        assert 0.0 <= r["nsd"] <= 1.0

    # the table row: mean ± sd over the two seeds, ΔDice paired by seed, test cases won (seed-averaged)
    dice = {arm: [runs[(5, arm, s)]["dice"] for s in (0, 1)] for arm in arms}
    d = {b: [x - y for x, y in zip(dice["s3d"], dice[b], strict=True)] for b in ("control", "scratch")}
    cases = sorted(per_case_mean[("s3d", 0)])
    won = sum(np.mean([per_case_mean[("s3d", s)][c] for s in (0, 1)])
              > np.mean([per_case_mean[("control", s)][c] for s in (0, 1)]) for c in cases)
    row = ("| 5 | " + " | ".join(f"{np.mean(dice[a]):.3f} ± {np.std(dice[a], ddof=1):.3f}" for a in arms) + " | "
           + " | ".join(f"{np.mean(d[b]):+.3f} [{min(d[b]):+.3f}, {max(d[b]):+.3f}]" for b in ("control", "scratch"))
           + " |")
    assert row in text and row in printed
    assert text.split(row)[1].split("\n")[0].endswith(f"| {won}/{len(cases)} |")
    # the conclusion compares s3d with the control first, following the per-seed signs
    concl = results["conclusion"]
    assert concl.startswith("In this run, fine-tuning the pre-trained weights ")
    assert ("did NOT beat the control" in concl) == (min(d["control"]) <= 0)
    assert concl in text and concl in printed

    # the probe of the shipped weights against random weights, in results.json, the report and the conclusion
    pr = results["probe"]
    probe_runs = json.loads((out / "runs" / "probe" / "probe.json").read_text())["runs"]
    for arm, init in (("s3d", "weights"), ("random", "random")):
        per_seed = [r["dice"] for r in probe_runs if r["init"] == init]
        assert pr["per_seed"][arm] == per_seed and pr[arm] == pytest.approx(np.mean(per_seed))
    assert pr["seeds"] == [0, 1] and pr["n_train"] == 2 and pr["steps"] == 4
    assert f"| mean | {pr['s3d']:.3f} | {pr['random']:.3f} |" in text
    assert f"validation Dice {pr['s3d']:.3f} against {pr['random']:.3f}" in concl

    # every figure the report links exists and shows something (not blank)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"figures/data.png", "figures/predictions.png", "figures/mae_reconstruction.png",
            "figures/pretrain_loss.png", "figures/finetune_loss.png"} <= set(links)
    for link in links:
        img = np.asarray(Image.open(out / link).convert("L"), dtype=np.float32)
        assert img.shape[0] > 50 and img.shape[1] > 100, link
        assert img.std() > 10, link  # not a flat image
    rgb = np.asarray(Image.open(out / "figures" / "predictions.png").convert("RGB"), dtype=np.int16)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 30).mean() > 0.01  # overlays carry label colours
    # large enough to read: image, ground truth and three arms, each slice at 5 pixels per voxel
    assert rgb.shape[1] >= 5 * 5 * 32 and rgb.shape[0] >= 5 * 32

    # a second run into the same folder replaces the previous demo; too few steps is a clear error
    assert main(["demo", "--quick", "--source", "phantom", "--out", str(out), "--no-progress",
                 "--pretrain-steps", "2", "--finetune-steps", "4", "--seeds", "3"]) == 0
    assert {r["seed"] for r in json.loads((out / "results.json").read_text())["runs"]} == {3}
    assert main(["demo", "--quick", "--out", str(out), "--finetune-steps", "2"]) == 1
    assert "finetune_steps (--finetune-steps) must be >= 4" in capsys.readouterr().err


def test_demo_refuses_a_foreign_folder(tmp_path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "not written by s3d demo" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _run(n: int, init: str, dice: float, seed: int = 0, cases: dict[str, float] | None = None) -> RunResult:
    return RunResult(n, init, dice, dice, cases or {"a": dice, "b": dice}, 10, 1.0, "x", seed=seed)


def test_deltas_pair_seeds_and_the_conclusion_needs_every_seed() -> None:
    won = [_run(5, "s3d", 0.8, 0), _run(5, "control", 0.7, 0), _run(5, "s3d", 0.75, 1), _run(5, "control", 0.7, 1)]
    assert deltas(won, 5) == pytest.approx([0.1, 0.05])
    assert "beat the control (random weights through the same recipe) on every seed at every" in conclusion(won)
    split = [_run(5, "s3d", 0.8, 0), _run(5, "control", 0.7, 0), _run(5, "s3d", 0.6, 1), _run(5, "control", 0.7, 1)]
    assert "did NOT beat the control" in conclusion(split)  # mean ΔDice 0, seeds disagree: no claim
    lost = [_run(5, "s3d", 0.6, 0), _run(5, "control", 0.7, 0), _run(5, "s3d", 0.6, 1), _run(5, "control", 0.7, 1)]
    assert "it lost on every seed with 5" in conclusion(lost)
    mixed = won + [_run(10, "s3d", 0.7, 0), _run(10, "control", 0.8, 0), _run(10, "s3d", 0.9, 1),
                   _run(10, "control", 0.8, 1)]
    assert "with 5 labelled cases but not with 10" in conclusion(mixed)
    # scratch is compared second, in its own sentence, from its own per-seed ΔDice
    both = won + [_run(5, "scratch", 0.9, 0), _run(5, "scratch", 0.9, 1)]
    assert deltas(both, 5, "scratch") == pytest.approx([-0.1, -0.15])
    assert "Compared with scratch (random weights, scratch's own recipe), it did NOT beat it" in conclusion(both)
    table = results_table(won)
    # mean ± sample sd over seeds (0.775 ± 0.0354; 0.700 ± 0); ΔDice mean and [min, max]
    assert "| 5 | 0.775 ± 0.035 | 0.700 ± 0.000 | +0.075 [+0.050, +0.100] |" in table and "| 2/2 |" in table
    assert "| labelled cases | Dice s3d | Dice control | ΔDice s3d − control (mean [min, max] over 2 seeds) |" in table


def test_wins_count_test_cases_by_seed_averaged_dice() -> None:
    runs = [_run(5, "s3d", 0, 0, {"c1": 0.9, "c2": 0.2}), _run(5, "s3d", 0, 1, {"c1": 0.5, "c2": 0.4}),
            _run(5, "control", 0, 0, {"c1": 0.6, "c2": 0.5}), _run(5, "control", 0, 1, {"c1": 0.7, "c2": 0.5})]
    # c1: 0.70 vs 0.65 -> s3d; c2: 0.30 vs 0.50 -> control
    assert wins(runs, 5) == (1, 1, 2)
    for r in runs:
        r.dice_per_class = {"CSF": 0.0}
        r.dice_per_case_class = {c: {"CSF": v} for c, v in r.dice_per_case.items()}
    assert "| 5 | CSF | 0.000 | 0.000 | +0.000 | 1 | 1 |" in class_table(runs)


def test_plan_steps_fills_what_fine_tuning_leaves() -> None:
    # 85 % of 600 s = 510 s; fine-tuning takes 400 s; 110 s / 0.5 s per step = 220 steps
    assert plan_steps(600.0, 0.5, 400.0) == 220
    assert plan_steps(600.0, 0.5, 1e6) == 20  # floor when fine-tuning takes everything
    assert plan_steps(1e6, 0.01, 0.0) == 600  # cap on fast machines


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


# ---- the shipped weights ---------------------------------------------------------------------------
def test_shipped_weights_load_offline_through_the_registry(monkeypatch) -> None:
    import s3d
    from s3d.hub import download, get_entry, sha256_file
    from s3d.hub.sources import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("s3d-demo must not touch the Hub")

    monkeypatch.setattr(download, "hub_download", no_network)
    monkeypatch.setattr("s3d.hub.sources.hub_download", no_network)
    entry = get_entry("s3d-demo")
    assert entry is not None and entry.package_data == "zoo/s3d-demo" and entry.format == "s3d"
    src = resolve("s3d-demo")
    assert sha256_file(src.weights) == entry.sha256  # the file that ships is the one the registry pins
    assert src.weights.stat().st_size < 5_000_000  # a few MB in the wheel
    net, report = s3d.load_pretrained("s3d-demo", in_channels=1, num_classes=4, output_loading_info=True)
    assert net.config.name == "tiny" and report.new_head
    with pytest.raises(ValueError, match="no other revision"):
        resolve("s3d-demo", revision="main")


def test_a_folder_named_like_a_registered_model(tmp_path, monkeypatch) -> None:
    """A bare registry name means the registered model unless a folder of that name holds weights."""
    import s3d
    from s3d.hub.sources import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3d-demo" / "runs").mkdir(parents=True)  # what `s3d demo` leaves in ./s3d-demo
    shipped = resolve("s3d-demo")
    assert shipped.entry is not None and shipped.weights.parent.name == "s3d-demo"
    assert shipped.weights.parent != tmp_path / "s3d-demo"
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        resolve("./s3d-demo")  # a path written as a path is the folder
    s3d.save_pretrained(s3d.build_resenc_unet("tiny", num_classes=2), tmp_path / "s3d-demo")
    local = resolve("s3d-demo")  # a folder with weights wins
    assert local.entry is None and local.weights.resolve() == (tmp_path / "s3d-demo" / "model.safetensors").resolve()


def test_shipped_weights_never_saw_a_demo_subject() -> None:
    """The weights' pre-training subjects (cohort seed 1000) and the demo's (seed 0) are disjoint."""
    from s3d.data.synthetic import SPLIT_CODE, case_seed
    from s3d.demo import DemoSettings
    from s3d.hub.sources import resolve

    config = json.loads((resolve("s3d-demo").weights.parent / "config.json").read_text())
    recipe = config["recipe"]
    assert recipe["name"] == "s3d-demo" and recipe["cohort_seed"] == 1000 and recipe["architecture"] == "tiny"
    assert recipe["block_size"] == 16  # mask cells = the tiny network's total stride
    d = DemoSettings(out="unused")  # type: ignore[arg-type]
    weights = {tuple(case_seed(recipe["cohort_seed"], "unlabelled", i)) for i in range(recipe["num_volumes"])}
    demo = {tuple(case_seed(d.data_seed, split, i)) for split in SPLIT_CODE for i in range(1000)}
    assert not weights & demo and d.data_seed != recipe["cohort_seed"]
    card = (resolve("s3d-demo").weights.parent / "README.md").read_text()
    assert "s3d demo --make-weights" in card and "| steps | mean training loss |" in card


def test_plan_for_stride_32_weights_prints_the_time_and_trains_nothing(tmp_path, capsys) -> None:
    """`s3d demo --pretrained WEIGHTS --plan`: the s3d-b path (ResEnc-L, stride 32) with local weights."""
    import torch

    from s3d import build_resenc_unet, save_pretrained
    from s3d.nn.config import ResEncUNetConfig

    cfg = ResEncUNetConfig(features_per_stage=(4, 8, 8, 8, 8, 8), strides=(1, 2, 2, 2, 2, 2),
                           n_blocks_per_stage=(1, 1, 1, 1, 1, 1), kernel_sizes=(3,) * 6,
                           n_conv_per_stage_decoder=(1,) * 5, name="resenc_l")  # a stride-32 stand-in
    torch.manual_seed(0)
    save_pretrained(build_resenc_unet(cfg, in_channels=1, num_classes=1), tmp_path / "w")
    out = tmp_path / "demo"
    assert main(["demo", "--plan", "--pretrained", str(tmp_path / "w"), "--out", str(out), "--seeds", "0",
                 "--sizes", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    m = re.search(r"plan on cpu: 3 fine-tuning runs .* of 150 steps at ([0-9.]+) s per step \(batch 2, patch "
                  r"\(64, 64, 64\) at 2.0 mm\), ~([0-9.]+) min", printed)
    assert m is not None, printed
    # OVERHEAD x runs x steps. Both numbers are printed rounded (step to 0.01 s, minutes to 0.1), so the
    # bound is the two roundings, not a measured error: 0.005 s x 7 min/s + 0.05 min (CI failed on 0.06).
    per_step = 1.4 * 3 * 150 / 60
    assert float(m[2]) == pytest.approx(per_step * float(m[1]), abs=per_step * 0.005 + 0.05 + 1e-9)
    # the probe: weights and random arm, one seed, its own steps, said with its time
    probe = re.search(r"probe: .* 5 labelled cases, ([0-9]+) steps, 1 seed \(~([0-9.]+) min\)", printed)
    assert probe is not None, printed
    per_step = 1.4 * 2 * int(probe[1]) / 60
    assert float(probe[2]) == pytest.approx(per_step * float(m[1]), abs=per_step * 0.005 + 0.05 + 1e-9)
    assert not out.exists()  # nothing generated or trained


def test_cpu_threads_keep_the_faster_count() -> None:
    """The demo times a CPU step with one thread too and keeps whichever count was faster for the run."""
    import torch

    from s3d.demo.run import _choose_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        slow_one = _choose_threads("cpu", 0.2, lambda: 0.5)  # 2 threads faster: keep 2
        assert slow_one == {"default": 2, "chosen": 2, "step_s": {2: 0.2, 1: 0.5}} and torch.get_num_threads() == 2
        fast_one = _choose_threads("cpu", 5.5, lambda: 0.2)  # a busy core: one thread wins
        assert fast_one["chosen"] == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert _choose_threads("cuda", 0.1, lambda: 1 / 0)["step_s"] == {2: 0.1}  # no CPU timing on a GPU
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
