"""The pre-training loop: one loop for every method, on CPU, one GPU or N processes (torchrun/DDP); the entry
point :func:`s3d.pretrain.run` is :mod:`~s3d.pretrain.job`.

:class:`Trainer` builds everything a run needs in its constructor (process group, device and AMP,
recipe, data split, method, optimiser, a resumed checkpoint); :meth:`Trainer.fit` runs the steps, each
one :meth:`Trainer.train_step` (lr, forward, backward, update) then :meth:`Trainer.after_step` (logs,
validation, snapshots, checkpoints), as the fine-tuning :class:`s3d.finetune.Trainer` does:

- the recipe's SGD and per-step PolyLR (:mod:`s3d.runtime.lr`), gradient-norm clipping, AMP (bf16
  where supported, fp16 with a GradScaler otherwise, off on CPU), optional channels_last_3d and
  ``torch.compile``;
- batched augmentation on the training device (:meth:`s3d.augment.AugmentConfig.pretraining`);
- DDP when launched with ``torchrun`` (global batch split across ranks, data sharded per rank, a
  method's ``loss_weight`` normalised over the global batch, rank 0 logs and writes checkpoints);
- a held-out validation loss (split by subject), PNG reconstruction snapshots, ``metrics.jsonl``,
  optional TensorBoard, a progress bar with the loss and lr; with ``cfg.probe`` the frozen-encoder probe
  (:mod:`~s3d.pretrain.probing`) on the initial weights and after checkpoints;
- complete atomic checkpoints (:mod:`s3d.runtime.checkpoint`: the method's state, with what it chose at
  run time, e.g. the encoder engine of ``engine="auto"``; optimiser, scaler, RNG states);
- each run-time choice (e.g. measured on the first step by :mod:`s3d.sparse.autotune`) printed once to
  stderr and recorded in ``metrics.jsonl`` (``{"step": 1, "engine_choice": {...}}``).

The loop knows a method only through :class:`s3d.runtime.method.PretrainMethod`.

Reproducibility: the crops, the augmentation and the method's own randomness (e.g. the MAE mask) of
step ``t`` on rank ``r`` are drawn from streams seeded by ``(seed, r, t)``. Resuming at step ``t``
therefore reproduces the uninterrupted run exactly (bitwise on CPU); the global RNG states are
saved and restored too, for code that draws from them between steps.

At the end the backbone is exported (:mod:`s3d.pretrain.export`): ``RUN/backbone`` and
``RUN/nnssl/checkpoint_final.pth`` + ``adaptation_plan.json``.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from s3d._fs import write_json_atomic
from s3d.pretrain.config import PretrainConfig
from s3d.pretrain.export import backbone_model, export_backbone
from s3d.pretrain.heldout import validation_loss, write_snapshot
from s3d.pretrain.methods import build_backbone, build_method
from s3d.pretrain.probing import probe_hook
from s3d.runtime.checkpoint import check_resume, checkpoint_path, claim_run_folder, load_checkpoint, save_checkpoint
from s3d.runtime.device import autocast, resolve_amp, resolve_device
from s3d.runtime.distributed import barrier, global_weighted_loss, init_distributed, mean_across
from s3d.runtime.guard import FiniteWatch, check_weights, nonfinite_error
from s3d.runtime.lr import lr_at, set_lr
from s3d.runtime.method import PatchProblemError
from s3d.runtime.metrics import MetricsLog
from s3d.runtime.optim import backward_and_step, grad_scaler, rng_state, set_rng_state, sgd, stream_seed
from s3d.runtime.progress import progress
from s3d.runtime.result import JobResult

JOB = "pretrain"
EXPORTS = ("backbone", "nnssl")  # what a finished run exports (replaced only with --overwrite)
# purposes of the derived random streams
_AUGMENT, _METHOD, _VAL = 1, 2, 3


class StepRecord(NamedTuple):
    """What one pre-training step computed (tensors: no host sync until a log step reads them).

    Attributes:
        step: the global step count after this step.
        loss: this rank's loss (0-d tensor).
        global_loss: the global batch's loss under torchrun when the method weighs its loss, else ``None``.
        lr: the learning rate of this step.
        grad_norm: the global gradient norm before clipping (0-d tensor; NaN without clipping).
    """

    step: int
    loss: torch.Tensor
    global_loss: torch.Tensor | None
    lr: float
    grad_norm: torch.Tensor


class Trainer:
    """One pre-training run: everything is built and (with ``cfg.resume``) restored in the constructor.

    Args:
        cfg: the run's settings.
        on_step: called as ``on_step(trainer, record)`` after every step's :meth:`after_step`.

    Raises:
        FileExistsError: ``cfg.out`` holds an earlier run (checkpoints, ``backbone/``, ``nnssl/``) and
            neither ``cfg.resume`` nor ``cfg.overwrite`` is set.
        PatchProblemError: the method cannot train on the recipe's patch size (names the parameters to change).
        ResumeError / CheckpointError: the checkpoint does not fit the settings or is damaged.

    Example:
        >>> Trainer(PretrainConfig(data="prep", out="runs/a", architecture="tiny", steps=10)).fit()
    """

    def __init__(self, cfg: PretrainConfig, on_step: Callable[[Trainer, StepRecord], None] | None = None) -> None:
        from s3d.data.pretrain_dataset import shard_cases, split_subjects
        from s3d.data.scan import read_manifest, training_cases
        self.cfg = cfg
        self.on_step = on_step
        self.info = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.info.local_rank)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.recipe = cfg.resolved_recipe()
        self.out = Path(cfg.out)
        self.metrics = MetricsLog.of_run(self.out)
        if self.recipe.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {self.recipe.batch_size} (global) is not divisible by the "
                             f"{self.info.world_size} processes")
        self.local_batch = self.recipe.batch_size // self.info.world_size

        cases = training_cases(read_manifest(cfg.data), cfg.data)
        if not cases:
            raise ValueError(f"{cfg.data}: the manifest lists no preprocessed image")
        train, val = split_subjects(cases, cfg.val_fraction, cfg.seed)
        self.train_files = [c["file"] for c in shard_cases(train, self.info.rank, self.info.world_size)]
        self.val_files = [c["file"] for c in val[: cfg.val_max_cases]]
        self.n_train, self.n_val = len(train), len(val)

        torch.manual_seed(cfg.seed)
        self.method = build_method(self.recipe.method, build_backbone(self.recipe.architecture, self.recipe.patch_size),
                                   **self.recipe.method_kwargs)
        problem = self.method.patch_problem(self.recipe.patch_size)
        if problem is not None:
            raise PatchProblemError(problem)
        self.method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last_3d)
        r = self.recipe
        self.optimizer = sgd(self.method.parameters(), r.lr, momentum=r.momentum, nesterov=r.nesterov,
                             weight_decay=r.weight_decay)
        self.lr_phases = r.lr_phases()
        self.scaler = grad_scaler(self.amp_dtype, self.device)
        self.watch, self.last_saved = FiniteWatch(), None  # first non-finite loss (no sync per step); last checkpoint
        self._probe = None  # the pre-training probe (s3d.pretrain.probing), set up by fit()
        self.net: nn.Module = self.method  # what a step runs: DDP and/or torch.compile around it in fit()
        self.start_step = self.step = 0
        self.last_loss = float("nan")
        self.last_val_loss: float | None = None
        self._resume()

    # ---- checkpoints ----
    def resume_fields(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint: the recipe (flattened), seed and split."""
        fields = {f"recipe.{k}": v for k, v in self.recipe.to_dict().items() if k != "description"}
        return {**fields, "seed": self.cfg.seed, "val_fraction": self.cfg.val_fraction, "augment": self.cfg.augment}

    def save_checkpoint(self, step: int) -> None:
        """Rank 0 writes ``RUN/checkpoint_latest.pt`` (the previous one kept); never NaN weights (checked first)."""
        self.check_finite(step)
        if not self.info.is_main:
            return
        save_checkpoint(self.out, {
            "step": step,
            "model": self.method.state_dict(),  # with the method's run-time choices (its extra state)
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "resume_fields": self.resume_fields(),
            "data": {"seed": self.cfg.seed, "step": step, "world_size": self.info.world_size,
                     "local_batch": self.local_batch, "n_train": self.n_train, "n_val": self.n_val},
            "recipe": self.recipe.to_dict(),
        }, job=JOB)
        self.last_saved = step

    def check_finite(self, step: int) -> None:
        """Stop (:class:`~s3d.runtime.guard.NonFiniteError`: step, lr, checkpoint kept) on a NaN/inf loss or weight."""
        self.watch.check(self._lr_of_step, self.out, self.last_saved)
        check_weights(self.method, step, self._lr_of_step(step), self.out, self.last_saved)

    def _lr_of_step(self, step: int) -> float:  # step t ran with the lr of t - 1
        return lr_at(self.lr_phases, step - 1, self.recipe.poly_exponent)

    def _resume(self) -> None:
        path = checkpoint_path(self.out)
        if self.info.is_main or not self.cfg.overwrite:  # an earlier run: refused, or removed by rank 0
            claim_run_folder(self.out, job=JOB, resume=self.cfg.resume, overwrite=self.cfg.overwrite,
                             exports=EXPORTS, scratch=("snapshots/step_*.png", "tb/events.out.tfevents.*"))
        barrier(self.info)
        exists = path.is_file() or (self.out / "checkpoint_previous.pt").is_file()
        if not exists:
            if self.cfg.resume and self.info.is_main:
                warnings.warn(f"--resume: no {path}; starting from step 0", stacklevel=3)
            return
        ckpt = load_checkpoint(self.out, job=JOB, map_location=self.device)
        check_resume(ckpt["resume_fields"], self.resume_fields(), path)
        self.method.load_state_dict(ckpt["model"])  # also what the method chose: a resumed run runs the same
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.start_step = self.step = self.last_saved = int(ckpt["step"])
        if ckpt["data"]["world_size"] != self.info.world_size and self.info.is_main:
            warnings.warn(f"checkpoint written by {ckpt['data']['world_size']} process(es), resuming on "
                          f"{self.info.world_size}: the data stream differs from an uninterrupted run",
                          stacklevel=3)

    # ---- evaluation helpers ----
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def validate(self) -> float | None:
        """The method's loss over the held-out images (:func:`~s3d.pretrain.heldout.validation_loss`: the
        weighted mean over the whole set for a method with a ``loss_weight``); ``None`` without held-out images."""
        torch.manual_seed(stream_seed(self.cfg.seed, 0, 0, _VAL))
        return validation_loss(self.method, self.val_files, self.recipe.patch_size, self.local_batch,
                               self._prepare_input, self.amp_dtype)

    def snapshot(self, step: int, fallback: torch.Tensor) -> Path | None:
        """Write ``RUN/snapshots/step_XXXXXXXX.png`` from the first held-out image (or ``fallback``)."""
        from s3d.data.pretrain_dataset import CenterCropDataset

        x = (CenterCropDataset(self.val_files[:1], self.recipe.patch_size)[0][None] if self.val_files
             else fallback[:1].float().cpu())
        torch.manual_seed(stream_seed(self.cfg.seed, 0, step, _VAL))
        return write_snapshot(self.method, self._prepare_input(x), self.out / "snapshots" / f"step_{step:08d}.png",
                              self.amp_dtype)

    def export(self) -> dict[str, Path]:
        """Write the backbone as s3d safetensors (``RUN/backbone``) and as an nnssl checkpoint (``RUN/nnssl``)."""
        return export_backbone(self.method, self.recipe, self.out, self.cfg.data, self.n_train)

    # ---- train ----
    def _start_logs(self):
        """Rank 0: run folder, ``run.json``, the metrics log cut back to the checkpoint, TensorBoard."""
        if not self.info.is_main:
            return None
        self.metrics.truncate(self.start_step)
        write_json_atomic(self.out / "run.json", {"recipe": self.recipe.to_dict(), "config": self.cfg.to_dict(),
                                                  "world_size": self.info.world_size, "n_train": self.n_train,
                                                  "n_val": self.n_val})
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        return SummaryWriter(str(self.out / "tb"))

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.method
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def train_step(self, x: torch.Tensor) -> StepRecord:
        """One optimiser step at ``self.step`` on a prepared batch ``x`` (B_local, C, D, H, W): lr, the
        method's random stream, forward, the (global-batch) loss, backward, clip, update."""
        cfg, info, recipe = self.cfg, self.info, self.recipe
        lr = lr_at(self.lr_phases, self.step, recipe.poly_exponent)
        set_lr(self.optimizer, lr)
        torch.manual_seed(stream_seed(cfg.seed, info.rank, self.step, _METHOD))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            out = self.net(x)
        loss, global_loss = out.loss, None
        if info.enabled and out.loss_weight is not None:
            # normalise by the global batch's loss weight (e.g. masked voxels of all ranks), not
            # per rank: DDP's gradient average then equals one process with the whole batch
            loss, global_loss = global_weighted_loss(loss, out.loss_weight, info)
        grad_norm = backward_and_step(loss, self.optimizer, self.scaler, recipe.grad_clip)
        self.step += 1
        if global_loss is not None or not info.enabled:  # a value every rank agrees on
            self.watch.observe(loss if global_loss is None else global_loss, self.step)
        return StepRecord(self.step, loss, global_loss, lr, grad_norm)

    def after_step(self, rec: StepRecord, x: torch.Tensor) -> None:
        """Everything after an update: run-time choices, the metrics line (log steps only: the one host
        sync), the progress bar, validation, a snapshot (of ``x`` without held-out images) and checkpoints."""
        cfg, info, main = self.cfg, self.info, self.info.is_main
        step = rec.step
        if main:
            for key, choice in self.method.engine_choices.items():
                if key not in self._logged_choices:
                    self._logged_choices.add(key)
                    self._bar.write(f"step {step}: {choice.message()}", file=sys.stderr)
                    self.metrics.append({"step": step, "engine_choice": choice.to_dict()})
        if step % cfg.log_every == 0 or step == self._stop:  # no host sync between log steps
            # every rank takes part in the reduction (the global weighted mean was reduced above)
            self.last_loss = mean_across(rec.loss, info) if rec.global_loss is None else float(rec.global_loss)
            if not math.isfinite(self.last_loss):  # every rank sees the reduced loss
                self.watch.check(self._lr_of_step, self.out, self.last_saved)
                raise nonfinite_error(step, rec.lr, f"the loss is {self.last_loss}", self.out, self.last_saved)
            if main:
                now = time.perf_counter()
                rate = (step - self._step_last) / max(now - self._t_last, 1e-9)
                self._t_last, self._step_last = now, step
                record = {"step": step, "loss": self.last_loss, "lr": rec.lr, "grad_norm": float(rec.grad_norm),
                          "steps_per_s": rate, "patches_per_s": rate * self.recipe.batch_size, "time": time.time(),
                          **self._loader.take()}
                if self.device.type == "cuda":
                    record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self.metrics.append(record)
                if self._tb is not None:
                    self._tb.add_scalar("train/loss", self.last_loss, step)
                    self._tb.add_scalar("train/lr", rec.lr, step)
                self._bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{rec.lr:.2e}")
        self._bar.update()
        if main and cfg.val_every and (step % cfg.val_every == 0 or step == self.recipe.steps):
            val = self.validate()
            if val is not None:
                self.last_val_loss = val
                self.metrics.append({"step": step, "val_loss": val})
                if self._tb is not None:
                    self._tb.add_scalar("val/loss", val, step)
        if main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            self.snapshot(step, x)
        if step % cfg.checkpoint_every == 0 or step == self._stop:
            self.save_checkpoint(step)
            barrier(info)
            if self._probe is not None:
                self._probe.after_checkpoint(step, final=step >= self.recipe.steps)
        if self.on_step is not None:
            self.on_step(self, rec)

    def fit(self) -> JobResult:
        """Run the remaining steps (to ``cfg.stop_after`` at most) and export the backbone when every step ran.

        Returns:
            :class:`~s3d.runtime.result.JobResult`: the backbone with its pre-trained weights, the run's
            files (``paths["backbone"]``, ``paths["nnssl"]`` when finished) and ``metrics["loss"]``.
        """
        from s3d.augment import Augment, AugmentConfig
        from s3d.data.pretrain_dataset import LoaderStats, build_pretrain_loader

        cfg, info, recipe = self.cfg, self.info, self.recipe
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(info)
        self._tb = self._start_logs()
        self.net = self._wrap()
        self._stop = recipe.steps if cfg.stop_after is None else min(recipe.steps, cfg.stop_after)
        loader = build_pretrain_loader(self.train_files, recipe.patch_size, self.local_batch, self.step,
                                       self._stop, seed=cfg.seed, rank=info.rank, workers=cfg.workers,
                                       pin_memory=self.device.type == "cuda", prefetch_factor=cfg.prefetch_factor)
        self._loader = LoaderStats(loader)  # loader_wait / loader_queue in metrics.jsonl: does the step wait?
        augment = Augment(AugmentConfig.pretraining()) if cfg.augment else None
        self._bar = progress(desc="pretrain", unit="step", total=recipe.steps, initial=self.step,
                             enabled=info.is_main and cfg.progress)
        self._t_last, self._step_last = time.perf_counter(), self.step
        self._logged_choices: set = set()
        self._probe = probe_hook(self)  # on the initial weights first (a fresh run), then after checkpoints
        self.method.train()
        try:
            for batch in self._loader:
                x = self._prepare_input(batch)
                if augment is not None:
                    x = augment(x, torch.Generator().manual_seed(stream_seed(cfg.seed, info.rank, self.step, _AUGMENT)))
                x = self.method.prepare_batch(x)
                self.after_step(self.train_step(x), x)
        finally:
            self._bar.close()
            if self._tb is not None:
                self._tb.close()
        finished = self.step >= recipe.steps
        paths = {"metrics": self.metrics.path, "checkpoint": checkpoint_path(self.out)}
        if finished and info.is_main:
            self.check_finite(self.step)
            paths.update(self.export())
        barrier(info)
        metrics = {"loss": self.last_loss}
        if self.last_val_loss is not None:
            metrics["val_loss"] = self.last_val_loss
        return JobResult(backbone_model(self.method), self.out, self.step, finished, paths, metrics)

    def train(self) -> JobResult:
        """Deprecated name of :meth:`fit` (as the fine-tuning :class:`s3d.finetune.Trainer` calls it)."""
        warnings.warn("Trainer.train() is deprecated: use Trainer.fit()", DeprecationWarning, stacklevel=2)
        return self.fit()
