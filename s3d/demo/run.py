"""The ``s3d demo`` run: data, weights, plan, a short pre-training, three arms over seeds, the probe, report.

Every call of the demo into data preparation (``s3d.data.scan``), training (``s3d.pretrain``,
``s3d.finetune`` via :mod:`s3d.demo.compare`), inference and metrics is in this module or that one.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from s3d._fs import write_json_atomic, write_text_atomic
from s3d._triple import triple
from s3d.demo.compare import finetune_and_score
from s3d.demo.figures import write_figures
from s3d.demo.markdown import report_md
from s3d.demo.report import ARMS, DemoResult, RunResult, conclusion, fmt_score, results_table
from s3d.demo.settings import DemoSettings, plan_steps, recipe_of, time_train_step
from s3d.runtime.metrics import read_metrics

MARKER = ".s3d-demo"
#: fine-tuning runs take longer than their training steps (data loading, validation, prediction,
#: evaluation, checkpoints): measured 1.3-1.5x on 2 CPU cores at the demo's sizes
OVERHEAD = 1.4


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


def _check(s: DemoSettings) -> None:
    from s3d.finetune import SCHEDULES

    if s.finetune_steps < 4:
        raise ValueError(f"finetune_steps (--finetune-steps) must be >= 4 (warm-ups and training), got "
                         f"{s.finetune_steps}")
    if s.pretrain_steps is not None and s.pretrain_steps < 1:
        raise ValueError(f"pretrain_steps (--pretrain-steps) must be >= 1, got {s.pretrain_steps}")
    if not s.seeds:
        raise ValueError("seeds (--seeds) must name at least one seed")
    for arm in ("s3d", "scratch"):  # the control runs the s3d arm's recipe
        if arm not in s.recipes or s.recipes[arm].schedule not in SCHEDULES:
            raise ValueError(f"recipes[{arm!r}]: needs a schedule among {sorted(SCHEDULES)}")
    if s.probe_steps < 0:
        raise ValueError(f"probe_steps (--probe-steps) must be >= 0 (0: no probe), got {s.probe_steps}")
    n_train_max = max(s.train_sizes)
    if n_train_max > int(0.8 * s.num_labelled):
        need = math.ceil(n_train_max / 0.8)
        raise ValueError(f"train_sizes up to {n_train_max} need num_labelled >= {need} "
                         f"(20 % of the labelled pool is held out for validation), got {s.num_labelled}")


def weights_info(weights: str) -> tuple[Any, str]:
    """(architecture config, one line saying what the weights are) of the pre-trained arm's weights.

    Example:
        >>> weights_info("s3d-demo")[0].name
        'tiny'
    """
    from s3d.hub import get_entry, load_state
    from s3d.nn.config import ResEncUNetConfig

    _, cfg, report = load_state(weights)
    if not isinstance(cfg, ResEncUNetConfig):
        raise ValueError(f"--pretrained {weights}: s3d demo fine-tunes a ResEnc U-Net; these weights are a "
                         f"{type(cfg).__name__.removesuffix('Config')}. Pick ResEnc weights (s3d models)")
    entry = get_entry(weights)
    if entry is not None and entry.package_data is not None:
        what = f"{entry.name} (shipped with s3d, {entry.method}; {entry.data}; model card: s3d models --json)"
    elif entry is not None:
        what = f"{entry.name} ({entry.repo_id}, {entry.method})"
    else:
        what = f"{weights} ({cfg.name} ResEnc U-Net, {report.format} format)"
    return cfg, what


def _sizes_for(s: DemoSettings, cfg: Any) -> DemoSettings:
    """Patch, grid and spacing that suit the network: stride-32 networks (ResEnc-L) get 64^3 patches at 2 mm."""
    stride = max(max(v) if isinstance(v, (list, tuple)) else v for v in cfg.total_stride)
    if stride <= 16:
        return s
    return replace(s, patch_size=(2 * stride,) * 3, shape=(80, 96, 80), spacing_mm=2.0)


def plan(s: DemoSettings, device: str, cfg: Any) -> dict[str, Any]:
    """Time one fine-tuning and one MAE step; estimate every stage; size the demo's own pre-training.

    Example:
        >>> plan(demo_settings("out"), "cpu", get_config("tiny"))["finetune_s"] > 0  # doctest: +SKIP
        True
    """
    repeats = 5 if cfg.name in ("tiny", "small") else 1
    step_s = time_train_step(s.patch_size, s.batch_size, device, architecture=cfg, repeats=repeats)
    threads = _choose_threads(device, step_s, lambda: time_train_step(s.patch_size, s.batch_size, device,
                                                                      architecture=cfg, repeats=repeats))
    if threads["chosen"] != threads["default"]:
        step_s = threads["step_s"][threads["chosen"]]
    pre_step_s = time_train_step(_pretrain_patch(s), s.batch_size, device, mae=True)
    n_runs = len(ARMS) * len(s.train_sizes) * len(s.seeds)
    probe_s = OVERHEAD * 2 * len(s.seeds) * s.probe_steps * step_s
    finetune_s = OVERHEAD * n_runs * s.finetune_steps * step_s
    pre_steps = s.pretrain_steps or plan_steps(s.minutes * 60.0, pre_step_s, finetune_s + probe_s)
    return {"step_s": step_s, "pretrain_step_s": pre_step_s, "n_runs": n_runs, "finetune_s": finetune_s,
            "probe_s": probe_s,
            "threads": threads,
            "pretrain_steps": pre_steps, "pretrain_s": pre_steps * pre_step_s,
            "total_s": finetune_s + probe_s + pre_steps * pre_step_s}


def _choose_threads(device: str, step_s: float, time_step: Any) -> dict[str, Any]:
    """On CPU, time a step with one torch thread too and keep the faster thread count for the whole run.

    A tiny network runs many small kernels; when another process keeps one of two cores busy, every
    thread barrier waits for a descheduled thread, and 2 threads were 20x slower than one (measured on 2
    shared cores, 2026-12-01: 5.5 s vs 0.2 s per fine-tuning step). On an idle machine more threads win.
    """
    import torch

    default = torch.get_num_threads()
    out: dict[str, Any] = {"default": default, "chosen": default, "step_s": {default: step_s}}
    if device != "cpu" or default == 1:
        return out
    torch.set_num_threads(1)
    out["step_s"][1] = time_step()
    if out["step_s"][1] < step_s:
        out["chosen"] = 1
    else:
        torch.set_num_threads(default)
    return out


def _pretrain_patch(s: DemoSettings) -> tuple[int, int, int]:
    """The short pre-training's patch: the grid rounded down to the network stride 16, at most 48^3."""
    return triple(min(48, 16 * max(1, n // 16)) for n in s.shape)


def _pretrain(s: DemoSettings, cohort: Any, out: Path, steps: int, device: str) -> tuple[Path, list]:
    """The demo's own short pre-training (workflow and reconstruction figure; not used by the table)."""
    from s3d.data.scan import ScanFilters, prepare
    from s3d.pretrain import PretrainConfig
    from s3d.pretrain import run as pretrain

    prep = out / "runs" / "pretrain_data"
    prepare(cohort.unlabelled_dir, prep, ScanFilters(min_file_bytes=0), target_spacing_mm=s.spacing_mm,
            progress=s.progress)
    pre_dir = out / "runs" / "pretrain"
    pretrain(PretrainConfig(
        data=str(prep), out=str(pre_dir), recipe="s3d-b", architecture="tiny", steps=steps,
        batch_size=s.batch_size, patch_size=_pretrain_patch(s), method_kwargs={"block_size": 16}, seed=s.data_seed,
        device=device, workers=0 if device == "cpu" else 2, val_fraction=0.1, val_every=steps, val_max_cases=2,
        snapshot_every=steps, checkpoint_every=steps, progress=s.progress))
    loss = list(read_metrics(pre_dir, "loss").items())
    return pre_dir, loss


def run_demo(settings: DemoSettings) -> DemoResult | None:
    """Generate data, pre-train briefly, fine-tune the shipped weights vs scratch over seeds, report.

    Returns:
        A :class:`DemoResult` (``result.report`` is ``settings.out / "report.md"``); ``None`` with
        ``settings.plan_only`` (the plan is printed, nothing is trained).

    Example:
        >>> run_demo(demo_settings("s3d-demo", quick=True)).conclusion  # doctest: +SKIP
    """
    import torch

    from s3d.data.synthetic import write_demo_cohort
    from s3d.runtime.device import resolve_device

    s = settings
    _check(s)
    t_start = time.perf_counter()
    device = str(resolve_device(s.device))
    cfg, what = weights_info(s.weights)
    s = _sizes_for(s, cfg)
    out = Path(s.out)
    if not s.plan_only:
        _prepare_out(out)  # refuse a foreign folder before any work
    p = plan(s, device, cfg)
    n_cases = ", ".join(map(str, s.train_sizes))
    seeds = f"{len(s.seeds)} seed{'s' if len(s.seeds) > 1 else ''}"
    print(f"plan on {device}: {p['n_runs']} fine-tuning runs ({len(ARMS)} arms x {n_cases} labelled cases x "
          f"{seeds}) of {s.finetune_steps} steps at {p['step_s']:.2f} s per step (batch {s.batch_size}, patch "
          f"{s.patch_size} at {s.spacing_mm} mm), ~{p['finetune_s'] / 60:.1f} min; the demo's own pre-training "
          f"{p['pretrain_steps']} steps, ~{p['pretrain_s'] / 60:.1f} min; in all about "
          f"{p['total_s'] / 60 + 0.5:.0f} min")
    th = p["threads"]
    if len(th["step_s"]) > 1:
        print(f"  cpu threads: {th['chosen']} (a step took " + ", ".join(
            f"{v:.2f} s with {k}" for k, v in th["step_s"].items()) + ")")
    print(f"  pre-trained arm ('s3d'): weights {what}; recipe {s.recipes['s3d'].label()}")
    print(f"  control arm: random init of the same network; the s3d arm's recipe {s.recipes['s3d'].label()}")
    print(f"  scratch arm: random init ({cfg.name} ResEnc U-Net); recipe {s.recipes['scratch'].label()}")
    if s.probe_steps:
        print(f"  probe: a fresh decoder on the frozen encoder of {s.weights} and of random weights, "
              f"{s.probe_n_train} labelled cases, {s.probe_steps} steps, {seeds} (~{p['probe_s'] / 60:.1f} min)")
    if s.plan_only:
        return None
    from s3d.nn.config import CONFIGS

    if cfg.name not in CONFIGS:
        raise ValueError(f"--pretrained {s.weights}: its architecture {cfg.name!r} is no preset "
                         f"({sorted(CONFIGS)}), so the scratch arm cannot build the same network")
    source = _resolve_source(s.source)
    torch.manual_seed(s.data_seed)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    print(f"[1/5] generating {s.num_unlabelled} unlabelled + {s.num_labelled} labelled + {s.num_test} test "
          f"volumes ({source}, {s.shape} voxels of {s.spacing_mm} mm) in {out / 'data'}")
    cohort = write_demo_cohort(out / "data", task=s.task, source=source, num_train=s.num_labelled,
                               num_test=s.num_test, num_unlabelled=s.num_unlabelled, shape=s.shape,
                               spacing_mm=s.spacing_mm, seed=s.data_seed, progress=s.progress)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[2/5] the S3D workflow in miniature: pre-training a tiny ResEnc U-Net for {p['pretrain_steps']} steps "
          f"on the {s.num_unlabelled} unlabelled volumes (for the reconstruction figure; the table fine-tunes "
          f"the weights that were pre-trained once, at scale: {s.weights})")
    pre_dir, pre_loss = _pretrain(s, cohort, out, p["pretrain_steps"], device)
    timings["pretrain"] = time.perf_counter() - t
    print(f"      pre-training loss {pre_loss[0][1]:.3f} -> {pre_loss[-1][1]:.3f} ({timings['pretrain']:.0f} s)")

    t = time.perf_counter()
    ds = cohort.dataset_dir
    runs: list[RunResult] = []
    for n in s.train_sizes:
        for seed in s.seeds:
            for arm in ARMS:
                run_dir = out / "runs" / f"finetune_{arm}_n{n}_seed{seed}"
                print(f"[3/5] fine-tuning {arm} on {n} labelled cases, seed {seed}, {s.finetune_steps} steps; "
                      f"[4/5] predicting and scoring {s.num_test} test cases")
                r = finetune_and_score(ds, run_dir, init=arm, weights=None if arm == "scratch" else s.weights,
                                       recipe=recipe_of(s, arm), n_train=n, seed=seed, steps=s.finetune_steps,
                                       patch_size=s.patch_size, batch_size=s.batch_size, spacing_mm=s.spacing_mm,
                                       device=device, architecture=cfg.name,
                                       val_every=max(1, s.finetune_steps // 3), progress=s.progress)
                runs.append(r)
                classes = "  ".join(f"{k} {fmt_score(v)}" for k, v in r.dice_per_class.items())
                print(f"      Dice {fmt_score(r.dice)} ({classes})  NSD {fmt_score(r.nsd)}  ({r.seconds:.0f} s)")
    timings["finetune_predict_evaluate"] = time.perf_counter() - t

    probe_d = None
    if s.probe_steps:
        t = time.perf_counter()
        probe_d = _probe(s, ds, out, device)
        timings["probe"] = time.perf_counter() - t

    t = time.perf_counter()
    table = results_table(runs)
    concl = conclusion(runs)
    if probe_d is not None:
        concl += " " + probe_sentence(probe_d)
    figures = write_figures(out, cohort, runs, pre_loss, pre_dir, s, _pretrain_patch(s), p["pretrain_steps"])
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    report = out / "report.md"
    settings_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    settings_d.update(source=source, device=device, weights_description=what, architecture=cfg.name,
                      pretrain_steps=p["pretrain_steps"], step_seconds=p["step_s"],
                      pretrain_step_seconds=p["pretrain_step_s"], cpu_threads=p["threads"]["chosen"],
                      recipes={k: recipe_of(s, k).label() for k in ARMS})
    write_text_atomic(report, report_md(table, concl, figures, timings, settings_d, runs, pre_loss, probe_d))
    write_json_atomic(out / "results.json", {"settings": settings_d, "timings_s": timings,
                                             "runs": [asdict(r) for r in runs], "probe": probe_d,
                                             "conclusion": concl})
    print("[5/5] results (Dice: mean ± sd over seeds of the mean over the held-out test cases)\n")
    print(table)
    print(f"\n{concl}\n")
    print(f"report: {report.resolve()}")
    return DemoResult(report, runs, table, concl, timings, settings_d, probe_d)


def _probe(s: DemoSettings, dataset: Path, out: Path, device: str) -> dict[str, Any]:
    """The frozen-encoder probe of the s3d arm's weights against random weights (:func:`s3d.finetune.probe`)."""
    from s3d.finetune.probing import probe

    print(f"[4/5] probe: a fresh decoder on the frozen encoder of {s.weights} and of random weights, "
          f"{s.probe_n_train} labelled cases, {s.probe_steps} steps, seeds {list(s.seeds)}")
    r = probe(s.weights, dataset, out / "runs" / "probe", n_train=s.probe_n_train, seeds=s.seeds,
              steps=s.probe_steps, peak_lr=s.probe_lr, patch_size=s.patch_size, batch_size=s.batch_size,
              target_spacing_mm=(s.spacing_mm,) * 3, device=device, progress=s.progress)
    print(f"      {r.summary()}")
    return {"s3d": r.mean("weights"), "random": r.mean("random"),
            "per_seed": {"s3d": r.dice("weights"), "random": r.dice("random")}, "deltas": r.deltas(),
            "seeds": sorted({x.seed for x in r.runs}), "n_train": s.probe_n_train, "steps": s.probe_steps,
            "peak_lr": r.settings["peak_lr"], "val_cases": sorted({c for x in r.runs for c in x.val_cases}),
            "summary": r.summary()}


def probe_sentence(p: dict[str, Any]) -> str:
    """The probe's result in one sentence, derived from its per-seed Dice.

    Example:
        >>> probe_sentence({"s3d": 0.5, "random": 0.4, "deltas": [0.1, 0.1], "seeds": [0, 1]})[:42]
        'Under a frozen-encoder probe, the encoder '
    """
    d = p["deltas"]
    verdict = ("better than a random encoder on every seed" if d and min(d) > 0 else
               "worse than a random encoder on every seed" if d and max(d) < 0 else
               "not consistently better than a random encoder")
    spread = f" [{min(d):+.3f}, {max(d):+.3f}]" if len(d) > 1 else ""
    return (f"Under a frozen-encoder probe, the encoder of the pre-trained weights was {verdict} (validation Dice "
            f"{p['s3d']:.3f} against {p['random']:.3f}, delta {sum(d) / len(d):+.3f}{spread} over seeds "
            f"{p['seeds']}).")


__all__ = ["plan", "probe_sentence", "run_demo", "weights_info"]
