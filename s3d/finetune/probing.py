"""The frozen-encoder probe: what a set of weights buys a light head with few labels, against random weights.

:func:`probe` fine-tunes with the encoder frozen (schedule ``frozen_encoder``: only the decoder trains,
from a fresh initialisation; the stem is part of the frozen encoder) on ``n_train`` labelled cases for
a fixed small budget, and scores the held-out cases of the split. It does so twice per seed: once on
the encoder of the weights, once on a random encoder of the same architecture. The two networks of a
seed are built identically (same config, same seeded initialisation), so they differ in the encoder's
weights and nothing else: same fresh decoder, same cases, same patches, same augmentation. Everything
else is fine-tuning (:class:`~s3d.finetune.Trainer`): the same dataset checks, preprocessing, split,
loss, lr schedule and tiled validation.

A MAE loss falls whatever the encoder learns; the probe says whether the features help a segmentation
task. ``s3d probe`` is the command; ``s3d pretrain --probe`` runs it on the current encoder during
pre-training.

Example:
    >>> result = probe("s3d-demo", "Dataset900_DemoTissue", "runs/probe", n_train=5, seeds=(0, 1, 2),
    ...                steps=150, target_spacing_mm=(3.5, 3.5, 3.5), patch_size=(32, 32, 32))
    >>> result.mean("weights"), result.mean("random")     # validation Dice (mean over seeds)
    (0.447, 0.356)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from s3d._fs import write_json_atomic

#: The schedule a probe trains with: the encoder (stem included) frozen, the decoder trains, PolyLR.
PROBE_SCHEDULE = "frozen_encoder"
#: The arms of a probe: the encoder of the weights, and a random encoder of the same architecture.
INITS = ("weights", "random")
_RESULT = "probe_run.json"


@dataclass
class ProbeRun:
    """One probe run: one arm, one seed.

    Attributes:
        init: ``"weights"`` (the encoder of the probed weights) or ``"random"`` (a random encoder).
        seed: seeds the split, the fresh decoder (and the random encoder), patches and augmentation.
        dice: mean foreground Dice over the validation cases, predicted as ``s3d predict`` does
            (Gaussian-weighted sliding windows overlapping by half a patch, in preprocessed space).
        dice_per_label: label value -> mean Dice over the validation cases (sliding windows).
        dice_tiled: the same from the trainer's cheap non-overlapping tiles (its periodic validation); it
            favours encoders that tolerate zero-padded tiles, which MAE pre-training (masked cells are
            zeros) teaches, so it is kept for reference only.
        train_cases: the labelled cases the decoder trained on.
        val_cases: the held-out cases scored.
        steps: optimiser steps.
        seconds: wall time of the run (training and validation), s.
        run_dir: the fine-tuning run folder (``finetune_config.json``, ``split.json``, ``metrics.jsonl``).
    """

    init: str
    seed: int
    dice: float
    dice_per_label: dict[str, float]
    dice_tiled: float
    train_cases: list[str]
    val_cases: list[str]
    steps: int
    seconds: float
    run_dir: str


@dataclass
class ProbeResult:
    """What :func:`probe` measured; ``OUT/probe.json`` holds :meth:`to_dict`.

    Attributes:
        weights: what was probed (a registry name, a path, or ``"nn.Module"``).
        architecture: the network preset name (``config.name``).
        dataset: the nnU-Net raw dataset folder.
        settings: the fine-tuning settings every run shared (schedule, steps, lr, batch, patch, spacing).
        runs: every run, weights and random arm, every seed.
    """

    weights: str
    architecture: str
    dataset: str
    settings: dict[str, Any]
    runs: list[ProbeRun] = field(default_factory=list)

    def dice(self, init: str) -> list[float]:
        """Validation Dice of arm ``init`` per seed, in seed order."""
        return [r.dice for r in sorted(self.runs, key=lambda r: r.seed) if r.init == init]

    def mean(self, init: str) -> float:
        """Mean validation Dice of arm ``init`` over seeds (NaN without runs)."""
        d = [x for x in self.dice(init) if math.isfinite(x)]
        return statistics.fmean(d) if d else float("nan")

    def deltas(self) -> list[float]:
        """Per-seed Dice of the weights minus that of the random encoder (paired by seed)."""
        a = {r.seed: r.dice for r in self.runs if r.init == "weights"}
        b = {r.seed: r.dice for r in self.runs if r.init == "random"}
        return [a[s] - b[s] for s in sorted(set(a) & set(b))]

    def summary(self) -> str:
        """One line: the Dice of each arm (mean and per seed) and the verdict over seeds.

        Example:
            >>> result.summary()
            'probe of s3d-demo: validation Dice 0.447 [0.444, 0.447, 0.451] vs random weights 0.356 [...] ...'
        """
        seeds = sorted({r.seed for r in self.runs})

        def arm(init: str) -> str:
            return f"{self.mean(init):.3f} [{', '.join(f'{v:.3f}' for v in self.dice(init))}]"

        text = f"probe of {self.weights}: validation Dice {arm('weights')}"
        d = self.deltas()
        if not d:
            return text + f" (seeds {seeds})"
        verdict = ("above random on every seed" if min(d) > 0 else "below random on every seed" if max(d) < 0
                   else "not consistently above random")
        return (text + f" vs random weights {arm('random')}; delta {statistics.fmean(d):+.3f} "
                f"[{min(d):+.3f}, {max(d):+.3f}]: {verdict} (seeds {seeds})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (with the per-arm means and the per-seed deltas)."""
        d = asdict(self)
        d["mean"] = {init: self.mean(init) for init in INITS if self.dice(init)}
        d["deltas"] = self.deltas()
        return d


