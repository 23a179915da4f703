"""The ``s3d demo`` run: data, pre-training, fine-tuning vs scratch, prediction, evaluation, report.

Every call of the demo into data preparation (``s3d.data.scan``), training (``s3d.pretrain``,
``s3d.finetune``), inference (``s3d.infer``) and metrics (``s3d.metrics``) is in this module.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from s3d._fs import write_json_atomic, write_text_atomic
from s3d.demo.figures import _write_figures
from s3d.demo.report import DemoResult, RunResult, _fmt, _report_md, conclusion, results_table
from s3d.demo.settings import ARCHITECTURE, DemoSettings, plan_steps, time_train_step

MARKER = ".s3d-demo"


def _resolve_source(source: str) -> str:
    if source not in ("auto", "mni", "phantom"):
        raise ValueError(f"source must be 'auto', 'mni' or 'phantom', got {source!r}")
    if source != "auto":
        return source
    import importlib.util

    if importlib.util.find_spec("nilearn") is not None:
        return "mni"
    print('note: nilearn is not installed, so the demo uses the procedural phantom; for MNI152-based brains: '
          'pip install "s3d[demo]"')
    return "phantom"


def _prepare_out(out: Path) -> None:
    """Make ``out`` ours: empty, or an earlier demo's folder (its data, runs and figures are replaced)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists, is not empty and was not written by s3d demo; pass an empty or "
                              "new folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by s3d demo; the folder may be replaced by the next run\n")
    for sub in ("data", "runs", "figures"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)


Curve = list[tuple[int, float]]


