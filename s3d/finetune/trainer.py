"""The fine-tuning loop (:class:`Trainer`) and its entry point (:func:`run`).

A :class:`Trainer` is one run folder: its constructor validates and preprocesses the dataset
(cached), builds or resumes the model, and sets every piece of state; :meth:`Trainer.fit` runs the
schedule's phases. It is built on :mod:`s3d.runtime` (device and AMP, checkpoints, metrics log, lr,
optimiser step), as pre-training is.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s3d._fs import write_json_atomic
from s3d.finetune.config import FinetuneConfig, auto_patch_size
from s3d.finetune.data import load_finetune_data
from s3d.finetune.losses import DiceCELoss
from s3d.finetune.patches import sample_patches
from s3d.finetune.schedules import Phase, get_schedule
from s3d.finetune.transfer import decoder_parameters, prepare_model
from s3d.finetune.validation import predict_sliding_window, predict_tiled, validation_dice
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet
from s3d.runtime.checkpoint import check_resume, checkpoint_path, load_checkpoint, save_checkpoint
from s3d.runtime.device import autocast, resolve_amp, resolve_device
from s3d.runtime.lr import lr_at, phase_at, set_lr
from s3d.runtime.metrics import MetricsLog
from s3d.runtime.optim import backward_and_step, grad_scaler, rng_state, set_rng_state, sgd
from s3d.runtime.progress import progress

JOB = "finetune"


@dataclass
class StepRecord:
    """What one optimiser step logged."""

    step: int
    loss: float
    lr: float
    phase: str


class Trainer:
    """The fine-tuning loop: one object per run folder.

    Files in ``cfg.out_dir``: ``finetune_config.json``, ``split.json``, ``metrics.jsonl`` (one JSON
    object per step and per validation), ``checkpoint_latest.pt`` and ``checkpoint_previous.pt``
    (model, optimiser, step, RNG; atomic), and at the end ``model/`` (:func:`s3d.hub.save_pretrained`
    + ``preprocessing.json``).

    Args:
        cfg: the run (``cfg.resume`` continues from the run folder's checkpoint).
        model: use this network instead of :func:`~s3d.finetune.prepare_model` (ignored on resume).
        on_step: called as ``on_step(trainer, record)`` after every step (e.g. to stop early).

    Raises:
        FileExistsError: the run folder has a checkpoint and ``cfg.resume`` is off.
        ResumeError / CheckpointError: the checkpoint does not fit the settings or is damaged.
        s3d.data.nnunet.DatasetError: the dataset has problems (all listed, with their files).

    Example:
        >>> Trainer(FinetuneConfig("Dataset001", "runs/a", schedule="best", steps=1000)).fit()
    """

    def __init__(self, cfg: FinetuneConfig, model: ResEncUNet | None = None,
                 on_step: Callable[[Trainer, StepRecord], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.schedule = get_schedule(cfg.schedule)
        self.phases: list[Phase] = self.schedule.plan(cfg.steps, cfg.warmup_steps, cfg.peak_lr)
        self.on_step = on_step
        self.metrics = MetricsLog.of_run(self.out)
        state = self._read_checkpoint()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "finetune_config.json", cfg.to_dict())
        self.data = load_finetune_data(cfg, self.out)
        self.train_cases, self.val_cases, self.labels = self.data.train_cases, self.data.val_cases, self.data.labels
        self.model: ResEncUNet = self._build_model(state, model)
        self.patch_size = self._patch_size()
        self.spec = dataclasses.replace(self.data.spec, patch_size=self.patch_size)
        self.loss_fn = DiceCELoss()
        self.scaler = grad_scaler(self.amp_dtype, self.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase_index = -1
        self.step = 0
        self.history: list[StepRecord] = []
        self.val_history: list[dict[str, Any]] = []
        self.final_val: dict[str, Any] | None = None
        if state is not None:
            self._restore(state)
        else:
            self.metrics.clear()

    # -- construction ------------------------------------------------------------------------------
    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = checkpoint_path(self.out)
        exists = path.exists() or (self.out / "checkpoint_previous.pt").exists()
        if not self.cfg.resume:
            if exists:
                raise FileExistsError(f"{path} exists: pass resume=True (--resume) to continue, or use a new out_dir")
            return None
        state = load_checkpoint(self.out, job=JOB)
        check_resume(state["resume_fields"], self.cfg.resume_fields(), path)
        return state

    def _build_model(self, state: dict[str, Any] | None, given: ResEncUNet | None) -> ResEncUNet:
        cfg, ds = self.cfg, self.data.dataset
        if state is not None:
            from s3d.nn.config import ResEncUNetConfig

            model = build_resenc_unet(ResEncUNetConfig.from_json(state["model_config"]))
            model.load_state_dict(state["model"])
        elif given is not None:
            model = given
        else:
            transfer = cfg.strategy or self.schedule.transfer
            source = None if transfer == "none" else cfg.pretrained
            if transfer != "none" and cfg.pretrained is None:
                print(f"schedule {self.schedule.name!r} transfers weights but no --pretrained was given: "
                      "training from scratch")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # fresh weights (scratch, new head/decoder/stem) follow the seed
                model = prepare_model(source, in_channels=ds.num_channels, num_classes=ds.num_classes,
                                      strategy="all" if transfer == "none" else transfer,  # type: ignore[arg-type]
                                      stem=cfg.stem, config=cfg.config)  # type: ignore[arg-type]
        if model.config.in_channels != ds.num_channels or model.config.num_classes != ds.num_classes:
            raise ValueError(f"model has {model.config.in_channels} input channel(s) and "
                             f"{model.config.num_classes} classes; the dataset needs {ds.num_channels} and "
                             f"{ds.num_classes}")
        model.deep_supervision = cfg.deep_supervision
        model.to(self.device).train()
        if cfg.channels_last and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last_3d)
        return model

    def _patch_size(self) -> tuple[int, int, int]:
        from s3d.nn.resenc_unet import check_spatial_size

        ps = self.cfg.patch_size or self.data.spec.patch_size
        if ps is None:
            ps = auto_patch_size([c.seg.shape for c in self.train_cases], self.model.config.total_stride)
        problem = check_spatial_size(tuple(ps), self.model.config.total_stride)
        if problem:
            raise ValueError(f"patch_size {tuple(ps)}: {problem}")
        return tuple(int(p) for p in ps)  # type: ignore[return-value]

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._enter_phase(int(state["optimizer_phase"]), optimizer_state=state["optimizer"])
        self.gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.scaler.load_state_dict(state["scaler"])
        self.metrics.truncate(self.step)

    # -- optimiser and phases ----------------------------------------------------------------------
    def _trainable(self, phase: Phase) -> list[nn.Parameter]:
        if phase.trains == "all":
            params = list(self.model.parameters())
        else:
            params = decoder_parameters(self.model)
            if phase.name == "warmup_decoder" and self.cfg.train_stem_in_decoder_warmup:
                params += list(self.model.encoder.stem.parameters())
        ids = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
            if id(p) not in ids:
                p.grad = None
        return params

    def _enter_phase(self, index: int, optimizer_state: dict[str, Any] | None = None) -> None:
        """Switch to phase ``index``; a new SGD when the trainable set changes, else keep momentum."""
        new, old = self.phases[index], (self.phases[self.phase_index] if self.phase_index >= 0 else None)
        params = self._trainable(new)
        opt = self.optimizer
        current = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else set()
        same = old is not None and current == {id(p) for p in params}
        if self.optimizer is None or not same or optimizer_state is not None:
            self.optimizer = sgd(params, lr_at(self.phases, new.start, self.cfg.poly_exponent),
                                 momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
        self.phase_index = index

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """``out_dir/checkpoint_latest.pt``."""
        return checkpoint_path(self.out)

    def save_checkpoint(self) -> None:
        """Write model, optimiser (and its phase), step, RNG and scaler state atomically."""
        assert self.optimizer is not None
        save_checkpoint(self.out, {
            "step": self.step,
            "optimizer_phase": self.phase_index,
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_json(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.gen.get_state(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "resume_fields": self.cfg.resume_fields(),
        }, job=JOB)

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases (tiled prediction in preprocessed space)."""
        self.model.eval()
        try:
            mean, per_label = validation_dice(
                lambda data: predict_tiled(self.model, data, self.patch_size, self.device, self.amp_dtype),
                self.val_cases, self.labels)
        finally:
            self.model.train()
        rec = {"step": self.step, "val_dice": mean, "val_dice_per_label": per_label, "val_mode": "tiles"}
        self.val_history.append(rec)
        self.metrics.append(rec)
        return rec

    def final_validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases as ``s3d predict`` predicts them (sliding windows).

        Gaussian-weighted tiles overlapping by half a patch (:func:`s3d.infer.sliding_window_predict`'s
        defaults), in preprocessed space, under the run's autocast dtype, from the full-resolution
        output. Logs ``{"step", "final_dice", "final_dice_per_label", "val_mode": "sliding_window",
        "val_time_s"}`` (``val_time_s``: seconds this validation took) and keeps it in ``self.final_val``.

        Example:
            >>> trainer.final_validate()["final_dice"]
            0.91
        """
        self.model.eval()
        t0 = time.perf_counter()
        cases = progress(self.val_cases, desc="final validation", unit="case", enabled=self.cfg.progress,
                         leave=False)
        try:
            mean, per_label = validation_dice(
                lambda data: predict_sliding_window(self.model, data, self.patch_size, self.device, self.amp_dtype),
                cases, self.labels)
        finally:
            self.model.train()
        rec = {"step": self.step, "final_dice": mean, "final_dice_per_label": per_label,
               "val_mode": "sliding_window", "val_time_s": round(time.perf_counter() - t0, 3)}
        self.final_val = rec
        self.metrics.append(rec)
        return rec

    def _logged_final_validation(self) -> dict[str, Any] | None:
        """The final-validation record already in ``metrics.jsonl`` for this step (a finished run resumed)."""
        return next((rec for rec in self.metrics.records()
                     if rec.get("val_mode") == "sliding_window" and rec.get("step") == self.step), None)

    # -- the loop ----------------------------------------------------------------------------------
    def train_step(self) -> StepRecord:
        """One optimiser step at ``self.step`` (phase switch, lr, batch, forward, backward, clip, update)."""
        from s3d.augment import Augment

        cfg = self.cfg
        index = phase_at(self.phases, self.step)
        if index != self.phase_index:
            self._enter_phase(index)
        assert self.optimizer is not None
        lr = lr_at(self.phases, self.step, cfg.poly_exponent)
        set_lr(self.optimizer, lr)
        x, y = sample_patches(self.train_cases, cfg.batch_size, self.patch_size, self.gen,
                              cfg.foreground_fraction)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.augment:
            x, y = Augment()(x, self.gen, labels=y)
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            out = self.model(x)
        loss = self.loss_fn(out, y)
        backward_and_step(loss, self.optimizer, self.scaler, cfg.grad_clip)
        self.step += 1
        return StepRecord(self.step, float(loss.detach()), lr, self.phases[index].name)

    def fit(self) -> ResEncUNet:
        """Run the schedule (from the checkpoint's step when resumed); returns the trained model.

        The lr is a function of the step, so a resumed run continues exactly where the checkpoint left off.
        """
        cfg = self.cfg
        bar = progress(desc="finetune", unit="step", total=cfg.steps, initial=self.step, enabled=cfg.progress)
        t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                self.history.append(rec)
                self.metrics.append({"step": rec.step, "loss": rec.loss, "lr": rec.lr, "phase": rec.phase,
                                     "time_s": round(time.perf_counter() - t0, 3)})
                bar.update(1)
                bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", phase=rec.phase)
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    v = self.validate()
                    bar.write(f"step {self.step}: validation Dice {v['val_dice']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, rec)
        finally:
            bar.close()
        self.export(self.out / "model")
        if cfg.final_validation and self.val_cases:
            self.final_val = self._logged_final_validation()  # a finished run resumed: not twice
            if self.final_val is None:
                v = self.final_validate()
                print(f"step {self.step}: final validation Dice (sliding window) {v['final_dice']:.4f}")
        return self.model

    def export(self, directory: str | os.PathLike[str]) -> Path:
        """Save the model (without deep supervision) with ``save_pretrained`` plus ``preprocessing.json``."""
        from s3d.hub import save_pretrained

        plain = build_resenc_unet(dataclasses.replace(self.model.config, deep_supervision=False))
        plain.load_state_dict(self.model.state_dict())
        run = {k: v for k, v in self.cfg.to_dict().items() if k not in ("dataset", "out_dir", "resume")}
        recipe = {"finetune": run, "steps_done": self.step, "schedule": dataclasses.asdict(self.schedule)}
        out = save_pretrained(plain, directory, recipe=recipe)
        self.spec.save(Path(out) / "preprocessing.json")
        return Path(out)


def run(config: FinetuneConfig | str | os.PathLike[str] | None = None, out_dir: str | os.PathLike[str] | None = None,
        /, *, model: ResEncUNet | None = None, **fields: Any) -> ResEncUNet:
    """Fine-tune on an nnU-Net v2 raw dataset: ``run(cfg)`` or ``run(dataset, out_dir, **fields)``.

    Args:
        config: a :class:`FinetuneConfig`, or the dataset folder (then ``out_dir`` and ``fields`` are
            the other :class:`FinetuneConfig` fields; with a config, ``fields`` override its fields).
        out_dir: the run folder (with a dataset folder as ``config``).
        model: start from this network instead of :func:`~s3d.finetune.prepare_model`.

    Returns:
        The trained model; ``out_dir/model`` holds it for ``s3d predict -m``.

    Example:
        >>> net = s3d.finetune.run("Dataset001_Brain", "runs/brain", pretrained="s3d-b", schedule="best",
        ...                        steps=37_500, warmup_steps=12_500)
    """
    if isinstance(config, FinetuneConfig):
        cfg = dataclasses.replace(config, **fields)
    else:
        if config is None or out_dir is None:
            raise TypeError("run: give a FinetuneConfig, or the dataset folder and the run folder")
        cfg = FinetuneConfig(dataset=str(config), out_dir=str(out_dir), **fields)
    return Trainer(cfg, model=model).fit()
