"""Fine-tuning a (pretrained) ResEnc U-Net on an nnU-Net dataset: weight transfer, the run's config, the loop.

Order of this file: weight transfer (:func:`prepare_model`), :class:`FinetuneConfig`, then the
:class:`Trainer` and :func:`finetune`. The pieces live by concept next to it:

- :mod:`s3d.train.schedules`: the schedule presets of the paper's Table 2 (:data:`SCHEDULES`) and
  the learning rate at each step;
- :mod:`s3d.train.losses`: :class:`DiceCELoss` (with deep supervision);
- :mod:`s3d.train.patches`: patch sampling (:func:`sample_patches`) and augmentation
  (:func:`augment_batch`);
- :mod:`s3d.train.validation`: the validation Dice (cheap tiles during training, sliding windows at
  the end).

Every public name of those modules is importable from here too.

"Decoder only" means the encoder (stem included) gets no update at all: its parameters are not in
the optimiser *and* have ``requires_grad=False``, so neither gradients, momentum nor weight decay
can move them. (The reference implementation optimises ``decoder.parameters()``, which there
includes the encoder because DNA's decoder holds a reference to it.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._fs import atomic_path, write_json_atomic, write_text_atomic
from s3d.nn.resenc_unet import ResEncUNet, build_resenc_unet
from s3d.train.losses import DiceCELoss
from s3d.train.patches import AugmentConfig, augment_batch, sample_patches
from s3d.train.patches import CachedCase as CachedCase
from s3d.train.schedules import (
    PAPER_STEPS,
    PAPER_WARMUP_STEPS,
    SCHEDULES,
    TABLE8_STEPS,
    Phase,
    Schedule,
    get_schedule,
    lr_at,
    phase_at,
)
from s3d.train.schedules import Trains as Trains
from s3d.train.validation import dice_per_label as dice_per_label
from s3d.train.validation import predict_sliding_window as predict_sliding_window
from s3d.train.validation import predict_tiled as predict_tiled
from s3d.train.validation import validation_dice

Strategy = Literal["all", "encoder"]


# ---- transfer ------------------------------------------------------------------------------------
def prepare_model(
    source: nn.Module | str | os.PathLike[str] | None,
    *,
    in_channels: int,
    num_classes: int,
    strategy: Strategy = "all",
    stem: Literal["replicate", "random"] = "replicate",
    config: str | Any = "resenc_l",
    deep_supervision: bool = False,
    **load_kwargs: Any,
) -> ResEncUNet:
    """A network for fine-tuning with ``in_channels`` inputs and ``num_classes`` outputs.

    Args:
        source: a pretrained :class:`~s3d.nn.ResEncUNet`; a registry name, Hub repo, model
            directory or checkpoint path for :func:`s3d.hub.load_pretrained`; or ``None`` to train
            from scratch (``build_resenc_unet(config)``, He init).
        in_channels: image channels of the downstream data. When the source has fewer (1 at
            pre-training), the stem is adapted as ``stem`` says.
        num_classes: output classes; a new segmentation head when it differs from the source.
        strategy: ``"all"`` transfers encoder and decoder; ``"encoder"`` keeps a random decoder.
        stem: ``"replicate"`` (Table 6's best: pretrained stem replicated over channels) or
            ``"random"`` (fresh stem).
        config: architecture preset for ``source=None``.
        deep_supervision: return logits at every decoder resolution (training).
        **load_kwargs: passed to :func:`s3d.hub.load_pretrained` (``revision``, ``strict``, ...).

    Returns:
        The model (train mode, CPU); ``model.transfer_report`` holds the hub's ``LoadReport`` (or
        ``None`` from scratch).

    Example:
        >>> net = prepare_model("s3d-b", in_channels=2, num_classes=3, strategy="all")
        >>> net.transfer_report.stem
        'replicated'
    """
    if strategy not in ("all", "encoder"):
        raise ValueError(f"strategy: expected 'all' or 'encoder', got {strategy!r}")
    if stem not in ("replicate", "random"):
        raise ValueError(f"stem: expected 'replicate' or 'random', got {stem!r}")
    report = None
    if source is None:
        model = build_resenc_unet(config, in_channels=in_channels, num_classes=num_classes)
    elif isinstance(source, nn.Module):
        from s3d.hub.adapt import LoadReport, adapt_state_dict

        if not isinstance(source, ResEncUNet):
            raise TypeError(f"source: expected a ResEncUNet, got {type(source).__name__}")
        model = build_resenc_unet(source.config, in_channels=in_channels, num_classes=num_classes,
                                  deep_supervision=False)
        state, report = adapt_state_dict(source.state_dict(), model.state_dict(), stem=stem,
                                         decoder=strategy == "all", report=LoadReport(source="nn.Module"))
        model.load_state_dict(state, strict=True)
    else:
        from s3d.hub import load_pretrained

        model, report = load_pretrained(source, in_channels=in_channels, num_classes=num_classes, stem=stem,
                                        decoder=strategy == "all", output_loading_info=True, **load_kwargs)
    model.deep_supervision = deep_supervision
    model.transfer_report = report  # type: ignore[attr-defined]
    return model.train()


def encoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the encoder, stem included (everything a decoder-only phase must not move)."""
    return list(model.encoder.parameters())


