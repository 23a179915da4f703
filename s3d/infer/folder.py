"""A folder of cases: predict every usable one, report the rest, leave nothing stale or half-written.

:func:`predict_folder` (``s3d.predict``, ``s3d predict``) goes through the whole batch: a case it
cannot read or use is skipped and reported (case, file, reason) in ``OUT/failures.json`` and in the
:class:`BatchPredictionError` raised at the end; every other case is predicted. Outputs of an earlier
run for a case that now fails are removed, so nothing in ``OUT`` looks current that is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from s3d._fs import disk_full, probe_writable
from s3d._optional import optional_import
from s3d._paths import check_apart, input_folder, output_folder
from s3d.infer.cases import check_patch_size, check_prediction_args, load_model_dir, predict_case
from s3d.infer.inputs import CaseError, CaseFailure, scan_input_folder
from s3d.infer.outputs import sweep_partial
from s3d.infer.sliding_window import SlidingWindowInferer
from s3d.runtime.device import resolve_device
from s3d.runtime.progress import progress as progress_bar

#: the failures report a batch with failures writes into its output folder (removed by a clean run)
FAILURES_FILE = "failures.json"


class PredictionNote(UserWarning):
    """A case was predicted under a documented policy (e.g. a constant channel), or an input was ignored."""


class BatchPredictionError(ValueError):
    """Some inputs of a batch could not be predicted; every other case was.

    Attributes:
        written: the label files written.
        failures: one :class:`~s3d.infer.inputs.CaseFailure` per problem.
        report_path: ``OUT/failures.json``.
        notes: policy notes (constant channels, ignored files).
    """

    def __init__(self, message: str, written: list[Path], failures: list[CaseFailure], report_path: Path,
                 notes: list[str]) -> None:
        super().__init__(message)
        self.written, self.failures, self.report_path, self.notes = written, failures, report_path, notes


def predict_folder(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    inferer: SlidingWindowInferer | None = None,
    device: torch.device | str | None = "auto",
    patch_size: Sequence[int] | None = None,
    save_probabilities: bool = False,
    progress: bool = True,
    **options: Any,
) -> list[Path]:
    """Predict every case of ``input_dir`` with the model in ``model_dir``; write label NIfTIs.

    Input: nnU-Net naming, ``{case}_{XXXX}.nii.gz`` (or ``.nii``) with one file per channel (XXXX =
    0000, 0001, ...). Output: ``output_dir/{case}{file_ending}`` (labels, same shape, affine and
    header as the case's first channel file) and, with ``save_probabilities``, ``output_dir/{case}.npz``
    (``probabilities`` (K, D, H, W) float32, ``labels``, ``regions``), the two written as a pair. A
    model directory is :func:`s3d.hub.save_pretrained` output (``model.safetensors`` +
    ``config.json``) plus ``preprocessing.json``.

    A case that cannot be read or used is skipped; at the end the failures (case, file, reason) are
    written to ``output_dir/failures.json`` and raised as :class:`BatchPredictionError`. A run without
    failures removes an old ``failures.json``. Cases predicted under a documented policy (a constant
    channel) or ignored entries give a :class:`PredictionNote` warning.

    Args:
        input_dir: folder of input NIfTI files.
        output_dir: created if missing; existing predictions are replaced (atomically); temporaries of
            an interrupted run are removed first.
        model_dir: see above.
        inferer: how every case is predicted (:class:`~s3d.infer.SlidingWindowInferer`; its ``output`` is
            ignored); ``None``: one of ``patch_size`` and ``options``, on ``device``.
        device: where the model is loaded (and runs): ``"auto"`` (CUDA if available), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``...; an ``inferer`` with a device of its own uses that one (another
            ``device`` given with it is an error).
        patch_size: tile size (voxels) when no ``inferer`` is given; default ``preprocessing.json``'s
            ``patch_size``.
        save_probabilities: also write ``{case}.npz`` (without it, an old ``{case}.npz`` is removed when
            ``{case}``'s new label map is written).
        progress: a tqdm bar over cases (and, without an ``inferer``, one over each case's tiles).
        **options: :class:`~s3d.infer.SlidingWindowInferer` settings when no ``inferer`` is given (``step``,
            ``mirror``, ``tile_batch``, ``accumulate_device``, ``accumulate_limit_bytes``, ``amp``); ``mirror``
            defaults to ``True`` here: all three axes (8 passes per tile), as nnU-Net's default for 3D models;
            ``False`` for speed.

    Returns:
        Paths of the label files written, in case order.

    Every argument, the folders and the model folder (as a whole: weights, ``config.json`` and
    ``preprocessing.json`` agree) are checked before any case is read or any output written. The
    output folder may not be, lie inside or hold the input folder or the model folder. An earlier
    run's prediction of a case is replaced (atomically) and a note says how many were.

    Raises:
        s3d._paths.UsageError: a bad argument, or an output folder that overlaps an input (the
            ``s3d`` command exits 2); nothing is read or written.
        FileNotFoundError / NotADirectoryError / FileExistsError / ValueError: the model directory, the
            patch size, the input folder (no usable case at all) or the output folder is wrong; nothing
            in ``output_dir`` is touched.
        OSError: the output folder cannot be written, or the disk is full (the predictions written so
            far are complete and kept).
        MissingDependency: nibabel is not installed (an ``ImportError`` naming it); nothing is touched.
        BatchPredictionError: after the batch, when any input failed (the others were predicted).

    Example:
        >>> s3d.predict("imagesTs", "predictions", "runs/Dataset001/model")
        [PosixPath('predictions/case_001.nii.gz'), ...]
    """
    optional_import("nibabel", "reading NIfTI")  # before anything is read or written
    if inferer is not None and (patch_size is not None or options):
        raise TypeError(f"predict_folder: give an inferer or its settings, not both (got inferer and "
                        f"{sorted([*options, *(['patch_size'] if patch_size is not None else [])])})")
    checked = ("step", "mirror", "tile_batch", "amp", "accumulate_device", "accumulate_limit_bytes")
    check_prediction_args(device=device, patch_size=patch_size, **{k: v for k, v in options.items() if k in checked})
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    input_folder(input_dir, "input folder")
    output_folder(output_dir, "output folder")
    check_apart(output_dir, "output folder", [(input_dir, "input folder"), (model_dir, "model folder")])
    dev = resolve_device(device if inferer is None or inferer.device is None else inferer.device)
    if inferer is not None and inferer.device is not None and device not in (None, "auto") \
            and resolve_device(device) != dev:
        raise TypeError(f"predict_folder: device={str(device)!r} but inferer.device={str(inferer.device)!r}; "
                        "give one of them")
    model, spec = load_model_dir(model_dir, device=dev)
    if inferer is None:
        source = "patch_size" if patch_size is not None else f"{model_dir / 'preprocessing.json'}: patch_size"
        patch = check_patch_size(patch_size if patch_size is not None else spec.patch_size, model, source)
        inferer = SlidingWindowInferer(patch, **{"mirror": True, "device": dev, "progress": progress, **options})
    else:
        check_patch_size(inferer.patch_size, model, "inferer.patch_size")
    scan = scan_input_folder(input_dir, len(spec.channel_names), spec.file_ending)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(output_dir)
    except OSError as e:
        raise OSError(e.errno, f"{output_dir}: cannot write the output folder ({e.strerror or e}); make it "
                      "writable or choose another") from None
    sweep_partial(output_dir)
    report_path = output_dir / FAILURES_FILE
    report_path.unlink(missing_ok=True)  # from an earlier run: it never describes this one

    notes = [f"{p}: {'a folder' if p.is_dir() else 'not a NIfTI file'}; ignored" for p in scan.ignored]
    for n in notes:
        warnings.warn(n, PredictionNote, stacklevel=2)
    failures: list[CaseFailure] = []
    for problem in scan.problems:
        if problem.case is not None:
            problem.removed = _remove_outputs(output_dir, problem.case, spec.file_ending)
        failures.append(problem)
    written: list[Path] = []
    replaced: list[str] = []
    with _sigterm_raises_systemexit():
        for case, paths in progress_bar(scan.cases.items(), desc="predict", unit="case", enabled=progress):
            out, npz = output_dir / f"{case}{spec.file_ending}", output_dir / f"{case}.npz"
            earlier = [str(q) for q in (out, npz) if q.is_file()]
            try:
                if not save_probabilities:
                    npz.unlink(missing_ok=True)  # an old .npz must not sit next to a new label map
                pred = predict_case(paths, model, spec, inferer=inferer, output_path=out,
                                    probabilities_path=npz if save_probabilities else None)
            except Exception as e:  # noqa: BLE001 - one case never stops the batch; it is reported below
                full = disk_full(e, output_dir)
                if full:  # not the case's fault, and every later case would fail the same way
                    raise OSError(f"{out}: cannot write the prediction ({full}); free disk space or choose "
                                  f"another output folder; the {len(written)} prediction(s) written so far are "
                                  "complete") from e
                file, reason = _blame(e, paths, output_dir)
                _remove_outputs(output_dir, case, spec.file_ending)
                failures.append(CaseFailure(case, file, reason, earlier))
                continue
            written.append(out)
            if earlier:
                replaced.append(out.name)
            for n in pred.notes:
                notes.append(f"{case}: {n}")
                warnings.warn(f"{case}: {n}", PredictionNote, stacklevel=2)
    if replaced:
        some = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
        note = f"{output_dir}: replaced {len(replaced)} prediction(s) of an earlier run ({some})"
        notes.append(note)
        warnings.warn(note, PredictionNote, stacklevel=2)
    if not failures:
        return written

    from s3d._fs import write_json_atomic

    n_cases = len(scan.cases) + len({p.case for p in scan.problems if p.case is not None})
    write_json_atomic(report_path, {
        "input": str(input_dir), "output": str(output_dir), "model": str(model_dir),
        "cases": n_cases, "predicted": len(written), "failed": len(failures),
        "failures": [dataclasses.asdict(f) for f in failures], "notes": notes})
    lines = []
    for f in failures:
        removed = f" (removed the earlier run's {', '.join(Path(r).name for r in f.removed)})" if f.removed else ""
        lines.append(f"  - {f.case if f.case is not None else '(no case)'}: {f.file}: {f.reason}{removed}")
    message = (f"{len(failures)} input problem(s); predicted {len(written)} of {n_cases} case(s); "
               f"the failures are listed in {report_path}:\n" + "\n".join(lines))
    raise BatchPredictionError(message, written, failures, report_path, notes)


def _remove_outputs(output_dir: Path, case: str, file_ending: str) -> list[str]:
    """Remove the outputs an earlier run wrote for ``case`` (files only: a folder in the way is not ours);
    returns the paths removed."""
    removed = []
    for p in (output_dir / f"{case}{file_ending}", output_dir / f"{case}.npz"):
        if p.is_file() or p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(str(p))
    return removed


def _blame(e: Exception, paths: Sequence[Path], output_dir: Path | None = None) -> tuple[str, str]:
    """(file at fault, reason) for a failed case: an output that could not be written (e.g. a folder where
    the label map goes), else the file the message names, else the first channel file."""
    if isinstance(e, CaseError):
        return e.file, e.reason
    if isinstance(e, OSError) and output_dir is not None:
        for name in (e.filename2, e.filename):
            if name and Path(name).parent.resolve() == output_dir.resolve():
                out = Path(name)
                if out.name.startswith("."):  # a temporary: blame the file it was renamed onto
                    out = Path(e.filename2 or name)
                return str(out), f"cannot write the output ({e.strerror or e}); remove or move what is in the way"
    text = str(e).strip() or type(e).__name__
    if not isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {text}"
        if isinstance(e, torch.OutOfMemoryError):
            text += " (try a smaller --tile-batch or --patch-size)"
    for p in paths:
        if text.startswith(f"{p}: "):
            return str(p), text[len(f"{p}: "):]
    for p in paths:
        if str(p) in text:
            return str(p), text
    return str(paths[0]), text


@contextlib.contextmanager
def _sigterm_raises_systemexit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` so that ``finally`` blocks remove temporary files.

    Only in the main thread and only where SIGTERM has its default action (a handler of the caller's
    stays in charge).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