def _load_source(weights: Any) -> tuple[Any, str]:
    """(the weights as a ResEncUNet, a description); a module passes through."""
    from s3d.nn.resenc_unet import ResEncUNet

    if isinstance(weights, ResEncUNet):
        return weights, "nn.Module"
    if isinstance(weights, torch.nn.Module):
        raise TypeError(f"weights: expected a ResEncUNet, a registry name or a path, got {type(weights).__name__}")
    from s3d.hub import load_pretrained

    return load_pretrained(weights), str(weights)


def probe_model(source: Any, init: str, seed: int, in_channels: int, num_classes: int,
                stem: str = "replicate") -> Any:
    """The network of one probe run: a fresh decoder on the encoder of ``source`` or on a random encoder.

    Both arms are built by the same seeded call, so with the same ``seed`` they differ only in the
    encoder's weights (``"random"`` keeps the initialisation the ``"weights"`` arm overwrites).

    Args:
        source: the probed :class:`~s3d.nn.ResEncUNet` (its config fixes the architecture).
        init: ``"weights"`` or ``"random"``.
        seed: seeds the fresh weights.
        in_channels: image channels of the dataset (a 1-channel stem is replicated, :func:`prepare_model`).
        num_classes: output classes (background included).
        stem: ``"replicate"`` or ``"random"`` for a stem of other channels.

    Example:
        >>> a = probe_model(net, "weights", 0, 1, 4); b = probe_model(net, "random", 0, 1, 4)
        >>> torch.equal(a.decoder.stages[0].convs[0].conv.weight, b.decoder.stages[0].convs[0].conv.weight)
        True
    """
    from s3d.finetune.transfer import prepare_model
    from s3d.nn.resenc_unet import build_resenc_unet

    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init == "weights":
            return prepare_model(source, in_channels=in_channels, num_classes=num_classes, strategy="encoder",
                                 stem=stem)  # type: ignore[arg-type]
        return build_resenc_unet(source.config, in_channels=in_channels, num_classes=num_classes,
                                 deep_supervision=False).train()


#: FinetuneConfig fields a probe sets itself
_FIXED = ("schedule", "pretrained", "dataset", "out_dir", "resume", "final_validation", "val_every",
          "checkpoint_every")


def check_probe_options(dataset: str | os.PathLike[str], options: dict[str, Any]) -> None:
    """Check a probe's dataset and keyword arguments before anything runs (``s3d pretrain --probe``).

    Raises:
        s3d.data.nnunet.DatasetError: no readable dataset.json in ``dataset``.
        ValueError: a key of ``options`` that :func:`probe` does not take (the message lists the known ones).

    Example:
        >>> check_probe_options("Dataset900_DemoTissue", {"n_train": 5, "stepz": 100})
        Traceback (most recent call last):
        ValueError: probe options ['stepz']: unknown; known: ...
    """
    from s3d.data.nnunet import read_dataset_json
    from s3d.finetune.config import FinetuneConfig

    read_dataset_json(dataset)
    known = sorted(set(_OWN_OPTIONS) | ({f.name for f in dataclasses.fields(FinetuneConfig)} - set(_FIXED)))
    bad = sorted(set(options) - set(known))
    if bad:
        raise ValueError(f"probe options {bad}: unknown; known: {', '.join(known)}")


