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


#: Rules a file can be rejected (or fail) by, as recorded in each manifest entry's ``rule``
#: (``""`` for accepted files): see ``s3d pretrain --report``.
RULES: dict[str, str] = {
    "format": "not a NIfTI file (extension)",
    "missing": "listed path does not exist",
    "unreadable": "header or voxel data cannot be read (corrupt, truncated, no permission)",
    "size": "file smaller than min_file_bytes",
    "modality": "modality not in the allow-list, or unknown with allow_unknown_modality off",
    "dims": "not a 3D or 4D image",
    "spacing": "spacing above max_spacing_mm on an axis",
    "fov": "field of view below min_fov_mm on an axis",
    "4d": "4D image and split_4d off",
    "duplicate": "case id already taken by an earlier file",
    "nonfinite": "NaN or inf voxels",
    "constant": "constant image (cannot z-score)",
    "labelmap": "a label map (segmentation, mask), not an image: integer voxels, 2 to 32 distinct values",
    "error": "any other preprocessing error",
}


@dataclass
class ScanEntry:
    """One row of the manifest.

    ``status`` is ``"ok"`` (accepted by the scan; after :func:`prepare`: preprocessed, ``file`` set),
    ``"rejected"`` (a filter or the preprocessing refused it) or ``"failed"`` (missing, unreadable or
    corrupt); ``rule`` names the rule (a key of :data:`RULES`) and ``reason`` says why in words.
    ``dataset`` is the source dataset (the top-level folder under the raw root, or the CSV's
    ``dataset`` column); ``listing_index`` the file's position in the source listing.
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
    rule: str = ""
    dataset: str = ""
    listing_index: int | None = None

    def reject(self, rule: str, reason: str, status: str = "rejected") -> ScanEntry:
        """Mark this entry rejected (or ``status="failed"``) by ``rule`` (a :data:`RULES` key)."""
        self.status, self.rule, self.reason = status, rule, reason
        return self


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


def _dataset_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else "."


def list_source(source: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The files of a source, in listing order: dicts with ``path`` (absolute or as resolved), ``rel``
    (the path the case id is made of), ``dataset``, ``listing_index`` and the CSV's optional
    ``modality`` / ``subject`` columns.

    Path rules: a directory is searched recursively (sorted, symbolic links to folders followed, hidden
    files and folders such as ``.s3d_cache/`` or ``.git/`` skipped); ``rel`` is the
    path under it. In a ``.txt`` list (one path per line, ``#`` comments) or a ``.csv`` (``path``
    column), a relative path is resolved against **the list file's folder** (not the working
    directory), ``~`` is expanded, and ``rel`` is the path under the list's folder (else the
    absolute path without its root), so equal file names in different folders get different ids.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a CSV without a ``path`` column, an empty list, or a list none of whose paths
            exists (the message names the list file and how its paths were resolved).

    Example:
        >>> [r["rel"] for r in list_source("raw_mri/")][:1]
        ['ds001/sub-01/anat/sub-01_T1w.nii.gz']
    """
    src = Path(source)
    if src.is_dir():
        files = sorted(_walk_files(src))
        rows: list[dict[str, Any]] = []
        for p in files:
            rel = p.relative_to(src)
            rows.append({"path": str(p), "rel": str(rel), "dataset": _dataset_of(rel)})
    elif not src.is_file():
        raise FileNotFoundError(f"{src}: no such directory, file list or CSV")
    else:
        rows = _list_file_rows(src)
    for k, r in enumerate(rows):
        r["listing_index"] = k
    return rows


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, following symbolic links to folders (a folder reached twice,
    e.g. through a link loop, is read once); hidden files and folders (``.git/``, ``.s3d_cache/``) skipped."""
    seen: set[str] = set()
    out: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(folder) / n for n in names if not n.startswith(".") and (Path(folder) / n).is_file())
    return out


def _list_file_rows(src: Path) -> list[dict[str, Any]]:
    if src.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{src}: a NIfTI file; the data source is a folder of NIfTI files, a .txt list of paths "
                         f"(one per line) or a .csv with a 'path' column; pass the folder ({src.parent})")
    try:
        return _read_list_file(src)
    except UnicodeDecodeError:
        raise ValueError(f"{src}: not a text file; the data source is a folder of NIfTI files, a .txt list of "
                         "paths (one per line) or a .csv with a 'path' column") from None


def _read_list_file(src: Path) -> list[dict[str, Any]]:
    if src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{src}: a CSV source needs a 'path' column (optional: modality, subject, "
                                 f"dataset); found columns {reader.fieldnames}")
            rows = [dict(r) for r in reader if (r.get("path") or "").strip()]
    else:
        lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
        rows = [{"path": ln} for ln in lines if ln and not ln.startswith("#")]
    if not rows:
        raise ValueError(f"{src}: the list holds no path (one path per line, or a CSV 'path' column)")
    base = src.parent.resolve()
    outside = []
    for r in rows:
        p = Path(r["path"].strip()).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else base / p))  # "../x" -> the folder above the list's
        given = (r.get("dataset") or "").strip()
        try:
            rel = p.relative_to(base)
        except ValueError:
            rel = Path(*p.parts[1:])
            if not given:
                outside.append(r)
        r["path"], r["rel"] = str(p), str(rel)
        r["dataset"] = given or _dataset_of(rel)
    if outside:  # dataset of paths outside the list's folder: the first folder under their common folder
        common = Path(os.path.commonpath([str(Path(r["path"]).parent) for r in outside]))
        for r in outside:
            r["dataset"] = _dataset_of(Path(r["path"]).relative_to(common))
    if not any(Path(r["path"]).exists() for r in rows):
        shown = ", ".join(r["path"] for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise ValueError(f"{src}: none of its {len(rows)} path(s) exists ({shown}); relative paths in a list "
                         f"file are resolved against the list file's folder {base}, not the working directory")
    return rows


def _unique_id(rel: str) -> str:
    parts = list(Path(rel).parts)
    parts[-1] = case_id(parts[-1])
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", "__".join(parts))


def source_key(row: dict[str, Any]) -> str:
    """The key a listed file is identified by across runs and machines: its case id before any 4D split
    (made of the path under the raw root, so independent of where the archive is mounted)."""
    return _unique_id(row["rel"])


# ---- scan --------------------------------------------------------------------------------------------
def header_rule(shape: Sequence[int], spacing_mm: Sequence[float], filters: ScanFilters) -> tuple[str, str]:
    """The first geometry filter that rejects an image: ``(rule, reason)``, ``("", "")`` if accepted.

    Example:
        >>> header_rule((100, 100, 100), (8.0, 1.0, 1.0), ScanFilters())
        ('spacing', 'spacing 8.0 mm > 6.5 mm on axis 0')
    """
    for axis, s in enumerate(spacing_mm[:3]):
        if s > filters.max_spacing_mm:
            return "spacing", f"spacing {s:.3g} mm > {filters.max_spacing_mm:.3g} mm on axis {axis}"
    for axis, (n, s) in enumerate(zip(shape[:3], spacing_mm[:3], strict=True)):
        if n * s < filters.min_fov_mm:
            return "fov", f"field of view {n * s:.1f} mm < {filters.min_fov_mm:.1f} mm on axis {axis}"
    return "", ""


def check_header(shape: Sequence[int], spacing_mm: Sequence[float], filters: ScanFilters) -> str:
    """The first filter that rejects an image of this geometry, as a reason string ("" = accepted).

    Example:
        >>> check_header((100, 100, 100), (8.0, 1.0, 1.0), ScanFilters())
        'spacing 8.0 mm > 6.5 mm on axis 0'
    """
    return header_rule(shape, spacing_mm, filters)[1]


def scan(source: str | os.PathLike[str], filters: ScanFilters | None = None) -> list[ScanEntry]:
    """Read every header under ``source`` and decide which images to keep; never raises on bad files.

    Args:
        source: a directory (searched recursively; every non-hidden file is listed, so files with a
            wrong extension appear as rejected), a ``.txt`` file with one path per line, or a ``.csv``
            with a ``path`` column and optional ``modality``, ``subject`` and ``dataset`` columns
            (path rules: :func:`list_source`).
        filters: :class:`ScanFilters` (paper defaults when ``None``).

    Returns:
        One :class:`ScanEntry` per image (per volume when 4D images are split), status ``"ok"``,
        ``"rejected"`` or ``"failed"``, with the ``rule`` that rejected it.

    Example:
        >>> entries = scan("raw_mri/", ScanFilters(min_file_bytes=0))
        >>> sum(e.status == "ok" for e in entries)
        42
    """
    return scan_rows(list_source(source), filters)


def scan_rows(rows: Sequence[dict[str, Any]], filters: ScanFilters | None = None) -> list[ScanEntry]:
    """:func:`scan` of some rows of :func:`list_source` (e.g. one shard's)."""
    filters = filters or ScanFilters()
    entries: list[ScanEntry] = []
    for row in rows:
        entries.extend(_scan_one(row, filters))
    return entries


def _scan_one(row: dict[str, Any], filters: ScanFilters) -> list[ScanEntry]:
    allow = None if filters.modalities is None else {m.lower() for m in filters.modalities}
    path = Path(row["path"])
    cid = source_key(row)
    subject = (row.get("subject") or "").strip() or _subject_from_path(Path(row["rel"]), cid)
    modality = (row.get("modality") or "").strip().lower() or _modality_from_name(path.name)
    entry = ScanEntry(path=str(path), case_id=cid, subject=subject, modality=modality,
                      dataset=row.get("dataset", ""), listing_index=row.get("listing_index"))
    if not str(path).endswith(NIFTI_SUFFIXES):
        return [entry.reject("format", f"not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [entry.reject("missing", "no such file", "failed")]
    except OSError as e:
        return [entry.reject("unreadable", f"cannot stat ({e})", "failed")]
    if size < filters.min_file_bytes:
        return [entry.reject("size", f"file size {size} B < {filters.min_file_bytes} B")]
    if allow is not None:
        if modality is None and not filters.allow_unknown_modality:
            return [entry.reject("modality", "modality unknown (not in CSV or file name)")]
        if modality is not None and modality not in allow:
            return [entry.reject("modality", f"modality {modality!r} not in the allow-list")]
    try:
        hdr = read_header(path)
    except Exception as e:  # noqa: BLE001 - any corrupt header is a reported failure
        return [entry.reject("unreadable", str(e), "failed")]
    shape = [int(s) for s in hdr.shape]
    entry.shape, entry.spacing_mm = shape, [float(s) for s in hdr.spacing_mm]
    extra_dims = [n for n in shape[3:] if n != 1]
    if len(shape) < 3 or len(shape) > 3 and len(extra_dims) > 1:
        return [entry.reject("dims", f"expected a 3D or 4D image, got shape {tuple(shape)}")]
    rule, reason = header_rule(shape, entry.spacing_mm, filters)
    if rule:
        return [entry.reject(rule, reason)]
    if not extra_dims:
        return [entry]
    if not filters.split_4d:
        return [entry.reject("4d", f"4D image with {extra_dims[0]} volumes (split_4d off)")]
    return [ScanEntry(**{**asdict(entry), "case_id": f"{cid}_t{t:03d}", "volume_index": t})
            for t in range(extra_dims[0])]


def filters_from_dict(d: Iterable[tuple[str, Any]] | dict[str, Any]) -> ScanFilters:
    """Rebuild :class:`ScanFilters` from its dict form (lists become tuples)."""
    d = dict(d)
    if d.get("modalities") is not None:
        d["modalities"] = tuple(d["modalities"])
    return ScanFilters(**d)
