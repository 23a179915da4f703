"""The pre-training loop: one loop for every method, on CPU, one GPU or N processes (torchrun/DDP).

:class:`PretrainRun` builds everything a run needs in its constructor (process group, device and
AMP, recipe, data split, method, optimiser, a resumed checkpoint) and :meth:`PretrainRun.train`
runs the steps:

- the recipe's SGD and per-step PolyLR (:mod:`s3d.runtime.lr`), gradient-norm clipping, AMP (bf16
  where supported, fp16 with a GradScaler otherwise, off on CPU), optional channels_last_3d and
  ``torch.compile``;
- batched augmentation on the training device (:meth:`s3d.augment.AugmentConfig.pretraining`);
- DDP when launched with ``torchrun`` (global batch split across ranks, data sharded per rank, a
  method's ``loss_weight`` normalised over the global batch, rank 0 logs and writes checkpoints);
- a held-out validation loss (split by subject), PNG reconstruction snapshots, ``metrics.jsonl``,
  optional TensorBoard, a progress bar with the loss and lr;
- complete atomic checkpoints (:mod:`s3d.runtime.checkpoint`: model, optimiser, scaler, RNG states,
  and the encoder engine ``engine="auto"`` picked, which a resumed run reuses);
- the engine choice of ``engine="auto"`` (:mod:`s3d.sparse.autotune`, measured on the first step) printed
  once to stderr and recorded in ``metrics.jsonl`` (``{"step": 1, "engine_choice": {...}}``).

Reproducibility: the crops, the augmentation and the method's own randomness (e.g. the MAE mask) of
step ``t`` on rank ``r`` are drawn from streams seeded by ``(seed, r, t)``. Resuming at step ``t``
therefore reproduces the uninterrupted run exactly (bitwise on CPU); the global RNG states are
saved and restored too, for code that draws from them between steps.

At the end the backbone is exported with :func:`s3d.hub.save_pretrained` (``RUN/backbone``) and as
an nnssl checkpoint (``RUN/nnssl/checkpoint_final.pth`` + ``adaptation_plan.json``).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s3d._fs import atomic_folder, write_json_atomic
from s3d.pretrain.config import PretrainConfig, _check_mask_blocks
from s3d.pretrain.methods import build_method
from s3d.pretrain.snapshots import reconstruction_panels, snapshot_image, write_png
from s3d.runtime.checkpoint import check_resume, checkpoint_path, claim_run_folder, load_checkpoint, save_checkpoint
from s3d.runtime.device import autocast, resolve_amp, resolve_device
from s3d.runtime.distributed import barrier, cleanup, global_weighted_loss, init_distributed, mean_across
from s3d.runtime.guard import FiniteWatch, check_weights, nonfinite_error
from s3d.runtime.lr import lr_at, set_lr
from s3d.runtime.metrics import MetricsLog
from s3d.runtime.optim import backward_and_step, grad_scaler, rng_state, set_rng_state, sgd, stream_seed
from s3d.runtime.progress import progress

JOB = "pretrain"
EXPORTS = ("backbone", "nnssl")  # what a finished run exports (replaced only with --overwrite)
# purposes of the derived random streams
_AUGMENT, _METHOD, _VAL = 1, 2, 3


class PretrainRun:
    """One pre-training run: everything is built and (with ``cfg.resume``) restored in the constructor.

    Args:
        cfg: the run's settings.

    Raises:
        FileExistsError: ``cfg.out`` holds an earlier run (checkpoints, ``backbone/``, ``nnssl/``) and
            neither ``cfg.resume`` nor ``cfg.overwrite`` is set.
        ResumeError / CheckpointError: the checkpoint does not fit the settings or is damaged.

    Example:
        >>> PretrainRun(PretrainConfig(data="prep", out="runs/a", architecture="tiny", steps=10)).train()
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        from s3d.data.pretrain_dataset import shard_cases, split_subjects
        from s3d.data.scan import read_manifest, training_cases
        from s3d.nn import build_resenc_unet

        self.cfg = cfg
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
        backbone = build_resenc_unet(self.recipe.architecture, in_channels=1, num_classes=1,
                                     deep_supervision=False)
        self.method: nn.Module = build_method(self.recipe.method, backbone, **self.recipe.method_kwargs)
        _check_mask_blocks(self.recipe.patch_size, getattr(self.method, "block_size", None))
        self.method.to(self.device)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last_3d)
        r = self.recipe
        self.optimizer = sgd(self.method.parameters(), r.lr, momentum=r.momentum, nesterov=r.nesterov,
                             weight_decay=r.weight_decay)
        self.lr_phases = r.lr_phases()
        self.scaler = grad_scaler(self.amp_dtype, self.device)
        self.watch, self.last_saved = FiniteWatch(), None  # first non-finite loss (no sync per step); last checkpoint
        self.start_step = 0
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
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "resume_fields": self.resume_fields(),
            "data": {"seed": self.cfg.seed, "step": step, "world_size": self.info.world_size,
                     "local_batch": self.local_batch, "n_train": self.n_train, "n_val": self.n_val},
            "recipe": self.recipe.to_dict(),
            "engine_choices": [c.to_dict() for c in getattr(self.method, "engine_choices", {}).values()],
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
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ckpt.get("engine_choices") and hasattr(self.method, "restore_engine_choices"):
            self.method.restore_engine_choices(ckpt["engine_choices"])  # same engine as before: bitwise resume
        self.start_step = self.last_saved = int(ckpt["step"])
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

    @torch.no_grad()
    def validate(self) -> float | None:
        """The method's loss over the held-out images (centre crops); ``None`` without held-out images.

        For a method that reports ``loss_weight`` (MAE: masked voxels) the value is the weighted mean
        over the whole set, as the training loss is over the global batch; otherwise the image mean.
        """
        from s3d.data.pretrain_dataset import CenterCropDataset

        if not self.val_files:
            return None
        ds = CenterCropDataset(self.val_files, self.recipe.patch_size)
        total, n = 0.0, 0.0
        self.method.eval()
        torch.manual_seed(stream_seed(self.cfg.seed, 0, 0, _VAL))
        for i in range(0, len(ds), self.local_batch):
            x = self._prepare_input(torch.stack([ds[j] for j in range(i, min(i + self.local_batch, len(ds)))]))
            with autocast(self.device, self.amp_dtype):
                out = self.method(x)
            weight = getattr(out, "loss_weight", None)
            w = float(weight) if weight is not None else float(x.shape[0])
            total, n = total + float(out.loss) * w, n + w
        self.method.train()
        return total / n if n > 0 else float("nan")

    @torch.no_grad()
    def snapshot(self, step: int, fallback: torch.Tensor) -> Path | None:
        """Write ``RUN/snapshots/step_XXXXXXXX.png`` from the first held-out image (or ``fallback``)."""
        from s3d.data.pretrain_dataset import CenterCropDataset

        x = (CenterCropDataset(self.val_files[:1], self.recipe.patch_size)[0][None] if self.val_files
             else fallback[:1].float().cpu())
        x = self._prepare_input(x)
        self.method.eval()
        torch.manual_seed(stream_seed(self.cfg.seed, 0, step, _VAL))
        with autocast(self.device, self.amp_dtype):
            out = self.method(x)
        self.method.train()
        panels = reconstruction_panels(x, out)
        if panels is None:
            return None
        path = self.out / "snapshots" / f"step_{step:08d}.png"
        write_png(path, snapshot_image(panels))
        return path

    # ---- export ----
    def export(self) -> dict[str, str]:
        """Write the backbone as s3d safetensors (``RUN/backbone``) and as an nnssl checkpoint (``RUN/nnssl``)."""
        from s3d.hub import nnssl_checkpoint, save_pretrained
        from s3d.hub.nnssl import adaptation_plan
        from s3d.nn import build_resenc_unet

        backbone = build_resenc_unet(self.method.backbone.config)
        backbone.load_state_dict(self.method.export_backbone())
        recipe = self.recipe.to_dict()
        provenance = (f"Pre-trained with s3d recipe {self.recipe.name!r} ({self.recipe.method}) for "
                      f"{self.recipe.steps} steps at batch {self.recipe.batch_size} on {self.n_train} images "
                      f"of {self.cfg.data}.")
        hub_dir, nn_dir = self.out / "backbone", self.out / "nnssl"
        with atomic_folder(hub_dir) as tmp:  # each folder as a whole: its files always belong together
            save_pretrained(backbone, tmp, recipe=recipe, provenance=provenance)
        ckpt = nnssl_checkpoint(backbone.state_dict(), backbone.config, trainer_name="s3d.pretrain")
        ckpt["current_epoch"] = self.recipe.steps // 250  # nnssl counts epochs of 250 steps
        ckpt["nnssl_adaptation_plan"] = adaptation_plan(backbone.config, self.recipe.patch_size)
        with atomic_folder(nn_dir) as tmp:
            torch.save(ckpt, tmp / "checkpoint_final.pth")
            write_json_atomic(tmp / "adaptation_plan.json", ckpt["nnssl_adaptation_plan"])
        return {"backbone": str(hub_dir), "nnssl": str(nn_dir / "checkpoint_final.pth")}

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

    def _log_engine_choices(self, step: int, logged: set, bar: Any) -> None:
        """Rank 0: print and record in ``metrics.jsonl`` each engine choice not logged yet (``engine="auto"``)."""
        for key, choice in getattr(self.method, "engine_choices", {}).items():
            if key not in logged:
                logged.add(key)
                bar.write(f"step {step}: {choice.message()}", file=sys.stderr)
                self.metrics.append({"step": step, "engine_choice": choice.to_dict()})

    def _wrap(self) -> nn.Module:
        model: nn.Module = self.method
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def train(self) -> dict[str, Any]:
        """Run the remaining steps; returns ``{"step", "loss", "run", "finished", "backbone", "nnssl"}``."""
        from s3d.augment import Augment, AugmentConfig
        from s3d.data.pretrain_dataset import LoaderStats, build_pretrain_loader

        cfg, info, recipe = self.cfg, self.info, self.recipe
        main = info.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(info)
        tb = self._start_logs()
        model = self._wrap()
        stop = recipe.steps if cfg.stop_after is None else min(recipe.steps, cfg.stop_after)
        loader = build_pretrain_loader(self.train_files, recipe.patch_size, self.local_batch, self.start_step,
                                       stop, seed=cfg.seed, rank=info.rank, workers=cfg.workers,
                                       pin_memory=self.device.type == "cuda",
                                       prefetch_factor=cfg.prefetch_factor)
        loader = LoaderStats(loader)  # loader_wait / loader_queue in metrics.jsonl: does the step wait for data?
        augment = Augment(AugmentConfig.pretraining()) if cfg.augment else None
        bar = progress(desc="pretrain", unit="step", total=recipe.steps, initial=self.start_step,
                       enabled=main and cfg.progress)
        t_last, step_last = time.perf_counter(), self.start_step
        step = self.start_step
        last_loss = float("nan")
        engines_logged: set = set()
        self.method.train()
        for batch in loader:
            x = self._prepare_input(batch)
            if augment is not None:
                x = augment(x, torch.Generator().manual_seed(stream_seed(cfg.seed, info.rank, step, _AUGMENT)))
            lr = lr_at(self.lr_phases, step, recipe.poly_exponent)
            set_lr(self.optimizer, lr)
            torch.manual_seed(stream_seed(cfg.seed, info.rank, step, _METHOD))
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.amp_dtype):
                out = model(x)
            loss, global_loss = out.loss, None
            loss_weight = getattr(out, "loss_weight", None)
            if info.enabled and loss_weight is not None:
                # normalise by the global batch's loss weight (e.g. masked voxels of all ranks), not
                # per rank: DDP's gradient average then equals one process with the whole batch
                loss, global_loss = global_weighted_loss(loss, loss_weight, info)
            grad_norm = backward_and_step(loss, self.optimizer, self.scaler, recipe.grad_clip)
            step += 1
            if global_loss is not None or not info.enabled:  # a value every rank agrees on
                self.watch.observe(loss if global_loss is None else global_loss, step)
            if main:
                self._log_engine_choices(step, engines_logged, bar)
            if step % cfg.log_every == 0 or step == stop:  # no host sync between log steps
                # every rank takes part in the reduction (the global weighted mean was reduced above)
                last_loss = mean_across(loss, info) if global_loss is None else float(global_loss)
                if not math.isfinite(last_loss):  # every rank sees the reduced loss
                    self.watch.check(self._lr_of_step, self.out, self.last_saved)
                    raise nonfinite_error(step, lr, f"the loss is {last_loss}", self.out, self.last_saved)
                if main:
                    now = time.perf_counter()
                    rate = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                              "steps_per_s": rate, "patches_per_s": rate * recipe.batch_size, "time": time.time(),
                              **loader.take()}
                    if self.device.type == "cuda":
                        record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.metrics.append(record)
                    if tb is not None:
                        tb.add_scalar("train/loss", last_loss, step)
                        tb.add_scalar("train/lr", lr, step)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if main and cfg.val_every and (step % cfg.val_every == 0 or step == recipe.steps):
                val = self.validate()
                if val is not None:
                    self.metrics.append({"step": step, "val_loss": val})
                    if tb is not None:
                        tb.add_scalar("val/loss", val, step)
            if main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                self.snapshot(step, x)
            if step % cfg.checkpoint_every == 0 or step == stop:
                self.save_checkpoint(step)
                barrier(info)
        bar.close()
        if tb is not None:
            tb.close()
        result: dict[str, Any] = {"step": step, "loss": last_loss, "run": str(self.out),
                                  "finished": step >= recipe.steps}
        if step >= recipe.steps and main:
            self.check_finite(step)
            result.update(self.export())
        barrier(info)
        return result


def run(cfg: PretrainConfig | None = None, /, **fields: Any) -> dict[str, Any]:
    """Run (or resume) pre-training; returns ``{"step", "loss", "finished", "backbone", "nnssl", ...}``.

    Args:
        cfg: the run's settings; or give :class:`PretrainConfig` fields as keywords instead
            (with a ``cfg``, keywords override its fields).

    Under ``torchrun`` every process calls this; rank 0 writes the run directory.

    Example:
        >>> s3d.pretrain.run(data="prep/", out="runs/tiny", recipe="s3d-b", architecture="tiny", steps=20,
        ...                  batch_size=2, patch_size=(32, 32, 32), method_kwargs={"block_size": 16}, workers=0)
        {'step': 20, ...}
    """
    import dataclasses

    cfg = dataclasses.replace(cfg, **fields) if cfg is not None else PretrainConfig(**fields)
    try:
        return PretrainRun(cfg).train()
    finally:
        cleanup()