def decoder_parameters(model: ResEncUNet) -> list[nn.Parameter]:
    """Parameters of the decoder (transposed convs, decoder stages, segmentation heads), not the encoder."""
    enc = {id(p) for p in model.encoder.parameters()}
    return [p for p in model.decoder.parameters() if id(p) not in enc]


# ---- configuration and the loop ------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; saved to ``out_dir/finetune_config.json``.

    Attributes:
        dataset: nnU-Net v2 raw dataset folder (with dataset.json).
        out_dir: run folder (split, metrics, checkpoints, final model).
        pretrained: registry name / Hub repo / path for :func:`s3d.hub.load_pretrained`; ``None`` = scratch.
        schedule: a :data:`SCHEDULES` name.
        steps: total optimiser steps, warm-ups included (paper: 250k).
        warmup_steps: steps of each warm-up; ``None`` = 5 % of ``steps``.
        peak_lr: override the schedule's peak lr.
        strategy: ``"all"`` / ``"encoder"``; ``None`` = the schedule's transfer.
        stem: ``"replicate"`` or ``"random"`` for multi-channel data.
        train_stem_in_decoder_warmup: also train the stem during warm-up 1 (Table 6 "unfrozen").
        config: architecture preset when training from scratch.
        batch_size: patches per step.
        patch_size: (D, H, W) voxels; ``None`` = median case shape rounded up to the network
            stride, capped at 160.
        target_spacing_mm: resampling target (mm).
        deep_supervision: deep-supervision loss.
        foreground_fraction: share of each batch centred on foreground (nnU-Net: 0.33).
        augment: nnU-Net-like augmentation.
        val_fraction: share of cases held out (at least one); the split is saved to ``split.json``.
        n_train: use only the first N training cases of the seeded split (low-data regime).
        val_every, checkpoint_every: steps between validations / checkpoints.
        seed: seeds the split, patch sampling and augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; off on CPU), ``"bf16"``, ``"fp16"``,
            ``"off"``.
        channels_last: channels_last_3d memory format (GPU only; measure it, InstanceNorm may be slower).
        grad_clip: max gradient norm (nnU-Net: 12).
        momentum, weight_decay, poly_exponent: SGD and PolyLR settings (0.99, 3e-5, 0.9).
        num_val_cases: validate on at most this many held-out cases (``None`` = all).
        final_validation: after the last step, validate once more on the same cases with the
            prediction ``s3d predict`` makes (Gaussian-weighted sliding windows overlapping by half a
            patch, :func:`s3d.infer.sliding_window_predict`) and log it as ``final_dice`` with
            ``"val_mode": "sliding_window"``; the periodic validations (``val_dice``,
            ``"val_mode": "tiles"``) use cheap non-overlapping tiles. On cases much larger than the
            patch, overlap 0.5 means up to 2^3 = 8 times the forward passes of a tiled validation.
        progress: show a tqdm bar.
    """

    dataset: str
    out_dir: str
    pretrained: str | None = None
    schedule: str = "best"
    steps: int = PAPER_STEPS
    warmup_steps: int | None = None
    peak_lr: float | None = None
    strategy: str | None = None
    stem: str = "replicate"
    train_stem_in_decoder_warmup: bool = False
    config: str = "resenc_l"
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = None
    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    deep_supervision: bool = True
    foreground_fraction: float = 0.33
    augment: bool = True
    val_fraction: float = 0.2
    n_train: int | None = None
    val_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    grad_clip: float = 12.0
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    num_val_cases: int | None = None
    final_validation: bool = True
    progress: bool = True

    #: fields that must match when resuming
    RESUME_KEYS = ("schedule", "steps", "warmup_steps", "peak_lr", "batch_size", "seed", "config", "strategy",
                   "stem", "deep_supervision", "n_train", "target_spacing_mm")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.foreground_fraction <= 1 or not 0 < self.val_fraction < 1:
            raise ValueError(f"foreground_fraction must be in [0, 1] and val_fraction in (0, 1), got "
                             f"{self.foreground_fraction} and {self.val_fraction}")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        self.target_spacing_mm = tuple(float(v) for v in self.target_spacing_mm)  # type: ignore[assignment]
        get_schedule(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error naming them and the known ones)."""
        return from_dict_strict(cls, d)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` on ``device`` (``None`` = full fp32; always ``None`` on CPU)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp: expected auto, bf16, fp16 or off, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def make_split(
    cases: Sequence[str], val_fraction: float, seed: int, n_train: int | None = None
) -> dict[str, Any]:
    """Seeded train/val split; ``n_train`` keeps the first N training cases (low-data regime).

    Example:
        >>> make_split([f"c{i}" for i in range(10)], 0.2, seed=0)["val"]
        ['c2', 'c8']
    """
    if len(cases) < 2:
        raise ValueError(f"need at least 2 cases for a train/validation split, got {len(cases)}")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    val, train = sorted(order[:n_val]), order[n_val:]
    if n_train is not None:
        if not 1 <= n_train <= len(train):
            raise ValueError(f"n_train={n_train}: the split has {len(train)} training case(s)")
        train = train[:n_train]
    return {"seed": seed, "val_fraction": val_fraction, "n_train": n_train, "train": sorted(train),
            "val": val}


def auto_patch_size(
    shapes: Sequence[Sequence[int]], total_stride: Sequence[int], cap: int = 160
) -> tuple[int, ...]:
    """Median case shape rounded up to a multiple of the network stride, capped at ``cap`` voxels."""
    med = np.median(np.asarray(shapes), axis=0)
    return tuple(int(min(max(s, math.ceil(m / s) * s), max(s, cap // s * s)))
                 for m, s in zip(med, total_stride, strict=True))


@dataclass
class StepRecord:
    """What one optimiser step logged."""

    step: int
    loss: float
    lr: float
    phase: str


class Trainer:
    """The fine-tuning loop: one object per run folder.

    ``Trainer(cfg).fit()`` validates and preprocesses the dataset (cached), builds or resumes the
    model, then runs the schedule's phases. Files in ``cfg.out_dir``: ``finetune_config.json``,
    ``split.json``, ``metrics.jsonl`` (one JSON object per step and per validation),
    ``checkpoint_latest.pt`` (model, optimiser, step, RNG; atomic), and at the end ``model/``
    (:func:`s3d.hub.save_pretrained` + ``preprocessing.json``).

    Args:
        cfg: the run.
        model: use this network instead of :func:`prepare_model` (ignored on resume).
        on_step: called as ``on_step(trainer, record)`` after every step (e.g. to stop early).

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
        self.phases = self.schedule.plan(cfg.steps, cfg.warmup_steps, cfg.peak_lr)
        self.on_step = on_step
        self._given_model = model
        self.model: ResEncUNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase_index = -1
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.scaler: torch.amp.GradScaler | None = None
        self.history: list[StepRecord] = []
        self.val_history: list[dict[str, Any]] = []
        self.final_val: dict[str, Any] | None = None

    # -- data --------------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        from s3d.data.nnunet import (
            PreprocessingSpec,
            cached_cases,
            load_cached_case,
            preprocess_dataset,
            read_dataset_json,
            validate_dataset,
        )

        cfg = self.cfg
        raw = read_dataset_json(cfg.dataset)
        spec = PreprocessingSpec.from_dataset(raw, target_spacing_mm=cfg.target_spacing_mm)
        # voxels of cases already in the cache (unchanged since) were checked when they were preprocessed
        ds = validate_dataset(cfg.dataset, skip_voxels_for=cached_cases(raw, spec))
        self.dataset = ds
        cache = preprocess_dataset(ds, spec, progress=cfg.progress)
        split_path = self.out / "split.json"
        if split_path.exists():
            split = json.loads(split_path.read_text())
            missing = sorted(set(split["train"] + split["val"]) - set(ds.cases))
            if missing:
                raise ValueError(f"{split_path}: case(s) {missing[:5]} are not in {ds.root}; remove the file "
                                 "to make a new split")
            want = {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "n_train": cfg.n_train}
            have = {k: split.get(k) for k in want}
            if have != want:
                raise ValueError(f"{split_path}: made with {have}, this run asks for {want}; "
                                 "use a new out_dir")
        else:
            split = make_split(ds.cases, cfg.val_fraction, cfg.seed, cfg.n_train)
            write_json_atomic(split_path, split)
        self.split = split

        def load(names: Sequence[str]) -> list[CachedCase]:
            out = []
            for n in names:
                data, seg, props, locs = load_cached_case(cache, n)
                out.append(CachedCase(n, data, seg, locs))
            return out

        self.train_cases = load(split["train"])
        self.val_cases = load(split["val"][: cfg.num_val_cases] if cfg.num_val_cases else split["val"])
        self.spec = spec
        self.labels = sorted(v for v in ds.labels.values() if v != 0)

    # -- model and optimiser -----------------------------------------------------------------------
    def _build_model(self, state: dict[str, Any] | None) -> None:
        cfg, ds = self.cfg, self.dataset
        if state is not None:
            from s3d.nn.config import ResEncUNetConfig

            mcfg = ResEncUNetConfig.from_json(state["model_config"])
            model = build_resenc_unet(mcfg)
            model.load_state_dict(state["model"])
        elif self._given_model is not None:
            model = self._given_model
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
        model.deep_supervision = cfg.deep_supervision
        model.to(self.device).train()
        if cfg.channels_last and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last_3d)
        if model.config.in_channels != ds.num_channels or model.config.num_classes != ds.num_classes:
            raise ValueError(f"model has {model.config.in_channels} input channel(s) and "
                             f"{model.config.num_classes} classes; the dataset needs {ds.num_channels} and "
                             f"{ds.num_classes}")
        self.model = model
        ps = cfg.patch_size or self.spec.patch_size
        if ps is None:
            ps = auto_patch_size([c.seg.shape for c in self.train_cases], model.config.total_stride)
        from s3d.nn.resenc_unet import check_spatial_size

        problem = check_spatial_size(tuple(ps), model.config.total_stride)
        if problem:
            raise ValueError(f"patch_size {tuple(ps)}: {problem}")
        self.patch_size = tuple(int(p) for p in ps)
        self.spec.patch_size = self.patch_size  # type: ignore[assignment]

    def _trainable(self, phase: Phase) -> list[nn.Parameter]:
        assert self.model is not None
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
            self.optimizer = torch.optim.SGD(params, lr=lr_at(self.phases, new.start, self.cfg.poly_exponent),
                                             momentum=self.cfg.momentum, nesterov=True,
                                             weight_decay=self.cfg.weight_decay)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
        self.phase_index = index

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """``out_dir/checkpoint_latest.pt``."""
        return self.out / "checkpoint_latest.pt"

    def save_checkpoint(self) -> None:
        """Write model, optimiser (and its phase), step, RNG and scaler state atomically."""
        assert self.model is not None and self.optimizer is not None
        state = {
            "format": "s3d-finetune-checkpoint/1",
            "step": self.step,
            "optimizer_phase": self.phase_index,
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_json(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "finetune_config": json.dumps(self.cfg.to_dict()),
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> dict[str, Any]:
        path = self.checkpoint_path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["finetune_config"])
        now = self.cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in FinetuneConfig.RESUME_KEYS
                if saved.get(k) != now[k]]
        if diff:
            raise ValueError(f"{path}: cannot resume with different settings ({'; '.join(diff)})")
        return state

    # -- the loop ----------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _read_log(self) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` of every readable line of ``metrics.jsonl`` (a line torn by a kill is skipped)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
        return out

    def _truncate_log(self, step: int) -> None:
        if not (self.out / "metrics.jsonl").exists():
            return
        keep = [line for line, rec in self._read_log() if rec.get("step", 0) <= step]
        write_text_atomic(self.out / "metrics.jsonl", "".join(k + "\n" for k in keep))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def validate(self) -> dict[str, Any]:
        """Mean foreground Dice over the held-out cases (tiled prediction in preprocessed space)."""
        assert self.model is not None
        self.model.eval()
        try:
            mean, per_label = validation_dice(
                lambda data: predict_tiled(self.model, data, self.patch_size, self.device, self._autocast),
                self.val_cases, self.labels)
        finally:
            self.model.train()
        rec = {"step": self.step, "val_dice": mean, "val_dice_per_label": per_label, "val_mode": "tiles"}
        self.val_history.append(rec)
        self._log(rec)
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
        from tqdm.auto import tqdm

        assert self.model is not None
        model, ds_flag = self.model, self.model.deep_supervision
        model.eval()
        model.deep_supervision = False  # only the full-resolution logits are used: skip the others
        t0 = time.perf_counter()
        cases = tqdm(self.val_cases, desc="final validation", unit="case", disable=not self.cfg.progress,
                     leave=False)
        try:
            mean, per_label = validation_dice(
                lambda data: predict_sliding_window(model, data, self.patch_size, self.device, self.amp_dtype),
                cases, self.labels)
        finally:
            model.deep_supervision = ds_flag
            model.train()
        rec = {"step": self.step, "final_dice": mean, "final_dice_per_label": per_label,
               "val_mode": "sliding_window", "val_time_s": round(time.perf_counter() - t0, 3)}
        self.final_val = rec
        self._log(rec)
        return rec

    def _logged_final_validation(self) -> dict[str, Any] | None:
        """The final-validation record already in ``metrics.jsonl`` for this step (a finished run resumed)."""
        return next((rec for _, rec in self._read_log()
                     if rec.get("val_mode") == "sliding_window" and rec.get("step") == self.step), None)

    def train_step(self) -> StepRecord:
        """One optimiser step at ``self.step`` (phase switch, lr, batch, forward, backward, clip, update)."""
        assert self.model is not None
        cfg = self.cfg
        index = phase_at(self.phases, self.step)
        if index != self.phase_index:
            self._enter_phase(index)
        assert self.optimizer is not None
        lr = lr_at(self.phases, self.step, cfg.poly_exponent)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = sample_patches(self.train_cases, cfg.batch_size, self.patch_size, self.gen,
                              cfg.foreground_fraction)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.augment:
            x, y = augment_batch(x, y, self.gen)
        if cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(x)
        loss = self.loss_fn(out, y)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        return StepRecord(self.step, float(loss.detach()), lr, self.phases[index].name)

    def fit(self, resume: bool = False) -> ResEncUNet:
        """Run (or, with ``resume``, continue) the schedule; returns the trained model.

        Resuming restores model, optimiser, step and RNG from ``checkpoint_latest.pt``; the lr is a
        function of the step, so it continues exactly where the checkpoint left off.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint() if resume else None
        if not resume and self.checkpoint_path.exists():
            raise FileExistsError(f"{self.checkpoint_path} exists: pass resume=True (--resume) to continue, "
                                  "or use a new out_dir")
        write_json_atomic(self.out / "finetune_config.json", cfg.to_dict())
        self._prepare_data()
        self._build_model(state)
        self.loss_fn = DiceCELoss()
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        if state is not None:
            self.step = int(state["step"])
            self._enter_phase(int(state["optimizer_phase"]), optimizer_state=state["optimizer"])
            self.gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self._truncate_log(self.step)
        elif (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="finetune", disable=not cfg.progress, unit="step")
        t0 = time.perf_counter()
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                self.history.append(rec)
                self._log({"step": rec.step, "loss": rec.loss, "lr": rec.lr, "phase": rec.phase,
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
        return self.model  # type: ignore[return-value]

    def export(self, directory: str | os.PathLike[str]) -> Path:
        """Save the model (no deep supervision) with ``save_pretrained`` plus ``preprocessing.json``."""
        from s3d.hub import save_pretrained

        assert self.model is not None
        model = self.model
        ds_flag = model.deep_supervision
        model.deep_supervision = False
        try:
            run = {k: v for k, v in self.cfg.to_dict().items() if k not in ("dataset", "out_dir")}
            recipe = {"finetune": run,
                      "steps_done": self.step, "schedule": dataclasses.asdict(self.schedule)}
            out = save_pretrained(model, directory, recipe=recipe)
        finally:
            model.deep_supervision = ds_flag
        self.spec.save(Path(out) / "preprocessing.json")
        return Path(out)


def finetune(dataset: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, resume: bool = False,
             model: ResEncUNet | None = None, **kwargs: Any) -> ResEncUNet:
    """Fine-tune on an nnU-Net v2 raw dataset; keyword arguments are :class:`FinetuneConfig` fields.

    Returns:
        The trained model; ``out_dir/model`` holds it for ``s3d predict -m``.

    Example:
        >>> net = finetune("Dataset001_Brain", "runs/brain", pretrained="s3d-b", schedule="best",
        ...                steps=37_500, warmup_steps=12_500)
    """
    cfg = FinetuneConfig(dataset=str(dataset), out_dir=str(out_dir), **kwargs)
    return Trainer(cfg, model=model).fit(resume=resume)


__all__ = [
    "PAPER_STEPS",
    "PAPER_WARMUP_STEPS",
    "SCHEDULES",
    "TABLE8_STEPS",
    "AugmentConfig",
    "DiceCELoss",
    "FinetuneConfig",
    "Phase",
    "Schedule",
    "Trainer",
    "augment_batch",
    "decoder_parameters",
    "encoder_parameters",
    "finetune",
    "get_schedule",
    "lr_at",
    "make_split",
    "phase_at",
    "prepare_model",
    "sample_patches",
]
