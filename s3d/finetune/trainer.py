"""The fine-tuning loop (:class:`Trainer`) and its entry point (:func:`run`).

A :class:`Trainer` is one run folder: its constructor validates and preprocesses the dataset
(cached), builds or resumes the model, and sets every piece of state; :meth:`Trainer.fit` runs the
schedule's phases. It is built on :mod:`s3d.runtime` (device and AMP, checkpoints, metrics log, lr,
optimiser step, torchrun), as pre-training is.

Under ``torchrun`` (DDP) the global batch ``cfg.batch_size`` is split over the processes, each rank
draws its own patches (the batch of step ``t`` on rank ``r`` comes from seeds of ``(seed, r, t)``,
:mod:`s3d.finetune.loader`), the loss is that of the global batch (:meth:`DiceCELoss.global_batch`),
every rank switches phases at the same step (the model is re-wrapped in DDP whenever the trainable
set changes, so no parameter that does not train is ever expected to get a gradient), and rank 0
alone validates, logs, writes checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s3d._fs import atomic_folder
from s3d._triple import triple
from s3d.finetune.config import FinetuneConfig, auto_patch_size
from s3d.finetune.data import load_finetune_data
from s3d.finetune.loader import BatchStream, PatchPrefetcher
from s3d.finetune.losses import DiceCELoss
from s3d.finetune.phases import make_optimizer, trainable_parameters, wrap_ddp
from s3d.finetune.run_folder import check_run_inputs, open_run_folder, write_run_config
from s3d.finetune.schedules import Phase, get_schedule
from s3d.finetune.transfer import run_model
from s3d.finetune.validation import sliding_window_validation, tiled_validation
from s3d.nn.config import ResEncUNetConfig
from s3d.nn.family import Model, build_from_config, fixed_patch, min_case_shape, model_type, patch_problem
from s3d.runtime.checkpoint import checkpoint_path, save_checkpoint
from s3d.runtime.device import autocast, resolve_amp, resolve_device
from s3d.runtime.distributed import DistInfo, barrier, init_distributed
from s3d.runtime.guard import check_weights, nonfinite_error
from s3d.runtime.lr import lr_at, phase_at, set_lr
from s3d.runtime.metrics import MetricsLog
from s3d.runtime.optim import backward_and_step, grad_scaler, rng_state, set_rng_state
from s3d.runtime.progress import progress
from s3d.runtime.result import JobResult

JOB = "finetune"
EXPORT = "model"  # the folder a finished run exports its model to (``s3d predict -m RUN/model``)


@dataclass
class StepRecord:
    """What one optimiser step logged."""

    step: int
    loss: float
    lr: float
    phase: str


class Trainer:
    """The fine-tuning loop: one object per run folder.

    Files in ``cfg.out_dir``: ``finetune_config.json`` (the settings and the ``world_size``),
    ``split.json``, ``metrics.jsonl`` (one JSON object per step and per validation),
    ``checkpoint_latest.pt`` and ``checkpoint_previous.pt`` (model, optimiser, step, RNG; atomic), and
    at the end ``model/`` (:func:`s3d.hub.save_pretrained` + ``preprocessing.json``).

    Args:
        cfg: the run (``cfg.resume`` continues from the run folder's checkpoint).
        model: use this network instead of :func:`~s3d.finetune.prepare_model` (ignored on resume).
        on_step: called as ``on_step(trainer, record)`` after every step (e.g. to stop early).
        dist: run as this process group member; ``None``: join the ``torchrun`` group the environment
            describes (:func:`~s3d.runtime.distributed.init_distributed`). ``DistInfo()`` runs alone, e.g.
            a probe on rank 0 of a pre-training run.

    Raises:
        FileExistsError: an earlier run (checkpoints, ``model/``) without ``cfg.resume``/``cfg.overwrite``.
        s3d._paths.UsageError: a bad setting, or a run folder overlapping the dataset or pretrained model.
        s3d.runtime.guard.NonFiniteError (:meth:`fit`): a NaN/inf loss or weight; the last good checkpoint stays.
        ResumeError / CheckpointError: the checkpoint does not fit the settings or is damaged.
        s3d.data.nnunet.DatasetError: the dataset has problems (all listed, with their files).
        OSError: the run folder (or the cache) cannot be written; the message names it.

    Example:
        >>> Trainer(FinetuneConfig("Dataset001", "runs/a", schedule="best", steps=1000)).fit()
    """

    def __init__(self, cfg: FinetuneConfig, model: Model | None = None,
                 on_step: Callable[[Trainer, StepRecord], None] | None = None, dist: DistInfo | None = None) -> None:
        from s3d._optional import optional_import
        from s3d.data.nnunet import read_dataset_json

        optional_import("nibabel", "reading NIfTI")  # before the run folder is written
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.info = init_distributed(cfg.device) if dist is None else dist
        self.main = self.info.is_main
        self.device = resolve_device(cfg.device, self.info.local_rank)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        world = self.info.world_size
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {world} "
                             f"processes; use a multiple of {world}")
        self.local_batch = cfg.batch_size // world
        self.schedule = get_schedule(cfg.schedule)
        self.phases: list[Phase] = self.schedule.plan(cfg.steps, cfg.warmup_steps, cfg.peak_lr)
        self.on_step = on_step
        self.metrics = MetricsLog.of_run(self.out)
        check_run_inputs(cfg, raw := read_dataset_json(cfg.dataset))  # before anything is written
        state = open_run_folder(cfg, JOB, EXPORT, self.main)  # an earlier run is refused, replaced or resumed
        self._last_saved: int | None = None if state is None else int(state["step"])
        self.model: Model = run_model(cfg, self.schedule.transfer, raw, self.device, state, model,
                                           announce=self.main)
        primus = fixed_patch(self.model.config) is not None
        if self.main and state is None and primus and self.schedule.optimizer == "sgd":
            print(f"note: schedule {cfg.schedule!r} trains this Primus with SGD; its own recipe is --schedule primus "
                  "(AdamW, lr 1e-4; primus_scratch from scratch)")
        self.data = self._load_data()  # the whole dataset is checked before the run folder is written
        if self.main:
            write_run_config(cfg, self.info.world_size)
        barrier(self.info)
        self.train_cases, self.val_cases, self.labels = self.data.train_cases, self.data.val_cases, self.data.labels
        self.patch_size = self._patch_size()
        self.spec = dataclasses.replace(self.data.spec, patch_size=self.patch_size)
        self.loss_fn = DiceCELoss()
        self.scaler = grad_scaler(self.amp_dtype, self.device)
        self.stream = BatchStream(self.train_cases, self.patch_size, self.device, seed=cfg.seed,
                                  rank=self.info.rank, global_batch=cfg.batch_size, world_size=world,
                                  foreground_fraction=cfg.foreground_fraction, augment=cfg.augment,
                                  channels_last=cfg.channels_last)
        self.optimizer: torch.optim.Optimizer | None = None
        self.net: nn.Module = self.model  # the module the step runs: DDP around the model under torchrun
        self.phase_index = -1
        self.step = 0
        self.history: list[StepRecord] = []
        self.val_history: list[dict[str, Any]] = []
        self.final_val: dict[str, Any] | None = None
        self._batches: PatchPrefetcher | None = None
        if state is not None:
            self._restore(state)
        elif self.main:
            self.metrics.clear()

    # -- construction ------------------------------------------------------------------------------
    def _load_data(self) -> Any:
        """Validate and preprocess on rank 0 first (it writes the cache and split.json), then the others."""
        stride = min_case_shape(self.model.config)
        data = load_finetune_data(self.cfg, self.out, stride, write=True) if self.main else None
        barrier(self.info)
        return data if data is not None else load_finetune_data(self.cfg, self.out, stride, write=False)

    def _patch_size(self) -> tuple[int, int, int]:
        """The training patch: ``cfg.patch_size``, a Primus's ``input_shape``, or ResEnc's automatic size."""
        config = self.model.config
        ps = self.cfg.patch_size or fixed_patch(config) or self.data.spec.patch_size
        if ps is None:
            assert isinstance(config, ResEncUNetConfig)
            ps = auto_patch_size([c.seg.shape for c in self.train_cases], config.total_stride)
        problem = patch_problem(config, ps)
        if problem:
            raise ValueError(f"patch_size {tuple(ps)}: {problem}")
        return triple(int(p) for p in ps)

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._enter_phase(int(state["optimizer_phase"]), optimizer_state=state["optimizer"])
        set_rng_state(state["rng"])
        self.scaler.load_state_dict(state["scaler"])
        saved = state.get("data", {}).get("world_size", 1)
        if self.main:
            self.metrics.truncate(self.step)
            if saved != self.info.world_size:
                warnings.warn(f"{self.checkpoint_path}: written by {saved} process(es), resuming on "
                              f"{self.info.world_size}: the data stream differs from an uninterrupted run",
                              stacklevel=3)

    # -- optimiser, phases, DDP --------------------------------------------------------------------
    def _enter_phase(self, index: int, optimizer_state: dict[str, Any] | None = None) -> None:
        """Switch to phase ``index``; a new SGD (and DDP wrapper) when the trainable set changes, else keep
        momentum."""
        new, old = self.phases[index], (self.phases[self.phase_index] if self.phase_index >= 0 else None)
        params = trainable_parameters(self.model, new, self.cfg.train_stem_in_decoder_warmup)
        opt = self.optimizer
        current = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()
        same = old is not None and current == {id(p) for p in params}
        if self.optimizer is None or not same or optimizer_state is not None:
            lr = lr_at(self.phases, new.start, self.cfg.poly_exponent)
            self.optimizer = make_optimizer(self.schedule, params, lr, momentum=self.cfg.momentum,
                                            weight_decay=self.cfg.weight_decay)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
            self.net = self.model  # free the old wrapper (and its gradient hooks) first
            self.net = wrap_ddp(self.model, self.info, self.device)
        self.phase_index = index

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """``out_dir/checkpoint_latest.pt``."""
        return checkpoint_path(self.out)

    def save_checkpoint(self) -> None:
        """Rank 0 writes model, optimiser (and its phase), step, RNG and scaler state atomically (never NaN weights)."""
        assert self.optimizer is not None
        self._check_weights()
        if not self.main:
            return
        save_checkpoint(self.out, {
            "step": self.step,
            "optimizer_phase": self.phase_index,
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_json(),
            "model_type": model_type(self.model.config),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "resume_fields": self.cfg.resume_fields(),
            "data": {"seed": self.cfg.seed, "step": self.step, "world_size": self.info.world_size,
                     "local_batch": self.local_batch},
        }, job=JOB)
        self._last_saved = self.step

    def _check_weights(self) -> None:
        """Stop (:class:`~s3d.runtime.guard.NonFiniteError`) if a weight is NaN or inf: never saved, never exported."""
        lr = self.history[-1].lr if self.history else lr_at(self.phases, max(self.step - 1, 0), self.cfg.poly_exponent)
        check_weights(self.model, self.step, lr, self.out, self._last_saved)

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases (tiled prediction in preprocessed space); logged."""
        rec = tiled_validation(self.model, self.val_cases, self.labels, self.patch_size, self.device,
                               self.amp_dtype, tile_batch=self.cfg.val_tile_batch, step=self.step)
        self.val_history.append(rec)
        self.metrics.append(rec)
        return rec

    def final_validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases as ``s3d predict`` predicts them (sliding windows).

        See :func:`~s3d.finetune.validation.sliding_window_validation`; logged and kept in ``self.final_val``.

        Example:
            >>> trainer.final_validate()["final_dice"]
            0.91
        """
        cases = progress(self.val_cases, desc="final validation", unit="case", enabled=self.cfg.progress,
                         leave=False)
        rec = sliding_window_validation(self.model, cases, self.labels, self.patch_size, self.device,
                                        self.amp_dtype, step=self.step)
        self.final_val = rec
        self.metrics.append(rec)
        return rec

    def _logged_final_validation(self) -> dict[str, Any] | None:
        """The final-validation record already in ``metrics.jsonl`` for this step (a finished run resumed)."""
        return next((rec for rec in self.metrics.records()
                     if rec.get("val_mode") == "sliding_window" and rec.get("step") == self.step), None)

    # -- the loop ----------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of ``step`` on this rank (augmented, on the training device).

        A pure function of (seed, rank, step) (:class:`~s3d.finetune.loader.BatchStream`); while
        :meth:`fit` runs, the patches come from the background prefetcher.

        Example:
            >>> x, y = trainer.batch(0)      # (B_local, C, *patch), (B_local, *patch)
        """
        return self.stream.batch(step, self._batches)

    def _loss(self, out: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the global batch's loss value)."""
        if not self.info.enabled:
            loss = self.loss_fn(out, y)
            return loss, loss.detach()
        import torch.distributed as dist

        def sum_across(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t

        return self.loss_fn.global_batch(out, y, self.info.world_size, sum_across)

    def train_step(self) -> StepRecord:
        """One optimiser step at ``self.step`` (phase switch, lr, batch, forward, backward, clip, update)."""
        cfg = self.cfg
        index = phase_at(self.phases, self.step)
        if index != self.phase_index:
            self._enter_phase(index)
        assert self.optimizer is not None
        lr = lr_at(self.phases, self.step, cfg.poly_exponent)
        set_lr(self.optimizer, lr)
        x, y = self.batch(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            out = self.net(x)
        loss, value = self._loss(out, y)
        backward_and_step(loss, self.optimizer, self.scaler, cfg.grad_clip)
        self.step += 1
        return StepRecord(self.step, float(value), lr, self.phases[index].name)

    def fit(self) -> JobResult:
        """Run the schedule (from the checkpoint's step when resumed); returns :meth:`result`.

        The lr is a function of the step and each batch a function of (seed, rank, step), so a resumed
        run continues exactly where the checkpoint left off. Under torchrun every rank calls this; rank 0
        validates, logs, writes the checkpoints and the model.
        """
        cfg, main = self.cfg, self.main
        bar = progress(desc="finetune", unit="step", total=cfg.steps, initial=self.step,
                       enabled=cfg.progress and main)
        t0 = time.perf_counter()
        self._batches = PatchPrefetcher(self.stream.patches, self.step, cfg.steps, self.device,
                                        cfg.loader_threads)
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                self.history.append(rec)
                if main:
                    self.metrics.append({"step": rec.step, "loss": rec.loss, "lr": rec.lr, "phase": rec.phase,
                                         "time_s": round(time.perf_counter() - t0, 3)})
                if not math.isfinite(rec.loss):  # the global batch's loss: every rank stops here
                    raise nonfinite_error(rec.step, rec.lr, f"the loss is {rec.loss}", self.out, self._last_saved)
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", phase=rec.phase)
                if main and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                    v = self.validate()
                    bar.write(f"step {self.step}: validation Dice {v['val_dice']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                    barrier(self.info)
                if self.on_step is not None:
                    self.on_step(self, rec)
        finally:
            self._batches.close()
            self._batches = None
            bar.close()
        if main:
            self.export(self.out / EXPORT)
            if cfg.final_validation and self.val_cases:
                self.final_val = self._logged_final_validation()  # a finished run resumed: not twice
                if self.final_val is None:
                    v = self.final_validate()
                    print(f"step {self.step}: final validation Dice (sliding window) {v['final_dice']:.4f}")
        barrier(self.info)
        return self.result()

    def result(self) -> JobResult:
        """The job's :class:`~s3d.runtime.result.JobResult`: ``.model`` (the network), ``.paths`` (``"metrics"``,
        ``"checkpoint"``, and ``"model"`` once finished), ``.metrics`` (the last ``"loss"``, ``"val_dice"``,
        ``"final_dice"`` this process computed)."""
        finished = self.step >= self.cfg.steps
        paths = {"metrics": self.metrics.path, "checkpoint": self.checkpoint_path}
        if finished:
            paths["model"] = self.out / "model"
        metrics: dict[str, float] = {}
        if self.history:
            metrics["loss"] = float(self.history[-1].loss)
        if self.val_history:
            metrics["val_dice"] = float(self.val_history[-1]["val_dice"])
        if self.final_val is not None:
            metrics["final_dice"] = float(self.final_val["final_dice"])
        return JobResult(self.model, self.out, self.step, finished, paths, metrics)

    def export(self, directory: str | os.PathLike[str]) -> Path:
        """Save the model (no deep supervision; finite weights only) with ``save_pretrained`` plus
        ``preprocessing.json``, as a whole (:func:`s3d._fs.atomic_folder`): the three files always belong together."""
        from s3d.hub import save_pretrained

        self._check_weights()
        config = self.model.config
        plain = build_from_config(dataclasses.replace(config, deep_supervision=False)
                                  if isinstance(config, ResEncUNetConfig) else config)
        plain.load_state_dict(self.model.state_dict())
        run = {k: v for k, v in self.cfg.to_dict().items() if k not in ("dataset", "out_dir", "resume", "overwrite")}
        recipe = {"finetune": run, "steps_done": self.step, "schedule": dataclasses.asdict(self.schedule)}
        with atomic_folder(directory) as tmp:
            save_pretrained(plain, tmp, recipe=recipe)
            self.spec.save(tmp / "preprocessing.json")
        return Path(directory)

