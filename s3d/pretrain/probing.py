"""The probe during pre-training (``s3d pretrain --probe DATASET``): is the encoder learning anything useful?

A masked-reconstruction loss falls whatever the encoder learns. :class:`PretrainProbe` runs the
frozen-encoder probe (:func:`s3d.finetune.probe`: a fresh decoder trained on the frozen encoder, a few
labelled cases, a fixed small budget, validation Dice) on the current backbone after checkpoints, and
once on the run's initial (random) weights as the reference, logs ``probe_dice`` to ``metrics.jsonl``
and draws ``RUN/probe.png`` (loss and probe Dice against the step, side by side).

Cost: by default (``probe_every=0``) a probe runs after a checkpoint only while the probes' total time
stays within ``probe_budget`` (5 %) of the training time so far, so probes spread out as the run goes;
``probe_every=N`` probes every N steps instead (at checkpoints). Each record carries ``probe_s`` and the
running ``probe_cost`` (probe seconds / training seconds).

Under ``torchrun`` the probe runs on rank 0 alone (its trainer does not join the process group). The
other ranks wait on a barrier of a separate gloo group whose timeout is ``probe_timeout_s``, not on
the training process group, so a probe longer than that group's timeout (NCCL's 10 minutes, say) does
not stall them into an error. Rank 0 decides whether a probe is due and broadcasts it on that group.

Example:
    >>> s3d.pretrain.run(data="prep", out="runs/b", architecture="tiny", steps=2000, checkpoint_every=250,
    ...                  probe="Dataset900_DemoTissue", probe_options={"target_spacing_mm": [3.5] * 3})
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch

#: what a probe during pre-training runs unless ``probe_options`` says otherwise
PROBE_DEFAULTS: dict[str, Any] = {"n_train": 5, "seeds": [0], "steps": 150}
#: the probe's seed-0 reference point: the run's initial weights, before the first step
REFERENCE_STEP = 0


class PretrainProbe:
    """The probe of one pre-training run: when to probe, the probe itself, its log and plot.

    Args:
        run: the :class:`~s3d.pretrain.loop.PretrainRun` (its config holds ``probe``, ``probe_every``,
            ``probe_budget``, ``probe_options``, ``probe_timeout_s``).
    """

    def __init__(self, run: Any) -> None:
        cfg = run.cfg
        self.run = run
        self.dataset = str(cfg.probe)
        self.every = int(cfg.probe_every)
        self.budget = float(cfg.probe_budget)
        self.options = {**PROBE_DEFAULTS, **dict(cfg.probe_options)}
        self.options.setdefault("target_spacing_mm", [run.recipe.spacing_mm] * 3)
        self.main = run.info.is_main
        self.group = None
        if run.info.enabled:  # all ranks, collectively: a CPU group with the probe's own timeout
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.probe_timeout_s))
        self.probe_s = 0.0  # seconds spent probing in this process's lifetime (the reference included)
        self.last_probe_s: float | None = None
        self.t_start = time.perf_counter()  # training seconds = wall time since then minus probe_s

    # ---- when ----
    def _train_s(self) -> float:
        """Training seconds of this process so far (wall time since start, minus probes)."""
        return max(time.perf_counter() - self.t_start - self.probe_s, 1e-9)

    def due(self, step: int, final: bool) -> bool:
        """Rank 0's decision whether to probe after the checkpoint at ``step`` (shared with every rank)."""
        decision = False
        if self.main:
            if self.every:
                decision = step % self.every == 0 or final
            else:
                cost = self.last_probe_s or 0.0
                decision = self.probe_s + cost <= self.budget * self._train_s()
        return self._shared(decision)

    def _shared(self, decision: bool) -> bool:
        """Rank 0's ``decision``, on every rank."""
        if self.group is None:
            return decision
        import torch.distributed as dist

        box = [decision]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return bool(box[0])

    # ---- what ----
    def start(self, step: int) -> None:
        """Before the first step of a fresh run: probe the initial (random) weights, the curve's reference."""
        if self._shared(self.main and step == REFERENCE_STEP and not self._logged(step)):
            self._probe_and_wait(step, reference=True)

    def after_checkpoint(self, step: int, final: bool = False) -> None:
        """Called on every rank after the checkpoint at ``step``: probe now if it is due (rank 0)."""
        if self.due(step, final):
            self._probe_and_wait(step)

    def _logged(self, step: int) -> bool:
        """Rank 0: a probe record for ``step`` is in ``metrics.jsonl`` already."""
        return any(r.get("step") == step and "probe_dice" in r for r in self.run.metrics.records())

    def _probe_and_wait(self, step: int, reference: bool = False) -> None:
        t0 = time.perf_counter()
        if self.main:
            try:
                self._probe(step, reference)
            finally:
                self._wait()
        else:
            self._wait()
        took = time.perf_counter() - t0
        self.last_probe_s = took
        self.probe_s += took

    def _wait(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def _probe(self, step: int, reference: bool) -> None:
        """Rank 0: probe the current backbone, log the record, redraw the plot."""
        from s3d.finetune.probing import probe
        from s3d.pretrain.export import backbone_model

        run = self.run
        net = backbone_model(run.method)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            result = probe(net, self.dataset, Path(run.out) / "probe" / f"step_{step:08d}", random=False,
                           device=str(run.device), progress=False, name=f"step {step}", **self.options)
        took = time.perf_counter() - t0
        cost = (self.probe_s + took) / self._train_s() if not reference else None
        record = {"step": step, "probe_dice": result.mean("weights"),
                  "probe_dice_per_seed": result.dice("weights"), "probe_s": round(took, 2),
                  "probe_cost": None if cost is None else round(cost, 4), "probe_reference": reference}
        run.metrics.append(record)
        write_plot(run.out)
        what = "initial (random) weights" if reference else f"step {step}"
        cost_text = "" if cost is None else f", probes so far {100 * cost:.1f} % of the training time"
        print(f"probe ({what}): validation Dice {record['probe_dice']:.4f} ({took:.0f} s{cost_text})", flush=True)


def probe_hook(run: Any) -> PretrainProbe | None:
    """The probe of ``run`` (every rank calls this before the first step), its reference probe done; ``None``
    without ``run.cfg.probe``."""
    if not run.cfg.probe:
        return None
    hook = PretrainProbe(run)
    hook.start(run.start_step)
    return hook


def write_plot(run_dir: str | os.PathLike[str]) -> Path | None:
    """``RUN/probe.png``: the training loss and the probe's validation Dice against the step, side by side.

    Returns the path, or ``None`` without Pillow or without a probe record.

    Example:
        >>> write_plot("runs/b")
        PosixPath('runs/b/probe.png')
    """
    from s3d.runtime.metrics import MetricsLog

    try:
        from PIL import Image
    except ImportError:
        return None
    from s3d.runtime.plot import line_plot, save_png

    log = MetricsLog(Path(run_dir) / "metrics.jsonl")
    dice = sorted(log.values("probe_dice").items())
    if not dice:
        return None
    loss = sorted(log.values("loss").items())
    step = max(1, len(loss) // 200)
    left = line_plot({"training loss": [(float(s), v) for s, v in loss[::step]],
                      "validation loss": [(float(s), v) for s, v in sorted(log.values("val_loss").items())]},
                     "pre-training loss", "step", "loss", size=(640, 420))
    right = line_plot({"probe (frozen encoder)": [(float(s), v) for s, v in dice]},
                      "probe: validation Dice of a fresh decoder on the frozen encoder", "step", "Dice",
                      size=(640, 420))
    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    path = Path(run_dir) / "probe.png"
    save_png(both, path)
    return path


__all__ = ["PROBE_DEFAULTS", "PretrainProbe", "probe_hook", "write_plot"]
