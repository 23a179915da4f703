"""The on-disk cache of preprocessed nnU-Net cases: ``DATASET/.s3d_cache/<spec-hash>/``.

:func:`preprocess_dataset` caches every case as ``.npy`` arrays plus a properties JSON (atomic
writes), so a second run reads the cache instead of redoing the work.

The cache can live outside the dataset (a read-only dataset, a faster disk): pass ``cache_dir`` or
set the environment variable ``S3D_CACHE_DIR``; the cases then go to
``CACHE_DIR/<dataset folder name>-<hash of its absolute path>/<spec-hash>/``, so two datasets of the
same name do not share a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import atomic_path, write_json_atomic
from s3d.data.nnunet.dataset import NnUNetDataset
from s3d.data.nnunet.preprocessing import PreprocessingSpec, preprocess_training_case

CACHE_DIR_NAME = ".s3d_cache"
#: environment variable naming a folder for the caches of all datasets (``--cache-dir`` wins over it)
CACHE_DIR_ENV = "S3D_CACHE_DIR"
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


def cache_root(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding a dataset's caches (one sub-folder per preprocessing).

    ``root/.s3d_cache`` unless ``cache_dir`` (or else ``$S3D_CACHE_DIR``) names another place, then
    ``cache_dir/<dataset folder name>-<8 hex digits of the absolute dataset path's sha256>``.

    Example:
        >>> cache_root("data/Dataset001_Brain", "/scratch/cache")
        PosixPath('/scratch/cache/Dataset001_Brain-3f2a9c1e')
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or None
    if cache_dir is None:
        return Path(root) / CACHE_DIR_NAME
    absolute = Path(root).resolve()
    return Path(cache_dir) / f"{absolute.name}-{hashlib.sha256(str(absolute).encode()).hexdigest()[:8]}"


def cache_dir_for(root: str | os.PathLike[str], spec: PreprocessingSpec,
                  cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_root(root, cache_dir)/<spec hash>``: where :func:`preprocess_dataset` puts its arrays."""
    return cache_root(root, cache_dir) / spec.cache_key()


@contextlib.contextmanager
def _writing(ds: NnUNetDataset, out: Path, cache_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    """Turn a failed cache write into one line naming the folder and what to do."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        if cache_dir is None and not os.environ.get(CACHE_DIR_ENV):
            msg = (f"{ds.root}: cannot write the preprocessing cache {out} ({why}); for a read-only dataset "
                   f"pass --cache-dir DIR (or set {CACHE_DIR_ENV}=DIR) to keep the cache elsewhere")
        else:
            msg = (f"{out}: cannot write the preprocessing cache ({why}); choose a writable --cache-dir "
                   f"(or {CACHE_DIR_ENV}) with free space")
        raise OSError(msg) from e


def preprocess_dataset(
    ds: NnUNetDataset, spec: PreprocessingSpec, cases: Sequence[str] | None = None, progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Preprocess every case once into the cache; cases already there are skipped.

    A case is redone when its source files changed (size or modification time).
    Per case: ``{case}_data.npy`` (C, D, H, W) float32, ``{case}_seg.npy`` (D, H, W) int16,
    ``{case}_locs.npy`` (N, 4) foreground locations, then ``{case}.json`` (properties) written
    last, all atomically: a case counts as cached only when its JSON exists. A complete cache is only
    read (a read-only dataset with its cache works).

    Args:
        ds: the validated dataset.
        spec: the preprocessing.
        cases: only these cases (default all).
        progress: show a progress bar.
        cache_dir: keep the cache here instead of in the dataset (default ``$S3D_CACHE_DIR``, else
            ``DATASET/.s3d_cache``; see :func:`cache_root`).

    Returns:
        The cache folder (:func:`cache_dir_for`).

    Raises:
        OSError: the cache cannot be written (read-only dataset, full disk); one line naming the
            folder and ``--cache-dir``.

    Example:
        >>> cache = preprocess_dataset(validate_dataset("Dataset001_Brain"), spec)
        >>> data, seg, props, locs = load_cached_case(cache, "brain_000")
    """
    from s3d.runtime.progress import progress as progress_bar

    out = cache_dir_for(ds.root, spec, cache_dir)
    todo = [c for c in (ds.cases if cases is None else cases) if not _is_cached(out, ds, c)]
    spec_path = out / "spec.json"
    with _writing(ds, out, cache_dir):
        out.mkdir(parents=True, exist_ok=True)
        if not spec_path.exists():
            write_json_atomic(spec_path, spec.to_dict())
    for case in progress_bar(todo, desc="preprocess", unit="case", enabled=progress and bool(todo)):
        data, seg, props = preprocess_training_case(ds.image_paths(case), ds.label_path(case), spec)
        props["source_stat"] = _source_stat(ds, case)
        with _writing(ds, out, cache_dir):
            _save_npy(out / f"{case}_data.npy", data)
            _save_npy(out / f"{case}_seg.npy", seg)
            _save_npy(out / f"{case}_locs.npy", _foreground_locations(seg))
            write_json_atomic(out / f"{case}.json", props)
    return out


def _source_stat(ds: NnUNetDataset, case: str) -> list[list[int]]:
    stats = [p.stat() for p in [*ds.image_paths(case), ds.label_path(case)]]
    return [[int(st.st_size), int(st.st_mtime_ns)] for st in stats]


_ARRAYS = ("data", "seg", "locs")


def _npy_problem(path: Path) -> str:
    """Why ``path`` is not a complete ``.npy`` file (missing, foreign, shorter than its header says), or ""."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError) as e:
        return f"not a .npy file ({type(e).__name__}: {e})"
    if size < expected:
        return f"truncated: {size} bytes, its header says {expected}"
    return ""


def _is_cached(cache: Path, ds: NnUNetDataset, case: str) -> bool:
    """The case's JSON matches the current source files and its three arrays are complete (a damaged
    entry, e.g. after a full disk or a copy cut short, is preprocessed again)."""
    jpath = cache / f"{case}.json"
    if not jpath.exists():
        return False
    try:
        if json.loads(jpath.read_text(encoding="utf-8")).get("source_stat") != _source_stat(ds, case):
            return False
    except (ValueError, OSError, AttributeError):
        return False
    return not any(_npy_problem(cache / f"{case}_{a}.npy") for a in _ARRAYS)


def cached_cases(ds: NnUNetDataset, spec: PreprocessingSpec,
                 cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Cases of ``ds`` whose cache entry for ``spec`` exists and matches the current source files."""
    cache = cache_dir_for(ds.root, spec, cache_dir)
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
    fix = f"delete {cache_dir} (s3d's preprocessing cache) and run again: the cases are preprocessed again"
    try:
        props = json.loads(jpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{jpath}: damaged cache file ({type(e).__name__}: {e}); {fix}") from None
    mode = "r" if mmap else None
    arrays = []
    for name in _ARRAYS:
        path = cache_dir / f"{case}_{name}.npy"
        problem = _npy_problem(path)
        if problem:
            raise ValueError(f"{path}: damaged cache file ({problem}); {fix}")
        try:
            arrays.append(np.load(path, mmap_mode=mode if name != "locs" else None))
        except (OSError, ValueError) as e:  # e.g. "mmap length is greater than file size"
            raise ValueError(f"{path}: damaged cache file ({e}); {fix}") from None
    data, seg, locs = arrays
    return data, seg, props, locs