def _check(dataset: Any, seeds: Sequence[int], steps: int, n_train: int, val_fraction: float) -> Any:
    """The dataset (read) after checking the arguments; every problem before any folder is made."""
    from s3d.data.nnunet import read_dataset_json

    if not seeds:
        raise ValueError("seeds (--seeds): name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds (--seeds): {list(seeds)} repeats a seed")
    if steps < 1:
        raise ValueError(f"steps (--steps): must be >= 1, got {steps}")
    if n_train < 1:
        raise ValueError(f"n_train (--n-train): must be >= 1, got {n_train}")
    raw = read_dataset_json(dataset)
    n = len(raw.cases)
    n_val = min(n - 1, max(1, round(n * val_fraction)))  # as make_split holds out
    if n >= 2 and n - n_val < n_train:
        raise ValueError(f"n_train={n_train} (--n-train): {dataset} has {n} training case(s), {n_val} held out for "
                         f"validation, so at most {max(0, n - n_val)} can train")
    return raw


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) of a module's state dict, names and bytes: a run's starting weights, to recognise it again.

    Example:
        >>> fingerprint(build_resenc_unet("tiny")) == fingerprint(build_resenc_unet("tiny"))  # doctest: +SKIP
    """
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: FinetuneConfig fields that do not change what a probe run measures
_NOT_MEASURED = ("out_dir", "resume", "progress", "device", "cache_dir", "loader_threads", "val_tile_batch")


def _run_one(cfg: Any, model: Any, init: str, keep_models: bool) -> ProbeRun:
    """Train one arm (or read what an earlier call measured with the same settings and starting weights),
    then remove the run's checkpoints and exported model unless ``keep_models``."""
    from s3d.finetune.trainer import Trainer
    from s3d.runtime.distributed import DistInfo

    run_dir = Path(cfg.out_dir)
    key = {"config": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_MEASURED},
           "weights_sha256": fingerprint(model)}
    done = run_dir / _RESULT
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("key") == key:
            return ProbeRun(**saved["run"])
    ckpt = (run_dir / "checkpoint_latest.pt").is_file() or (run_dir / "checkpoint_previous.pt").is_file()
    if run_dir.exists() and (done.is_file() or not ckpt):  # other settings, or stopped before a checkpoint
        shutil.rmtree(run_dir)
        ckpt = False
    t0 = time.perf_counter()
    trainer = Trainer(dataclasses.replace(cfg, resume=ckpt), model=model, dist=DistInfo())  # alone, also under torchrun
    trainer.fit()
    final = trainer.final_val or trainer.final_validate()
    tiled = trainer.val_history[-1]["val_dice"] if trainer.val_history else float("nan")
    run = ProbeRun(init=init, seed=cfg.seed, dice=float(final["final_dice"]),
                   dice_per_label=final["final_dice_per_label"], dice_tiled=float(tiled),
                   train_cases=list(trainer.data.split["train"]), val_cases=[c.name for c in trainer.val_cases],
                   steps=trainer.step, seconds=round(time.perf_counter() - t0, 2), run_dir=str(run_dir))
    if not keep_models:  # a probe needs the numbers, not the (possibly large) weights: remove what it wrote
        for name in ("checkpoint_latest.pt", "checkpoint_previous.pt"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
    write_json_atomic(done, {"key": key, "run": asdict(run)})
    return run


def probe(
    weights: Any,
    dataset: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    n_train: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 150,
    peak_lr: float = 1e-2,
    batch_size: int = 2,
    patch_size: tuple[int, int, int] | None = None,
    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    random: bool = True,
    stem: str = "replicate",
    keep_models: bool = False,
    device: str = "auto",
    progress: bool = True,
    name: str | None = None,
    **fields: Any,
) -> ProbeResult:
    """Probe ``weights``: train a fresh decoder on their frozen encoder, and on a random one, and score both.

    For every seed and arm, one fine-tuning run (:class:`~s3d.finetune.Trainer`, schedule
    :data:`PROBE_SCHEDULE`: only the decoder trains, PolyLR from ``peak_lr``) on the first ``n_train``
    cases of the seed's split of ``dataset``, then the validation of the split's held-out cases as ``s3d
    predict`` predicts them (sliding windows; the trainer's tiled validation is kept as ``dice_tiled``).
    Resumable: a run already measured with the same settings (``RUN/probe_run.json``) is read, not
    repeated. Writes ``OUT/probe.json`` (:meth:`ProbeResult.to_dict`) atomically.

    Args:
        weights: a registry name (``"s3d-demo"``, ``"s3d-b"``), a Hub repo, a model folder or checkpoint
            (:func:`s3d.load_pretrained`), or a :class:`~s3d.nn.ResEncUNet`.
        dataset: nnU-Net v2 raw dataset folder (holding dataset.json).
        out_dir: the probe's folder: ``weights_seed{S}/`` and ``random_seed{S}/`` run folders, ``probe.json``.
        n_train: labelled training cases (the first N of each seed's split).
        seeds: one run per arm and seed; a seed picks the cases, the fresh weights, patches and augmentation.
        steps: optimiser steps of every run (the budget).
        peak_lr: peak learning rate (PolyLR from it).
        batch_size: patches per step.
        patch_size: (D, H, W) voxels; ``None``: fine-tuning's automatic patch size.
        target_spacing_mm: resampling target (mm), as for fine-tuning.
        random: also probe a random encoder of the same architecture (the reference).
        stem: ``"replicate"`` or ``"random"`` stem when the dataset has more channels than the weights.
        keep_models: keep each run's checkpoint and exported model (default: removed after scoring).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        progress: progress bars and a line per run.
        name: what to call the weights in the result (default: ``weights`` when it is a name or path).
        **fields: other :class:`~s3d.finetune.FinetuneConfig` fields (``val_fraction``, ``num_val_cases``,
            ``use_mask_for_norm``, ``amp``, ``cache_dir``, ``loader_threads``, ...).

    Returns:
        A :class:`ProbeResult` (``result.summary()`` is one line).

    Raises:
        s3d.data.nnunet.DatasetError: the dataset has problems (each names its file).
        ValueError: bad arguments (the message names them), or more ``n_train`` than the split has.

    Example:
        >>> r = probe("s3d-demo", "Dataset900_DemoTissue", "runs/probe", target_spacing_mm=(3.5, 3.5, 3.5))
        >>> print(r.summary())  # doctest: +SKIP
    """
    from s3d.finetune.config import FinetuneConfig

    raw = _check(dataset, seeds, steps, n_train, float(fields.get("val_fraction", 0.2)))
    for key in _FIXED:
        if key in fields:
            raise ValueError(f"probe: {key!r} is fixed by the probe and cannot be passed")
    source, what = _load_source(weights)
    what = name or what
    out = Path(out_dir)
    settings = {"schedule": PROBE_SCHEDULE, "steps": steps, "peak_lr": peak_lr, "batch_size": batch_size,
                "patch_size": list(patch_size) if patch_size else None,
                "target_spacing_mm": list(target_spacing_mm), "n_train": n_train, "seeds": list(seeds), **fields}
    result = ProbeResult(weights=what, architecture=source.config.name, dataset=str(dataset), settings=settings)
    for seed in seeds:
        for init in INITS if random else INITS[:1]:
            cfg = FinetuneConfig(dataset=str(dataset), out_dir=str(out / f"{init}_seed{seed}"), schedule=PROBE_SCHEDULE,
                                 steps=steps, peak_lr=peak_lr, batch_size=batch_size, patch_size=patch_size,
                                 target_spacing_mm=target_spacing_mm, n_train=n_train, val_every=steps,
                                 checkpoint_every=steps, final_validation=True, seed=seed, device=device,
                                 progress=progress, **fields)
            model = probe_model(source, init, seed, raw.num_channels, raw.num_classes, stem)
            run = _run_one(cfg, model, init, keep_models)
            result.runs.append(run)
            if progress:
                print(f"probe {init} seed {seed}: validation Dice {run.dice:.4f} ({run.seconds:.0f} s)")
    write_json_atomic(out / "probe.json", result.to_dict())
    return result


#: the keyword arguments of :func:`probe` itself (the others go to :class:`~s3d.finetune.FinetuneConfig`)
_OWN_OPTIONS = tuple(p for p in inspect.signature(probe).parameters if p not in ("weights", "dataset", "out_dir",
                                                                                 "fields"))

__all__ = ["INITS", "PROBE_SCHEDULE", "ProbeResult", "ProbeRun", "check_probe_options", "fingerprint", "probe",
           "probe_model"]
