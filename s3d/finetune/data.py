"""The data of a fine-tuning run: the validated, preprocessed (cached) dataset and its seeded split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3d._fs import write_json_atomic
from s3d.finetune.config import FinetuneConfig, make_split
from s3d.finetune.patches import CachedCase


@dataclass
class FinetuneData:
    """What a fine-tuning run trains and validates on.

    Attributes:
        dataset: the validated :class:`~s3d.data.nnunet.NnUNetDataset`.
        spec: the :class:`~s3d.data.nnunet.PreprocessingSpec` (spacing, normalisation; no patch size yet).
        split: ``{"seed", "val_fraction", "n_train", "train": [...], "val": [...]}`` (``split.json``).
        train_cases / val_cases: the preprocessed cases (memory-mapped from the cache).
        labels: the foreground label values, sorted.
    """

    dataset: Any
    spec: Any
    split: dict[str, Any]
    train_cases: list[CachedCase]
    val_cases: list[CachedCase]
    labels: list[int]


def _split(cfg: FinetuneConfig, out: Path, cases: Sequence[str], root: Path, write: bool = True) -> dict[str, Any]:
    """The run's split: ``out/split.json`` when it exists (checked against the dataset and the
    settings), else a new seeded split written there (when ``write``)."""
    path = out / "split.json"
    if not path.exists():
        split = make_split(cases, cfg.val_fraction, cfg.seed, cfg.n_train)
        if write:
            write_json_atomic(path, split)
        return split
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
        names = list(split["train"]) + list(split["val"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a split of s3d finetune ({type(e).__name__}: {e}); remove it to make a new "
                         "split") from None
    missing = sorted({str(n) for n in names} - set(cases))
    if missing:
        raise ValueError(f"{path}: case(s) {missing[:5]} are not in {root}; remove the file to make a new split")
    want = {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "n_train": cfg.n_train}
    have = {k: split.get(k) for k in want}
    if have != want:
        raise ValueError(f"{path}: made with {have}, this run asks for {want}; use a new run folder (-o/--out), or "
                         "--overwrite to replace the earlier run")
    return split


def _auto_patch_problem(ds: Any, cfg: FinetuneConfig, total_stride: Sequence[int]) -> str:
    """The automatic patch size from the headers' resampled shapes, if it would leave a 1-voxel bottleneck."""
    from s3d.data.preprocess import shape_for_spacing
    from s3d.finetune.config import auto_patch_size
    from s3d.nn.resenc_unet import check_spatial_size

    shapes = [shape_for_spacing(ds.shapes[c], ds.spacings_mm[c], cfg.target_spacing_mm) for c in ds.cases]
    ps = auto_patch_size(shapes, total_stride)
    problem = check_spatial_size(ps, total_stride)
    if not problem:
        return ""
    return (f"{ds.root}: the cases' median shape at {cfg.target_spacing_mm} mm gives the automatic patch size "
            f"{ps} ({problem}); pass --patch-size with at least two bottleneck voxels or use a finer --spacing")


def load_finetune_data(cfg: FinetuneConfig, out: Path, total_stride: Sequence[int] | None = None,
                       write: bool = True) -> FinetuneData:
    """Validate and preprocess ``cfg.dataset`` (cached), then load the split's cases.

    Args:
        cfg: the run's settings (dataset, spacing, split, ``cache_dir``).
        out: the run folder (``split.json``).
        total_stride: the network's total stride (D, H, W): every case resampled to
            ``cfg.target_spacing_mm`` must have at least this many voxels per axis (checked from the
            headers, before any voxel is read) and, without ``cfg.patch_size``, the automatic patch size
            must leave more than one bottleneck voxel.
        write: write ``split.json`` when missing (``False`` on DDP ranks other than 0, which read it).

    Raises:
        s3d.data.nnunet.DatasetError: every problem of the dataset, each with its file.
        ValueError: a ``split.json`` that does not fit the dataset or the settings.
        OSError: the cache cannot be written (names ``--cache-dir``).

    Example:
        >>> data = load_finetune_data(FinetuneConfig("Dataset001", "runs/a"), Path("runs/a"))
        >>> len(data.train_cases), data.labels
        (8, [1, 2])
    """
    from s3d.data.nnunet import (
        DatasetError,
        PreprocessingSpec,
        cached_cases,
        load_cached_case,
        preprocess_dataset,
        read_dataset_json,
        validate_dataset,
    )

    raw = read_dataset_json(cfg.dataset)
    if cfg.use_mask_for_norm == "auto":  # nnU-Net's rule reads every image: validate them all first
        ds = validate_dataset(cfg.dataset, target_spacing_mm=cfg.target_spacing_mm, min_shape=total_stride)
        spec = PreprocessingSpec.from_dataset(ds, target_spacing_mm=cfg.target_spacing_mm, use_mask_for_norm="auto")
    else:
        spec = PreprocessingSpec.from_dataset(raw, target_spacing_mm=cfg.target_spacing_mm,
                                              use_mask_for_norm=cfg.use_mask_for_norm)
        # voxels of cases already in the cache (unchanged since) were checked when they were preprocessed
        ds = validate_dataset(cfg.dataset, skip_voxels_for=cached_cases(raw, spec, cfg.cache_dir),
                              target_spacing_mm=cfg.target_spacing_mm, min_shape=total_stride)
    if total_stride is not None and cfg.patch_size is None:
        problem = _auto_patch_problem(ds, cfg, total_stride)
        if problem:
            raise DatasetError(ds.root, [problem])
    cache = preprocess_dataset(ds, spec, progress=cfg.progress, cache_dir=cfg.cache_dir)
    split = _split(cfg, out, ds.cases, ds.root, write)

    def load(names: Sequence[str]) -> list[CachedCase]:
        out_cases = []
        for n in names:
            data, seg, _props, locs = load_cached_case(cache, n)
            out_cases.append(CachedCase(n, data, seg, locs))
        return out_cases

    val_names = split["val"][: cfg.num_val_cases] if cfg.num_val_cases else split["val"]
    return FinetuneData(dataset=ds, spec=spec, split=split, train_cases=load(split["train"]),
                        val_cases=load(val_names), labels=sorted(v for v in ds.labels.values() if v != 0))
