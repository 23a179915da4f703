"""Evaluate a folder of predicted NIfTI label maps against references: per-case CSV, summary JSON."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3d.metrics.labels import ROUND_TOL, LabelSet, load_labels, to_label_map
from s3d.metrics.outputs import OUTPUTS, FolderEvaluation, discard_evaluation, write_evaluation
from s3d.metrics.overlap import EmptyPolicy, as_policy, dice
from s3d.metrics.surface import nsd

__all__ = ["FolderEvaluation", "LabelSet", "discard_evaluation", "evaluate_case", "evaluate_folder", "load_labels",
           "write_evaluation"]

METRICS = ("dice", "nsd")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _check_tau(tau_mm: float | Mapping[str, float], labels: LabelSet) -> None:
    """Every class has a finite tolerance > 0 mm."""
    items = tau_mm.items() if isinstance(tau_mm, Mapping) else [(None, tau_mm)]
    for name, tau in items:
        try:
            ok = math.isfinite(float(tau)) and float(tau) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            where = "tau_mm" if name is None else f"tau_mm[{name!r}]"
            raise ValueError(f"{where} must be a tolerance > 0 mm, found {tau!r}")
    if isinstance(tau_mm, Mapping):
        for name in labels.classes:
            _tau_for(tau_mm, name)


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
        pred: (D, H, W) integer label map, the prediction (float values within ``ROUND_TOL`` = 1e-3 of an
            integer are rounded; NaN, other floats and labels ``labels`` does not define raise ``ValueError``).
        ref: (D, H, W) integer label map, the reference (checked the same way); voxels equal to
            ``labels.ignore_label`` are left out of every class in both maps.
        labels: a :class:`LabelSet` or the ``labels`` mapping of a dataset.json.
        spacing_mm: voxel spacing along (D, H, W), mm.
        tau_mm: NSD tolerance in mm (> 0), one for all classes or a mapping class name -> tolerance.
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
    _check_tau(tau_mm, labels)
    pred, _ = to_label_map(pred, labels, "prediction")
    ref, _ = to_label_map(ref, labels, "reference")
    return _class_metrics(pred, ref, labels, spacing_mm, tau_mm, empty)


def _class_metrics(pred: np.ndarray, ref: np.ndarray, labels: LabelSet, spacing_mm: Sequence[float],
                   tau_mm: float | Mapping[str, float], empty: EmptyPolicy | str) -> dict[str, dict[str, float]]:
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


def _list_cases(folder: Path, what: str) -> tuple[dict[str, Path], list[str]]:
    """``({case id: NIfTI path}, [names of the other files])``; hidden files and our outputs are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist" if not folder.exists()
                                else f"{what} folder {folder} is not a folder")
    cases: dict[str, Path] = {}
    ignored: list[str] = []
    for p in sorted(folder.iterdir()):
        cid = case_id(p)
        if p.name.startswith(".") or p.name in OUTPUTS:
            continue
        if cid is None or not p.is_file():
            ignored.append(p.name)
            continue
        if cid in cases:
            raise ValueError(f"{what} folder {folder}: case {cid!r} appears twice "
                             f"({cases[cid].name}, {p.name})")
        cases[cid] = p
    if not cases:
        raise ValueError(f"{what} folder {folder} holds no NIfTI files ({', '.join(NIFTI_SUFFIXES)})")
    return cases, ignored


@dataclass
class _CaseResult:
    case: str
    metrics: dict[str, dict[str, float]] | None = None
    error: str | None = None
    rounded: dict[str, int] = field(default_factory=dict)


def _evaluate_files(
    case: str, pred_path: Path, ref_path: Path, labels: LabelSet, tau_mm: Any, empty: str, atol: float
) -> _CaseResult:
    from s3d.data.io import read_nifti

    try:
        # the stored values (dtype=None), never a cast: casting 0.99999994 to int gives 0 and NaN gives INT_MIN
        pred, hp = read_nifti(pred_path, dtype=None)
        ref, hr = read_nifti(ref_path, dtype=None)
        if pred.shape != ref.shape:
            return _CaseResult(case, error=f"shape {pred.shape} of {pred_path} differs from reference "
                                           f"{ref_path} {ref.shape}")
        diff = float(np.abs(hp.affine - hr.affine).max())
        if diff > atol:
            return _CaseResult(case, error=f"affine of {pred_path} differs from reference {ref_path} (max abs "
                                           f"difference {diff:.4g} > {atol}); resample the prediction onto the "
                                           "reference grid")
        pred, n_pred = to_label_map(pred, labels, f"{pred_path} (prediction)")
        ref, n_ref = to_label_map(ref, labels, f"{ref_path} (reference)")
        rounded = {k: n for k, n in (("prediction", n_pred), ("reference", n_ref)) if n}
        return _CaseResult(case, _class_metrics(pred, ref, labels, hr.spacing_mm, tau_mm, empty), rounded=rounded)
    except (ValueError, OSError) as e:
        return _CaseResult(case, error=str(e))
    except Exception as e:  # noqa: BLE001 - one bad case never stops the batch
        return _CaseResult(case, error=f"{type(e).__name__}: {e} (an internal error while evaluating "
                                       f"{pred_path}; please report it)")


