"""Evaluate a folder of predicted NIfTI label maps against references: per-case CSV, summary JSON."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3d.metrics.overlap import EmptyPolicy, as_policy, dice
from s3d.metrics.surface import nsd

METRICS = ("dice", "nsd")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelSet:
    """Foreground classes to evaluate: name -> label values (a tuple of several = a region)."""

    classes: dict[str, tuple[int, ...]]
    ignore_label: int | None = None


def load_labels(labels: str | os.PathLike[str] | Mapping[str, Any]) -> LabelSet:
    """Read the ``labels`` of an nnU-Net ``dataset.json`` (or take that mapping directly).

    Values are ints or lists of ints (nnU-Net regions); ``background`` (0) is skipped and a key
    named ``ignore`` gives the ignore label.

    Example:
        >>> load_labels({"background": 0, "tumour": 1, "ignore": 2}).classes
        {'tumour': (1,)}
    """
    source = str(labels) if not isinstance(labels, Mapping) else "labels"
    if not isinstance(labels, Mapping):
        try:
            data = json.loads(Path(labels).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{labels}: cannot read dataset.json ({e})") from e
        if not isinstance(data, Mapping) or "labels" not in data:
            raise ValueError(f"{labels}: no 'labels' key (expected an nnU-Net dataset.json)")
        labels = data["labels"]
    classes: dict[str, tuple[int, ...]] = {}
    ignore = None
    for name, value in labels.items():
        values = tuple(value) if isinstance(value, list | tuple) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{source}: label {name!r} must be an int or a list of ints, found {value!r}")
        if name == "ignore":
            ignore = int(values[0])
        elif values != (0,):
            classes[str(name)] = tuple(int(v) for v in values)
    if not classes:
        raise ValueError(f"{source}: no foreground label found")
    return LabelSet(classes, ignore)


def _tau_for(tau_mm: float | Mapping[str, float], name: str) -> float:
    if isinstance(tau_mm, Mapping):
        if name not in tau_mm:
            raise ValueError(f"tau_mm has no tolerance for class {name!r} (has {sorted(tau_mm)})")
        return float(tau_mm[name])
    return float(tau_mm)


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: LabelSet | Mapping[str, Any],
    spacing_mm: Sequence[float],
    tau_mm: float | Mapping[str, float] = 2.0,
    empty: EmptyPolicy | str = EmptyPolicy.NAN,
) -> dict[str, dict[str, float]]:
    """Dice and NSD of every foreground class of one case.

    Args:
        pred: (D, H, W) integer label map, the prediction.
        ref: (D, H, W) integer label map, the reference; voxels equal to ``labels.ignore_label``
            are left out of every class in both maps.
        labels: a :class:`LabelSet` or the ``labels`` mapping of a dataset.json.
        spacing_mm: voxel spacing along (D, H, W), mm.
        tau_mm: NSD tolerance in mm, one for all classes or a mapping class name -> tolerance.
        empty: empty-mask policy, see :class:`EmptyPolicy`.

    Returns:
        ``{class_name: {"dice": float, "nsd": float, "n_ref": voxels, "n_pred": voxels}}``.

    Example:
        >>> seg = np.zeros((8, 8, 8), np.uint8); seg[2:6, 2:6, 2:6] = 1
        >>> evaluate_case(seg, seg, {"background": 0, "a": 1}, (1, 1, 1))["a"]["dice"]
        1.0
    """
    labels = labels if isinstance(labels, LabelSet) else load_labels(labels)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    valid = None if labels.ignore_label is None else ref != labels.ignore_label
    out: dict[str, dict[str, float]] = {}
    for name, values in labels.classes.items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        if valid is not None:
            p, r = p & valid, r & valid
        out[name] = {
            "dice": dice(p, r, empty),
            "nsd": nsd(p, r, spacing_mm, _tau_for(tau_mm, name), empty),
            "n_ref": float(np.count_nonzero(r)),
            "n_pred": float(np.count_nonzero(p)),
        }
    return out


def case_id(path: str | os.PathLike[str]) -> str | None:
    """The case id of a NIfTI file name (``case_001.nii.gz`` -> ``case_001``), else ``None``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _list_cases(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        cid = case_id(p)
        if cid is None or p.name.startswith("."):
            continue
        if cid in cases:
            raise ValueError(f"{what} folder {folder}: case {cid!r} appears twice "
                             f"({cases[cid].name}, {p.name})")
        cases[cid] = p
    return cases


def _evaluate_files(
    case: str, pred_path: Path, ref_path: Path, labels: LabelSet, tau_mm: Any, empty: str, atol: float
) -> tuple[str, dict[str, dict[str, float]] | None, str | None]:
    from s3d.data.io import read_nifti

    try:
        pred, hp = read_nifti(pred_path, dtype=np.int32)
        ref, hr = read_nifti(ref_path, dtype=np.int32)
        if pred.shape != ref.shape:
            return case, None, f"shape {pred.shape} of {pred_path.name} differs from reference {ref.shape}"
        diff = float(np.abs(hp.affine - hr.affine).max())
        if diff > atol:
            return case, None, (f"affine of {pred_path.name} differs from reference {ref_path.name} "
                                f"(max abs difference {diff:.4g} > {atol}); resample the prediction "
                                "onto the reference grid")
        return case, evaluate_case(pred, ref, labels, hr.spacing_mm, tau_mm, empty), None
    except (ValueError, OSError) as e:
        return case, None, str(e)


@dataclass
class FolderEvaluation:
    """Result of :func:`evaluate_folder`: per-case metrics, per-case errors and the summary."""

    per_case: dict[str, dict[str, dict[str, float]]]
    errors: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)

    def case_means(self, metric: str = "dice") -> dict[str, float]:
        """Foreground mean of ``metric`` per case (nanmean over classes; NaN if all classes are NaN)."""
        out = {}
        for case, classes in self.per_case.items():
            vals = np.array([c[metric] for c in classes.values()], dtype=float)
            out[case] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        return out

    def table(self) -> str:
        """The summary as a printable table."""
        lines = [f"{'class':<24}{'dice':>10}{'nsd':>10}"]
        for name, m in self.summary["mean"].items():
            lines.append(f"{name:<24}{_fmt(m['dice']):>10}{_fmt(m['nsd']):>10}")
        fg = self.summary["foreground_mean"]
        lines.append(f"{'foreground mean':<24}{_fmt(fg['dice']):>10}{_fmt(fg['nsd']):>10}")
        lines.append(f"{self.summary['n_cases']} cases evaluated, {len(self.errors)} failed")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def evaluate_folder(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    labels: str | os.PathLike[str] | Mapping[str, Any] | LabelSet,
    tau_mm: float | Mapping[str, float] = 2.0,
    out_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    empty: EmptyPolicy | str = EmptyPolicy.NAN,
    affine_atol: float = 1e-3,
    progress: bool = True,
) -> FolderEvaluation:
    """Evaluate every reference case that has a prediction with the same case id.

    A case whose files cannot be read, or whose shape or affine differs from the reference, is
    reported in ``errors`` under its case id; the other cases are still evaluated. A reference
    without a prediction is an error too.

    Args:
        pred_dir: folder of predicted label maps (``CASE.nii.gz``).
        ref_dir: folder of reference label maps with the same names.
        labels: nnU-Net dataset.json path, its ``labels`` mapping, or a :class:`LabelSet`.
        tau_mm: NSD tolerance, mm (one value or per class name).
        out_dir: if given, ``per_case.csv`` and ``summary.json`` are written there atomically.
        workers: processes evaluating cases in parallel (1 = in this process).
        empty: empty-mask policy, see :class:`EmptyPolicy`.
        affine_atol: largest allowed absolute difference between the two affines (mm).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`FolderEvaluation`; ``summary`` holds the nanmean per class and the foreground mean
        (mean over classes of the class means).

    Example:
        >>> res = evaluate_folder("preds/", "labelsTr/", "dataset.json", tau_mm=2.0)  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")
    labels = labels if isinstance(labels, LabelSet) else load_labels(labels)
    empty = as_policy(empty).value
    preds = _list_cases(Path(pred_dir), "prediction")
    refs = _list_cases(Path(ref_dir), "reference")
    if not refs:
        raise ValueError(f"reference folder {ref_dir} holds no NIfTI files")
    errors = {c: f"no prediction for this case in {pred_dir}" for c in refs if c not in preds}
    jobs = [(c, preds[c], refs[c], labels, tau_mm, empty, affine_atol) for c in refs if c in preds]
    results = []
    bar = tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress)
    if workers == 1:
        for job in jobs:
            results.append(_evaluate_files(*job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_evaluate_files, *job) for job in jobs]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update()
    bar.close()
    per_case = {}
    for case, metrics, err in results:
        if err is not None:
            errors[case] = err
        else:
            per_case[case] = metrics
    summary = _summarise(per_case, errors, labels, tau_mm, empty)
    result = FolderEvaluation(per_case, dict(sorted(errors.items())), summary)
    if out_dir is not None:
        write_evaluation(result, out_dir)
    return result


def _summarise(per_case, errors, labels: LabelSet, tau_mm, empty: str) -> dict[str, Any]:
    mean = {
        name: {m: _nanmean([per_case[c][name][m] for c in per_case]) for m in METRICS}
        for name in labels.classes
    }
    fg = {m: _nanmean([mean[n][m] for n in mean]) for m in METRICS}
    return {
        "n_cases": len(per_case),
        "tau_mm": dict(tau_mm) if isinstance(tau_mm, Mapping) else float(tau_mm),
        "empty_policy": empty,
        "mean": mean,
        "foreground_mean": fg,
        "errors": dict(sorted(errors.items())),
    }


def write_evaluation(result: FolderEvaluation, out_dir: str | os.PathLike[str]) -> None:
    """Write ``per_case.csv`` (one row per case and class) and ``summary.json`` atomically."""
    from s3d._fs import write_json_atomic, write_text_atomic

    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "dice", "nsd", "n_ref", "n_pred"])
    for case, classes in sorted(result.per_case.items()):
        for name, m in classes.items():
            writer.writerow([case, name, repr(m["dice"]), repr(m["nsd"]), int(m["n_ref"]), int(m["n_pred"])])
    write_text_atomic(out / "per_case.csv", buf.getvalue())
    write_json_atomic(out / "summary.json", _json_safe(result.summary))
