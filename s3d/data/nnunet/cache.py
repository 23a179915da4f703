"""The on-disk cache of preprocessed nnU-Net cases: ``DATASET/.s3d_cache/<spec-hash>/``.

:func:`preprocess_dataset` caches every case as ``.npy`` arrays plus a properties JSON (atomic
writes), so a second run reads the cache instead of redoing the work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import atomic_path, write_json_atomic
from s3d.data.nnunet.dataset import NnUNetDataset
from s3d.data.nnunet.preprocessing import PreprocessingSpec, preprocess_training_case

CACHE_DIR_NAME = ".s3d_cache"
#: Foreground voxel coordinates kept per label in the cache (for foreground oversampling).
MAX_LOCATIONS_PER_LABEL = 10_000


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _foreground_locations(seg: np.ndarray, seed: int = 1234) -> np.ndarray:
    """(N, 4) int32 rows (label, d, h, w): up to MAX_LOCATIONS_PER_LABEL voxels per foreground label."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in np.unique(seg):
        if v == 0:
            continue
        idx = np.argwhere(seg == v)
        if len(idx) > MAX_LOCATIONS_PER_LABEL:
            idx = idx[rng.choice(len(idx), MAX_LOCATIONS_PER_LABEL, replace=False)]
        rows.append(np.concatenate([np.full((len(idx), 1), v), idx], axis=1))
    return (np.concatenate(rows) if rows else np.zeros((0, 4))).astype(np.int32)


def cache_dir_for(root: str | os.PathLike[str], spec: PreprocessingSpec) -> Path:
    """``root/.s3d_cache/<spec hash>``: where :func:`preprocess_dataset` puts its arrays."""
    return Path(root) / CACHE_DIR_NAME / spec.cache_key()


def preprocess_dataset(
    ds: NnUNetDataset, spec: PreprocessingSpec, cases: Sequence[str] | None = None, progress: bool = True
) -> Path:
    """Preprocess every case once into the cache; cases already there are skipped.

    A case is redone when its source files changed (size or modification time).
    Per case: ``{case}_data.npy`` (C, D, H, W) float32, ``{case}_seg.npy`` (D, H, W) int16,
    ``{case}_locs.npy`` (N, 4) foreground locations, then ``{case}.json`` (properties) written
    last, all atomically: a case counts as cached only when its JSON exists.

    Returns:
        The cache folder (:func:`cache_dir_for`).

    Example:
        >>> cache = preprocess_dataset(validate_dataset("Dataset001_Brain"), spec)
        >>> data, seg, props, locs = load_cached_case(cache, "brain_000")
    """
    from tqdm.auto import tqdm

    out = cache_dir_for(ds.root, spec)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    if not spec_path.exists():
        write_json_atomic(spec_path, spec.to_dict())
    todo = [c for c in (ds.cases if cases is None else cases) if not _is_cached(out, ds, c)]
    for case in tqdm(todo, desc="preprocess", disable=not progress or not todo, unit="case"):
        data, seg, props = preprocess_training_case(ds.image_paths(case), ds.label_path(case), spec)
        props["source_stat"] = _source_stat(ds, case)
        _save_npy(out / f"{case}_data.npy", data)
        _save_npy(out / f"{case}_seg.npy", seg)
        _save_npy(out / f"{case}_locs.npy", _foreground_locations(seg))
        write_json_atomic(out / f"{case}.json", props)
    return out


def _source_stat(ds: NnUNetDataset, case: str) -> list[list[int]]:
    stats = [p.stat() for p in [*ds.image_paths(case), ds.label_path(case)]]
    return [[int(st.st_size), int(st.st_mtime_ns)] for st in stats]


def _is_cached(cache: Path, ds: NnUNetDataset, case: str) -> bool:
    jpath = cache / f"{case}.json"
    if not jpath.exists():
        return False
    try:
        return json.loads(jpath.read_text(encoding="utf-8")).get("source_stat") == _source_stat(ds, case)
    except (json.JSONDecodeError, OSError):
        return False


def cached_cases(ds: NnUNetDataset, spec: PreprocessingSpec) -> list[str]:
    """Cases of ``ds`` whose cache entry for ``spec`` exists and matches the current source files."""
    cache = cache_dir_for(ds.root, spec)
    return [c for c in ds.cases if _is_cached(cache, ds, c)] if cache.is_dir() else []


def load_cached_case(
    cache_dir: str | os.PathLike[str], case: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """Read a case written by :func:`preprocess_dataset`: (data, seg, properties, fg locations).

    With ``mmap`` the arrays are memory-mapped (read-only), so patches read only what they touch.
    """
    cache_dir = Path(cache_dir)
    jpath = cache_dir / f"{case}.json"
    if not jpath.exists():
        raise FileNotFoundError(f"{jpath}: case {case!r} is not in the cache; run preprocess_dataset first")
    props = json.loads(jpath.read_text(encoding="utf-8"))
    mode = "r" if mmap else None
    data = np.load(cache_dir / f"{case}_data.npy", mmap_mode=mode)
    seg = np.load(cache_dir / f"{case}_seg.npy", mmap_mode=mode)
    locs = np.load(cache_dir / f"{case}_locs.npy")
    return data, seg, props, locs
