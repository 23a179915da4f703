"""Preprocess the accepted images of a scan once, into a resumable prepared directory with a manifest.

:func:`prepare` preprocesses every image :func:`~s3d.data.scan.scan` accepted, in worker processes:
crop to nonzero, z-score (NaN/inf or constant images and label maps are rejected with the reason), resample to 1 mm
isotropic (third-order; nnU-Net's separate-axis rule for anisotropic images), and stores the result
with :func:`s3d.data.store.save_volume` (``.b2nd`` by default, or ``.npy``). Finished cases
(``cases/<id>.b2nd`` + ``cases/<id>.json``) are skipped on a re-run; every file is written atomically;
``manifest.json`` lists every file with its status, rule and reason. ``shard=(i, n)`` prepares one
of ``n`` disjoint slices (for N machines or a cluster array) and merges the manifests when all are
there (:mod:`s3d.data.scan.manifest`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import sweep_temporaries, write_json_atomic
from s3d._optional import optional_import
from s3d.data.io import read_nifti
from s3d.data.preprocess import anisotropic_axis, crop_to_nonzero, resample_image, shape_for_spacing, zscore
from s3d.data.scan.headers import ScanFilters, list_source, scan_rows, source_key
from s3d.data.scan.manifest import (
    CASES_DIR,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    merge_shards,
    shard_manifest_name,
    shard_manifests,
    shard_of,
)
from s3d.data.store import DEFAULT_STORE, STORE_DTYPES, require_blosc2, save_volume, store_suffix

#: Version of what a prepared volume holds (resampling, normalisation); a re-run prepares volumes of
#: another version again. 2: nnU-Net's resampling rules (range clipping, label argmax, anisotropy).
PREPROCESSING_VERSION = 2


def preprocess_image(
    image: np.ndarray, spacing_mm: Sequence[float], target_spacing_mm: float = 1.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop to nonzero, z-score, resample a (C, D, H, W) image to isotropic ``target_spacing_mm``.

    Raises:
        ValueError: NaN/inf voxels or a constant image (the message says which).

    Returns:
        (float32 (C, D', H', W'), properties: bbox, shapes, spacings, separate axis).

    Example:
        >>> out, props = preprocess_image(np.random.rand(1, 40, 40, 20), (1.0, 1.0, 2.0))
        >>> out.shape
        (1, 40, 40, 40)
    """
    cropped, _, bbox = crop_to_nonzero(image)
    normed = zscore(cropped)
    target = (float(target_spacing_mm),) * 3
    new_shape = shape_for_spacing(normed.shape[1:], spacing_mm, target)
    axis = anisotropic_axis(spacing_mm)
    out = resample_image(normed, new_shape, order=3, separate_axis=axis)
    props = {
        "bbox": [[s.start, s.stop] for s in bbox],
        "cropped_shape": list(normed.shape[1:]),
        "spacing_mm": [float(s) for s in spacing_mm],
        "target_spacing_mm": list(target),
        "separate_axis": axis,
        "preprocessed_shape": list(out.shape[1:]),
    }
    return out, props


#: An image whose voxels are integers with at most this many distinct values is a label map (rule ``labelmap``):
#: nnU-Net ``labelsTr`` files, masks, atlases. MRI and CT hold hundreds to thousands of distinct values.
LABEL_MAP_MAX_VALUES = 32


