"""List the images of a source (folder, file list or CSV) and decide from their headers which to keep.

:func:`scan` reads headers only (no voxels) and applies the filters of :class:`ScanFilters` (paper
defaults: field of view >= 50 mm and spacing <= 6.5 mm on every axis, file >= 200 kB, T1/T2/FLAIR-like
modalities, 4D images rejected or split). Unreadable files are reported, never raised.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from s3d.data.io import NIFTI_SUFFIXES, case_id, read_header

#: Modality tokens accepted by default: T1-, T2- and FLAIR-weighted variants (OpenMind's structural MRIs).
DEFAULT_MODALITIES: tuple[str, ...] = (
    "t1", "t1w", "t1c", "t1ce", "t1gd", "mprage", "mp2rage", "t1map", "t1rho", "unit1", "inplanet1",
    "t2", "t2w", "t2star", "t2starw", "t2map", "inplanet2", "flair", "t2flair", "t1flair",
    "pd", "pdw", "pdt2",
)
#: Modality tokens recognised in file names (so that a known non-structural image is rejected).
KNOWN_MODALITIES: tuple[str, ...] = DEFAULT_MODALITIES + (
    "dwi", "adc", "fa", "md", "bold", "asl", "cbf", "swi", "phase", "magnitude", "angio", "tof", "pet", "ct",
    "epi", "sbref", "fieldmap", "mask", "seg", "dseg", "label",
)


@dataclass
class ScanFilters:
    """Filters applied from headers (paper defaults).

    Attributes:
        min_fov_mm: reject if the field of view (shape x spacing) is below this on any axis, mm.
        max_spacing_mm: reject if the spacing exceeds this on any axis, mm.
        min_file_bytes: reject files smaller than this (paper: 200 kB = 200_000 bytes).
        modalities: allow-list of modality tokens (lower case); ``None`` accepts every modality.
        allow_unknown_modality: keep images whose modality cannot be inferred from the CSV or name.
        split_4d: split 4D images into one case per volume (``<id>_t000``...); else reject them.
    """

    min_fov_mm: float = 50.0
    max_spacing_mm: float = 6.5
    min_file_bytes: int = 200_000
    modalities: tuple[str, ...] | None = DEFAULT_MODALITIES
    allow_unknown_modality: bool = True
    split_4d: bool = False


@dataclass
class ScanEntry:
    """One row of the manifest.

    ``status`` is ``"ok"`` (accepted by the scan; after :func:`prepare`: preprocessed, ``file`` set),
    ``"rejected"`` (a filter or the preprocessing refused it; ``reason`` says why) or ``"failed"``
    (unreadable or corrupt; ``reason`` holds the error).
    """

    path: str
    case_id: str
    subject: str
    modality: str | None = None
    status: str = "ok"
    reason: str = ""
    shape: list[int] | None = None
    spacing_mm: list[float] | None = None
    volume_index: int | None = None
    file: str | None = None
    preprocessed_shape: list[int] | None = None


# ---- inputs ------------------------------------------------------------------------------------------
def _modality_from_name(name: str) -> str | None:
    tokens = re.split(r"[_\-.]", name.lower())
    for tok in reversed(tokens):  # BIDS puts the suffix last: sub-01_ses-1_T1w.nii.gz
        if tok in KNOWN_MODALITIES:
            return tok
    return None


def _subject_from_path(path: Path, fallback: str) -> str:
    for part in path.parts:
        m = re.match(r"(sub-[A-Za-z0-9]+)", part)
        if m:
            return m.group(1)
    return fallback


def _list_source(source: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows {path, modality?, subject?} from a directory, a ``.txt`` file list or a ``.csv``."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [{"path": str(p), "rel": str(p.relative_to(src))} for p in files]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such directory, file list or CSV")
    if src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{src}: a CSV source needs a 'path' column (optional: modality, subject); "
                                 f"found columns {reader.fieldnames}")
            rows = [dict(r) for r in reader]
    else:
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
        rows = [{"path": ln} for ln in lines if ln and not ln.startswith("#")]
    for r in rows:
        p = Path(r["path"])
        if not p.is_absolute():
            p = src.parent / p
        r["path"] = str(p)
        r.setdefault("rel", str(Path(r["path"]).name))
    return rows


def _unique_id(rel: str) -> str:
    parts = list(Path(rel).parts)
    parts[-1] = case_id(parts[-1])
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", "__".join(parts))


# ---- scan --------------------------------------------------------------------------------------------
def check_header(shape: Sequence[int], spacing_mm: Sequence[float], filters: ScanFilters) -> str:
    """The first filter that rejects an image of this geometry, as a reason string ("" = accepted).

    Example:
        >>> check_header((100, 100, 100), (8.0, 1.0, 1.0), ScanFilters())
        'spacing 8.0 mm > 6.5 mm on axis 0'
    """
    for axis, s in enumerate(spacing_mm[:3]):
        if s > filters.max_spacing_mm:
            return f"spacing {s:.3g} mm > {filters.max_spacing_mm:.3g} mm on axis {axis}"
    for axis, (n, s) in enumerate(zip(shape[:3], spacing_mm[:3], strict=True)):
        if n * s < filters.min_fov_mm:
            return f"field of view {n * s:.1f} mm < {filters.min_fov_mm:.1f} mm on axis {axis}"
    return ""


def scan(source: str | os.PathLike[str], filters: ScanFilters | None = None) -> list[ScanEntry]:
    """Read every header under ``source`` and decide which images to keep; never raises on bad files.

    Args:
        source: a directory (searched recursively; every non-hidden file is listed, so files with a
            wrong extension appear as rejected), a ``.txt`` file with one path per line, or a ``.csv``
            with a ``path`` column and optional ``modality`` and ``subject`` columns.
        filters: :class:`ScanFilters` (paper defaults when ``None``).

    Returns:
        One :class:`ScanEntry` per image (per volume when 4D images are split), status ``"ok"``,
        ``"rejected"`` or ``"failed"``.

    Example:
        >>> entries = scan("raw_mri/", ScanFilters(min_file_bytes=0))
        >>> sum(e.status == "ok" for e in entries)
        42
    """
    filters = filters or ScanFilters()
    allow = None if filters.modalities is None else {m.lower() for m in filters.modalities}
    entries: list[ScanEntry] = []
    for row in _list_source(source):
        path = Path(row["path"])
        cid = _unique_id(row["rel"])
        subject = row.get("subject") or _subject_from_path(Path(row["rel"]), cid)
        modality = (row.get("modality") or "").strip().lower() or _modality_from_name(path.name)
        entry = ScanEntry(path=str(path), case_id=cid, subject=subject, modality=modality)
        entries.append(entry)
        if not str(path).endswith(NIFTI_SUFFIXES):
            entry.status = "rejected"
            entry.reason = f"not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})"
            continue
        try:
            size = path.stat().st_size
        except OSError as e:
            entry.status, entry.reason = "failed", f"cannot stat ({e})"
            continue
        if size < filters.min_file_bytes:
            entry.status, entry.reason = "rejected", f"file size {size} B < {filters.min_file_bytes} B"
            continue
        if allow is not None:
            if modality is None and not filters.allow_unknown_modality:
                entry.status, entry.reason = "rejected", "modality unknown (not in CSV or file name)"
                continue
            if modality is not None and modality not in allow:
                entry.status, entry.reason = "rejected", f"modality {modality!r} not in the allow-list"
                continue
        try:
            hdr = read_header(path)
        except Exception as e:  # noqa: BLE001 - any corrupt header is a reported failure
            entry.status, entry.reason = "failed", str(e)
            continue
        shape = [int(s) for s in hdr.shape]
        entry.shape, entry.spacing_mm = shape, [float(s) for s in hdr.spacing_mm]
        extra_dims = [n for n in shape[3:] if n != 1]
        if len(shape) < 3 or len(shape) > 3 and len(extra_dims) > 1:
            entry.status, entry.reason = "rejected", f"expected a 3D or 4D image, got shape {tuple(shape)}"
            continue
        reason = check_header(shape, entry.spacing_mm, filters)
        if reason:
            entry.status, entry.reason = "rejected", reason
            continue
        if extra_dims:
            if not filters.split_4d:
                entry.status = "rejected"
                entry.reason = f"4D image with {extra_dims[0]} volumes (split_4d off)"
                continue
            entries.pop()
            for t in range(extra_dims[0]):
                row = {**asdict(entry), "case_id": f"{cid}_t{t:03d}", "volume_index": t}
                entries.append(ScanEntry(**row))
    return entries



def filters_from_dict(d: Iterable[tuple[str, Any]] | dict[str, Any]) -> ScanFilters:
    """Rebuild :class:`ScanFilters` from its dict form (lists become tuples)."""
    d = dict(d)
    if d.get("modalities") is not None:
        d["modalities"] = tuple(d["modalities"])
    return ScanFilters(**d)
