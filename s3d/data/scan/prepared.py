"""Preprocess the accepted images of a scan once, into a resumable prepared directory with a manifest.

:func:`prepare` preprocesses every image :func:`~s3d.data.scan.scan` accepted, in worker processes:
crop to nonzero, z-score (NaN/inf or constant images are rejected with the reason), resample to 1 mm
isotropic (third-order; nnU-Net's separate-axis rule for anisotropic images), and stores the result
with :func:`s3d.data.store.save_volume`. Finished cases (``cases/<id>.npy`` + ``cases/<id>.json``) are
skipped on a re-run; every file is written atomically; ``manifest.json`` lists every file with its
status and reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s3d._fs import write_json_atomic
from s3d.data.io import read_nifti
from s3d.data.preprocess import anisotropic_axis, crop_to_nonzero, resample_image, shape_for_spacing, zscore
from s3d.data.scan.headers import ScanFilters, scan
from s3d.data.store import save_volume

MANIFEST_NAME = "manifest.json"
CASES_DIR = "cases"
MANIFEST_VERSION = 1


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


def _case_paths(out_dir: Path, cid: str) -> tuple[Path, Path]:
    return out_dir / CASES_DIR / f"{cid}.npy", out_dir / CASES_DIR / f"{cid}.json"


def _process_one(args: tuple[dict[str, Any], str, float, str]) -> dict[str, Any]:
    """Worker: preprocess one accepted entry; returns the updated entry dict (never raises)."""
    entry, out_dir, target_spacing_mm, dtype = args
    npy, meta = _case_paths(Path(out_dir), entry["case_id"])
    try:
        data, hdr = read_nifti(entry["path"])
        if entry.get("volume_index") is not None:
            data = data.reshape(*data.shape[:3], -1)[..., entry["volume_index"]]
        elif data.ndim > 3:
            data = data.reshape(data.shape[:3])
        out, props = preprocess_image(data[None], hdr.spacing_mm, target_spacing_mm)
    except ValueError as e:
        msg = str(e)
        status = "failed" if "cannot read" in msg else "rejected"
        return {**entry, "status": status, "reason": msg}
    except Exception as e:  # noqa: BLE001 - a worker must report, not crash the pool
        return {**entry, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    save_volume(npy, out, dtype=dtype)
    props = {**props, "source": entry["path"], "case_id": entry["case_id"], "dtype": dtype}
    write_json_atomic(meta, props)
    return {**entry, "file": f"{CASES_DIR}/{npy.name}", "preprocessed_shape": props["preprocessed_shape"]}


def _finished(out_dir: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    npy, meta = _case_paths(out_dir, entry["case_id"])
    if not (npy.exists() and meta.exists()):
        return None
    try:
        props = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if props.get("source") != entry["path"]:
        return None
    return {**entry, "file": f"{CASES_DIR}/{npy.name}", "preprocessed_shape": props["preprocessed_shape"]}


def prepare(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    filters: ScanFilters | None = None,
    workers: int = 0,
    target_spacing_mm: float = 1.0,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Scan ``source``, preprocess every accepted image into ``out_dir``, write ``manifest.json``.

    Resumable: a case whose ``cases/<id>.npy`` and ``cases/<id>.json`` exist (from the same source
    path) is not processed again. Rejected and failed files are listed with their reason.

    Args:
        source: directory, ``.txt`` file list or ``.csv`` (see :func:`scan`).
        out_dir: output directory (``manifest.json`` and ``cases/``).
        filters: :class:`ScanFilters` (paper defaults when ``None``).
        workers: worker processes (0 = in this process).
        target_spacing_mm: isotropic output spacing, mm.
        dtype: stored dtype, ``"float32"`` or ``"float16"``.
        progress: show a tqdm progress bar.

    Returns:
        The manifest dict: ``entries`` (one per file/volume), ``counts`` (ok/rejected/failed and
        ``processed``/``skipped`` in this run), the filters and settings used.

    Example:
        >>> m = prepare("raw/", "prep/", ScanFilters(min_file_bytes=0), workers=4)
        >>> m["counts"]["ok"]
        40
    """
    from tqdm.auto import tqdm

    filters = filters or ScanFilters()
    out = Path(out_dir)
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    entries = [asdict(e) for e in scan(source, filters)]
    seen: dict[str, str] = {}
    for e in entries:
        if e["status"] == "ok" and e["case_id"] in seen:
            e["status"] = "rejected"
            e["reason"] = f"duplicate case id {e['case_id']!r} (also {seen[e['case_id']]})"
        elif e["status"] == "ok":
            seen[e["case_id"]] = e["path"]
    todo, skipped = [], 0
    for i, e in enumerate(entries):
        if e["status"] != "ok":
            continue
        done = _finished(out, e)
        if done is not None:
            entries[i], skipped = done, skipped + 1
        else:
            todo.append(i)
    jobs = [(entries[i], str(out), float(target_spacing_mm), dtype) for i in todo]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="img", disable=not progress)
    if workers > 0 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for i, res in zip(todo, pool.map(_process_one, jobs, chunksize=1), strict=True):
                entries[i] = res
                bar.update()
    else:
        for i, job in zip(todo, jobs, strict=True):
            entries[i] = _process_one(job)
            bar.update()
    bar.close()
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "rejected", "failed")}
    counts.update(processed=sum(entries[i]["status"] == "ok" for i in todo), skipped=skipped)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": str(source),
        "target_spacing_mm": float(target_spacing_mm),
        "dtype": dtype,
        "filters": asdict(filters),
        "counts": counts,
        "entries": entries,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(prepared_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``manifest.json`` of a prepared directory (clear error if it is not one)."""
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir}: no {MANIFEST_NAME}; run `s3d pretrain --prepare-only` "
                                f"(or s3d.data.scan.prepare) on the raw folder first")
    return json.loads(path.read_text(encoding="utf-8"))


def training_cases(manifest: dict[str, Any], prepared_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The preprocessed cases of a manifest: dicts with ``case_id``, ``subject``, ``file`` (absolute)."""
    base = Path(prepared_dir)
    return [{"case_id": e["case_id"], "subject": e["subject"], "file": str(base / e["file"]),
             "shape": e.get("preprocessed_shape")}
            for e in manifest["entries"] if e["status"] == "ok" and e.get("file")]