def label_map_values(data: np.ndarray, max_values: int = LABEL_MAP_MAX_VALUES) -> np.ndarray | None:
    """The distinct values of ``data`` if it looks like a label map (integer values, 2 to ``max_values``
    of them), else ``None``. Reads a sample first, so a real image costs one strided pass.

    Example:
        >>> label_map_values(np.array([0, 1, 1, 2], np.float32))
        array([0., 1., 2.], dtype=float32)
    """
    flat = np.asarray(data).ravel()
    if flat.size == 0:
        return None
    sample = flat[:: max(1, flat.size // 65536)]
    if not np.array_equal(sample, np.rint(sample)) or len(np.unique(sample)) > max_values:
        return None
    if not np.array_equal(flat, np.rint(flat)):
        return None
    values = np.unique(flat)
    return values if 2 <= len(values) <= max_values else None  # one value: the "constant" rule says more


def _case_paths(out_dir: Path, cid: str, store: str) -> tuple[Path, Path]:
    return out_dir / CASES_DIR / f"{cid}{store_suffix(store)}", out_dir / CASES_DIR / f"{cid}.json"


def _preprocess_rule(msg: str) -> tuple[str, str]:
    """(status, rule) of a preprocessing ``ValueError`` message."""
    if "cannot read" in msg:
        return "failed", "unreadable"
    if "NaN or inf" in msg:
        return "rejected", "nonfinite"
    if "constant" in msg:
        return "rejected", "constant"
    return "rejected", "error"


def _process_one(args: tuple[dict[str, Any], str, float, str, str]) -> dict[str, Any]:
    """Worker: preprocess one accepted entry; returns the updated entry dict (never raises)."""
    entry, out_dir, target_spacing_mm, dtype, store = args
    data_path, meta = _case_paths(Path(out_dir), entry["case_id"], store)
    try:
        data, hdr = read_nifti(entry["path"])
        if entry.get("volume_index") is not None:
            data = data.reshape(*data.shape[:3], -1)[..., entry["volume_index"]]
        elif data.ndim > 3:
            data = data.reshape(data.shape[:3])
        labels = label_map_values(data)
        if labels is not None:
            shown = ", ".join(f"{v:g}" for v in labels[:8]) + (", ..." if len(labels) > 8 else "")
            return {**entry, "status": "rejected", "rule": "labelmap",
                    "reason": f"{len(labels)} distinct integer value(s) ({shown}): a label map (segmentation), not "
                              f"an image; pre-training reads images (a labelsTr folder is not one)"}
        out, props = preprocess_image(data[None], hdr.spacing_mm, target_spacing_mm)
    except ValueError as e:
        status, rule = _preprocess_rule(str(e))
        return {**entry, "status": status, "rule": rule, "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a worker must report, not crash the pool
        return {**entry, "status": "failed", "rule": "error", "reason": f"{type(e).__name__}: {e}"}
    save_volume(data_path, out, dtype=dtype)
    props = {**props, "source": entry["path"], "case_id": entry["case_id"], "dtype": dtype, "store": store,
             "preprocessing_version": PREPROCESSING_VERSION}
    write_json_atomic(meta, props)
    return {**entry, "file": f"{CASES_DIR}/{data_path.name}", "preprocessed_shape": props["preprocessed_shape"]}


def _finished(out_dir: Path, entry: dict[str, Any], store: str) -> dict[str, Any] | None:
    data_path, meta = _case_paths(out_dir, entry["case_id"], store)
    if not (data_path.exists() and meta.exists()):
        return None
    try:
        props = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if props.get("source") != entry["path"] or props.get("preprocessing_version") != PREPROCESSING_VERSION:
        return None  # another file, or made by an older resampling/normalisation: prepare it again
    return {**entry, "file": f"{CASES_DIR}/{data_path.name}", "preprocessed_shape": props["preprocessed_shape"]}


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> list[dict[str, Any]]:
    from s3d.runtime.progress import progress as progress_bar

    bar = progress_bar(total=len(jobs), desc="preprocess", unit="img", enabled=progress)
    results: list[dict[str, Any]] = []
    if workers > 0 and len(jobs) > 1:
        import contextlib

        from s3d._workers import map_in_processes

        # closing: a Ctrl-C that lands here, outside the generator, still ends (and waits for) the workers
        with contextlib.closing(map_in_processes(_process_one, jobs, workers)) as done:
            for res in done:
                results.append(res)
                bar.update()
    else:
        for job in jobs:
            results.append(_process_one(job))
            bar.update()
    bar.close()
    return results


# ---- prepare -----------------------------------------------------------------------------------------
def prepare(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    filters: ScanFilters | None = None,
    workers: int = 0,
    target_spacing_mm: float = 1.0,
    dtype: str = "float32",
    progress: bool = True,
    store: str = DEFAULT_STORE,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Scan ``source``, preprocess every accepted image into ``out_dir``, write ``manifest.json``.

    Resumable: a case whose ``cases/<id>.<store>`` and ``cases/<id>.json`` exist (from the same
    source path) is not processed again. Rejected and failed files are listed with their rule and
    reason. With ``shard=(i, n)`` only the files of shard ``i`` of ``n`` are scanned and prepared
    (:func:`~s3d.data.scan.manifest.shard_of` of the file's path under the raw root) and the manifest
    is ``manifest.shard-<i>-of-<n>.json``; when all ``n`` shard manifests are in ``out_dir`` they are
    merged into ``manifest.json`` (:func:`~s3d.data.scan.manifest.merge_shards`).

    Args:
        source: directory, ``.txt`` file list or ``.csv`` (see :func:`~s3d.data.scan.list_source`).
        out_dir: output directory (``manifest.json`` and ``cases/``), shared by all shards.
        filters: :class:`ScanFilters` (paper defaults when ``None``).
        workers: worker processes (0 = in this process); they end when this process dies.
        target_spacing_mm: isotropic output spacing, mm.
        dtype: stored dtype, ``"float32"`` or ``"float16"``.
        progress: show a tqdm progress bar.
        store: ``"b2nd"`` (blosc2, compressed; default) or ``"npy"`` (see :mod:`s3d.data.store`).
        shard: ``(index, count)``, ``0 <= index < count``, or ``None`` for all files.

    Returns:
        The manifest dict (of this shard): ``entries`` (one per file/volume), ``counts``
        (ok/rejected/failed and ``processed``/``skipped`` in this run), the settings used.

    Example:
        >>> m = prepare("raw/", "prep/", ScanFilters(min_file_bytes=0), workers=4)
        >>> m["counts"]["ok"]
        40
    """
    from s3d._paths import UsageError

    filters = filters or ScanFilters()
    store_suffix(store)
    if not (np.isfinite(target_spacing_mm) and target_spacing_mm > 0):
        raise UsageError(f"target_spacing_mm (--spacing-mm): must be a finite size > 0 mm, got {target_spacing_mm}")
    if int(workers) < 0:
        raise UsageError(f"workers (--prep-workers): must be >= 0, got {workers}")
    optional_import("nibabel", "reading NIfTI")  # before anything is written; not once per image
    if store == "b2nd":
        require_blosc2()
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype: expected one of {STORE_DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    rows = list_source(source)  # a bad source is refused before anything is written
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    listed = len(rows)
    if shard is not None:
        index, count = shard
        rows = [r for r in rows if shard_of(source_key(r), count) == index]
    entries = [asdict(e) for e in scan_rows(rows, filters)]
    seen: dict[str, str] = {}
    for e in entries:
        if e["status"] == "ok" and e["case_id"] in seen:
            e.update(status="rejected", rule="duplicate",
                     reason=f"duplicate case id {e['case_id']!r} (also {seen[e['case_id']]})")
        elif e["status"] == "ok":
            seen[e["case_id"]] = e["path"]
    todo, skipped = [], 0
    for i, e in enumerate(entries):
        if e["status"] != "ok":
            continue
        done = _finished(out, e, store)
        if done is not None:
            entries[i], skipped = done, skipped + 1
        else:
            todo.append(i)
    # the temporaries of a preparation that was killed; shards may prepare into this folder at the same
    # time, so a shard sweeps those of its own files only
    own = None if shard is None else {p.name for e in entries if e["status"] == "ok"
                                      for p in _case_paths(out, e["case_id"], store)}
    sweep_temporaries(out / CASES_DIR, own)
    jobs = [(entries[i], str(out), float(target_spacing_mm), dtype, store) for i in todo]
    try:
        finished = _run_jobs(jobs, workers, progress)
    except BaseException:
        sweep_temporaries(out / CASES_DIR, own)  # a worker ended mid-write (the workers have all ended here)
        raise
    for i, res in zip(todo, finished, strict=True):
        entries[i] = res
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "rejected", "failed")}
    counts.update(processed=sum(entries[i]["status"] == "ok" for i in todo), skipped=skipped)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(source),
        "target_spacing_mm": float(target_spacing_mm),
        "dtype": dtype,
        "store": store,
        "filters": asdict(filters),
        "listed": listed,
        "counts": counts,
        "entries": entries,
    }
    if shard is None:
        manifest["shards"] = 1
        write_json_atomic(out / MANIFEST_NAME, manifest)
        return manifest
    manifest["shard"] = list(shard)
    write_json_atomic(out / shard_manifest_name(*shard), manifest)
    if len(shard_manifests(out).get(shard[1], {})) == shard[1]:
        try:
            merge_shards(out, shard[1])
        except ValueError as e:  # e.g. other shards not re-run yet after files were added: not this shard's fault
            return {**manifest, "merge_error": str(e)}
    return manifest