def _evaluate_job(job: tuple) -> _CaseResult:
    return _evaluate_files(*job)


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


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
    """Evaluate every reference case against the prediction with the same case id.

    A case whose files cannot be read, whose shape or affine differs from the reference, or whose label
    map holds NaN/Inf, non-integer values (further than ``ROUND_TOL`` = 1e-3 from an integer) or labels
    that ``labels`` does not define, is reported in ``errors`` under its case id, naming the file; the
    other cases are still evaluated. A reference without a prediction and a prediction without a
    reference are errors too. Float values within 1e-3 of an integer are rounded and counted in
    ``rounded``.

    Args:
        pred_dir: folder of predicted label maps (``CASE.nii.gz``).
        ref_dir: folder of reference label maps with the same names.
        labels: nnU-Net dataset.json path, its ``labels`` mapping, or a :class:`LabelSet`.
        tau_mm: NSD tolerance, mm (> 0; one value or per class name).
        out_dir: if given, an earlier ``per_case.csv``/``summary.json`` there is removed first and the new
            ones are written atomically at the end (:func:`write_evaluation`); it may be ``pred_dir`` but
            not be, lie inside or hold ``ref_dir``.
        workers: processes evaluating cases in parallel (1 = in this process).
        empty: empty-mask policy, see :class:`EmptyPolicy`.
        affine_atol: largest allowed absolute difference between the two affines (mm).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`FolderEvaluation`; ``summary`` holds the nanmean per class and the foreground mean
        (mean over classes of the class means).

    Raises:
        ValueError / FileNotFoundError: for the whole folder (missing or empty folder, no prediction named
            like any reference, bad ``tau_mm`` or ``labels``), naming the folder or argument.

    Example:
        >>> res = evaluate_folder("preds/", "labelsTr/", "dataset.json", tau_mm=2.0)  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    from s3d._optional import optional_import
    from s3d.runtime.progress import progress as progress_bar

    optional_import("nibabel", "reading NIfTI")  # before anything is touched; not once per case
    if out_dir is not None:
        from s3d._paths import check_apart, output_folder

        output_folder(out_dir, "output folder (out_dir)")
        check_apart(out_dir, "output folder (out_dir)", [(ref_dir, "reference folder")])
        discard_evaluation(out_dir)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, found {workers}")
    labels = labels if isinstance(labels, LabelSet) else load_labels(labels)
    _check_tau(tau_mm, labels)
    empty = as_policy(empty).value
    refs, _ = _list_cases(Path(ref_dir), "reference")
    preds, ignored = _list_cases(Path(pred_dir), "prediction")
    if not set(preds) & set(refs):
        raise ValueError(f"no prediction in {pred_dir} has the name of a reference in {ref_dir} (predictions: "
                         f"{_some(p.name for p in preds.values())}; references: "
                         f"{_some(p.name for p in refs.values())}); files are matched by name")
    errors = {c: f"no prediction for reference {refs[c]} in {pred_dir} (expected {c}.nii.gz or {c}.nii)"
              for c in refs if c not in preds}
    errors.update({c: f"{preds[c]} has no reference in {ref_dir} (expected {c}.nii.gz or {c}.nii); not evaluated"
                   for c in preds if c not in refs})
    jobs = [(c, preds[c], refs[c], labels, tau_mm, empty, affine_atol) for c in refs if c in preds]
    results: list[_CaseResult] = []
    bar = progress_bar(total=len(jobs), desc="evaluate", unit="case", enabled=progress)
    if workers == 1:
        for job in jobs:
            results.append(_evaluate_files(*job))
            bar.update()
    else:
        import contextlib

        from s3d._workers import map_in_processes

        # closing: a Ctrl-C that lands here, outside the generator, still ends (and waits for) the workers
        with contextlib.closing(map_in_processes(_evaluate_job, jobs, workers, ordered=False)) as done:
            for res in done:
                results.append(res)
                bar.update()
    bar.close()
    per_case, rounded = {}, {}
    for r in sorted(results, key=lambda r: r.case):
        if r.error is not None:
            errors[r.case] = r.error
        else:
            per_case[r.case] = r.metrics
            if r.rounded:
                rounded[r.case] = r.rounded
    summary = _summarise(per_case, errors, labels, tau_mm, empty)
    summary.update(round_tol=ROUND_TOL, rounded=rounded, ignored_files=ignored)
    result = FolderEvaluation(per_case, dict(sorted(errors.items())), summary, rounded)
    if out_dir is not None:
        write_evaluation(result, out_dir)
    return result


def _some(names, n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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