def _finetune_run(dataset: Path, run_dir: Path, pretrained: str | None, n_train: int, steps: int,
                  s: DemoSettings, device: str) -> tuple[float, Curve, Curve]:
    from s3d.finetune import run as finetune

    t0 = time.perf_counter()
    # the paper's warm-ups are 12.5k of 250k steps each (5 %); at least one step each here
    finetune(dataset, run_dir, pretrained=pretrained, schedule=s.schedule if pretrained else "scratch",
             steps=steps, warmup_steps=max(1, steps // 20), config=ARCHITECTURE, batch_size=s.batch_size,
             patch_size=s.patch_size,
             target_spacing_mm=(s.spacing_mm,) * 3, n_train=n_train, val_fraction=0.2,
             val_every=max(1, steps // 4) if not s.quick else steps, checkpoint_every=steps,
             num_val_cases=2, seed=s.seed, device=device, progress=s.progress)
    seconds = time.perf_counter() - t0
    loss, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            loss.append((int(rec["step"]), float(rec["loss"])))
        if "val_dice" in rec:
            val.append((int(rec["step"]), float(rec["val_dice"])))
    return seconds, loss, val


def _evaluate(pred_dir: Path, ds: Path, tau_mm: float) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """(mean Dice, mean NSD, Dice per test case, Dice per class) over the foreground classes."""
    from s3d.metrics import evaluate_folder

    res = evaluate_folder(pred_dir, ds / "labelsTs", ds / "dataset.json", tau_mm=tau_mm, progress=False)
    if res.errors:
        raise RuntimeError(f"evaluation of {pred_dir} failed for {res.errors}")
    fg = res.summary["foreground_mean"]
    per_class = {name: float(m["dice"]) for name, m in res.summary["mean"].items()}
    return float(fg["dice"]), float(fg["nsd"]), res.case_means("dice"), per_class



def run_demo(settings: DemoSettings) -> DemoResult:
    """Generate data, pre-train, fine-tune vs scratch, predict, evaluate, and write the report.

    Returns:
        A :class:`DemoResult`; ``result.report`` is ``settings.out / "report.md"``.

    Example:
        >>> run_demo(demo_settings("s3d-demo", quick=True)).conclusion  # doctest: +SKIP
    """
    import torch

    from s3d.data.scan import ScanFilters, prepare
    from s3d.data.synthetic import write_demo_cohort
    from s3d.infer import predict_folder
    from s3d.pretrain import PretrainConfig
    from s3d.pretrain import run as pretrain
    from s3d.runtime.device import resolve_device

    s = settings
    t_start = time.perf_counter()
    out = Path(s.out)
    if s.finetune_steps is not None and s.finetune_steps < 4:
        raise ValueError(f"finetune_steps (--finetune-steps) must be >= 4 (two warm-ups and training), "
                         f"got {s.finetune_steps}")
    from s3d.finetune import SCHEDULES

    if s.schedule not in SCHEDULES:
        raise ValueError(f"schedule (--schedule) must be one of {sorted(SCHEDULES)}, got {s.schedule!r}")
    if s.pretrain_steps is not None and s.pretrain_steps < 1:
        raise ValueError(f"pretrain_steps (--pretrain-steps) must be >= 1, got {s.pretrain_steps}")
    n_train_max = max(s.train_sizes)
    if n_train_max > int(0.8 * s.num_labelled):
        need = math.ceil(n_train_max / 0.8)
        raise ValueError(f"train_sizes up to {n_train_max} need num_labelled >= {need} "
                         f"(20 % of the labelled pool is held out for validation), got {s.num_labelled}")

    _prepare_out(out)
    source = _resolve_source(s.source)
    device = str(resolve_device(s.device))
    torch.manual_seed(s.seed)
    timings: dict[str, float] = {}
    # 1. data
    t = time.perf_counter()
    print(f"[1/5] generating {s.num_unlabelled} unlabelled + {s.num_labelled} labelled + {s.num_test} test "
          f"volumes ({source}, {s.shape} voxels of {s.spacing_mm} mm) in {out / 'data'}")
    cohort = write_demo_cohort(out / "data", task=s.task, source=source, num_train=s.num_labelled,
                               num_test=s.num_test, num_unlabelled=s.num_unlabelled, shape=s.shape,
                               spacing_mm=s.spacing_mm, seed=s.seed, progress=s.progress)
    timings["data"] = time.perf_counter() - t

    # 2. plan the steps from a measured step time
    n_runs = 2 * len(s.train_sizes)
    step_s = pre_step_s = float("nan")
    pre_steps, ft_steps = s.pretrain_steps, s.finetune_steps
    if pre_steps is None or ft_steps is None:
        pre_step_s = time_train_step(s.patch_size, s.batch_size, device, mae=True)
        step_s = time_train_step(s.patch_size, s.batch_size, device)
        left = s.minutes * 60.0 - (time.perf_counter() - t_start)
        planned = plan_steps(left, pre_step_s, step_s, n_runs)
        pre_steps = pre_steps or planned[0]
        ft_steps = ft_steps or planned[1]
    measured = (f"measured {pre_step_s:.3f} s per pre-training step, {step_s:.3f} s per fine-tuning step; "
                if math.isfinite(step_s) else "")
    print(f"[2/5] pre-training on {device}; {measured}pre-training {pre_steps} steps, "
          f"{n_runs} fine-tuning runs of {ft_steps} steps")

    # 3. pre-training
    t = time.perf_counter()
    prep = out / "runs" / "pretrain_data"
    prepare(cohort.unlabelled_dir, prep, ScanFilters(min_file_bytes=0), target_spacing_mm=s.spacing_mm,
            progress=s.progress)
    pre_dir = out / "runs" / "pretrain"
    bs = 16  # = total stride of the tiny network: cells aligned with its bottleneck, as 32 for ResEnc-L
    result = pretrain(PretrainConfig(
        data=str(prep), out=str(pre_dir), recipe="s3d-b", architecture=ARCHITECTURE, steps=pre_steps,
        batch_size=s.batch_size, patch_size=s.patch_size, method_kwargs={"block_size": bs}, seed=s.seed,
        device=device, workers=0 if device == "cpu" else 2, val_fraction=0.1, val_every=pre_steps,
        val_max_cases=2, snapshot_every=pre_steps, checkpoint_every=pre_steps, progress=s.progress))
    backbone = Path(result["backbone"])
    timings["pretrain"] = time.perf_counter() - t
    pre_loss = [(int(r["step"]), float(r["loss"])) for r in map(json.loads, (pre_dir / "metrics.jsonl")
                .read_text().splitlines()) if "loss" in r]
    print(f"      pre-training loss {pre_loss[0][1]:.3f} -> {pre_loss[-1][1]:.3f} "
          f"({timings['pretrain']:.0f} s)")

    # 4. fine-tuning vs scratch, prediction, evaluation
    t = time.perf_counter()
    ds = cohort.dataset_dir
    runs: list[RunResult] = []
    for n in s.train_sizes:
        for init, pretrained in (("s3d", str(backbone)), ("scratch", None)):
            run_dir = out / "runs" / f"finetune_{init}_n{n}"
            print(f"[3/5] fine-tuning ({init}) on {n} labelled cases, {ft_steps} steps")
            seconds, loss, val = _finetune_run(ds, run_dir, pretrained, n, ft_steps, s, device)
            print(f"[4/5] predicting {s.num_test} test cases and scoring Dice / NSD")
            predict_folder(ds / "imagesTs", run_dir / "pred", run_dir / "model", device=device,
                           mirror=False, progress=False)  # mirroring would cost 8x the demo's budget
            dice, nsd, per_case, per_class = _evaluate(run_dir / "pred", ds, tau_mm=s.spacing_mm)
            runs.append(RunResult(n, init, dice, nsd, per_case, ft_steps, seconds, str(run_dir), val, loss,
                                  per_class))
            classes = "  ".join(f"{k} {_fmt(v)}" for k, v in per_class.items())
            print(f"      Dice {_fmt(dice)} ({classes})  NSD {_fmt(nsd)}  ({seconds:.0f} s)")
    timings["finetune_predict_evaluate"] = time.perf_counter() - t

    # 5. report
    t = time.perf_counter()
    table = results_table(runs)
    concl = conclusion(runs)
    figures = _write_figures(out, cohort, runs, pre_loss, pre_dir, s)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    report = out / "report.md"
    settings_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    settings_d.update(schedule_description=SCHEDULES[s.schedule].description,
                      scratch_description=SCHEDULES["scratch"].description, source=source, device=device,
                      pretrain_steps=pre_steps, finetune_steps=ft_steps,
                      step_seconds=step_s, pretrain_step_seconds=pre_step_s)
    write_text_atomic(report, _report_md(table, concl, figures, timings, settings_d, runs, pre_loss))
    write_json_atomic(out / "results.json", {"settings": settings_d, "timings_s": timings,
                                             "runs": [asdict(r) for r in runs], "conclusion": concl})
    print("[5/5] results (mean over the held-out test cases)\n")
    print(table)
    print(f"\n{concl}\n")
    print(f"report: {report.resolve()}")
    return DemoResult(report, runs, table, concl, timings, settings_d)
