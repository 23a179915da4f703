"""One checkpoint format for every training job: atomic saves, the previous checkpoint kept, one
resume policy.

A run folder holds ``checkpoint_latest.pt`` and, from the second save on, ``checkpoint_previous.pt``
(the one before). A save writes a temporary file next to them, then renames: a kill at any moment
leaves the latest complete checkpoint (or the previous one) intact. Checkpoints hold tensors and
plain Python values only, so they load with ``torch.load(weights_only=True)``.

The payload (:func:`save_checkpoint` adds the first three keys)::

    {"format": "s3d-checkpoint", "version": 2, "job": "pretrain" | "finetune",
     "step": int, "model": state dict, "optimizer": ..., "scaler": ..., "rng": ...,
     "config": {...},              # the run's settings (JSON-able)
     "resume_fields": {...},       # the settings that must not change on resume
     ...}                          # job-specific entries

Resume policy (:func:`check_resume`): every entry of ``resume_fields`` (architecture, schedule,
steps, batch, seed, ...) must equal the new run's, otherwise the resume is refused with an error that
names each differing field; other settings (intervals, workers, progress) may change.

Example:
    >>> save_checkpoint("runs/a", {"step": 10, "model": net.state_dict(), "resume_fields": {"steps": 100}},
    ...                 job="finetune")
    >>> load_checkpoint("runs/a", job="finetune")["step"]
    10
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from s3d._fs import atomic_path

FORMAT = "s3d-checkpoint"
VERSION = 2
LATEST = "checkpoint_latest.pt"
PREVIOUS = "checkpoint_previous.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, of another job or format. The message names the file."""


class ResumeError(ValueError):
    """A resume with settings that differ from the checkpoint's; the message names every field."""


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoint_latest.pt``."""
    return Path(run_dir) / LATEST


def claim_run_folder(run_dir: str | os.PathLike[str], *, job: str, resume: bool, overwrite: bool,
                     exports: tuple[str, ...] = (), scratch: tuple[str, ...] = ()) -> None:
    """Refuse to start a new run over an earlier one's checkpoints or results unless asked to replace them.

    A folder holding ``checkpoint_latest.pt``/``checkpoint_previous.pt`` or one of ``exports`` (a finished
    run's results, e.g. ``model``) is an earlier run: a new run there needs ``resume`` (continue it) or
    ``overwrite`` (replace it). With ``overwrite`` its checkpoints, exports and ``scratch`` files (glob
    patterns of files the run writes, e.g. ``snapshots/step_*.png``) are removed first, so no file of the
    old run is ever taken for the new one's. Files s3d did not write are never touched.

    Args:
        run_dir: the run folder.
        job: ``"finetune"`` or ``"pretrain"`` (for the message).
        resume: the run continues from its checkpoint (nothing is refused or removed here).
        overwrite: replace an earlier run.
        exports: names (in ``run_dir``) of what a finished run exports.
        scratch: glob patterns (in ``run_dir``) of other files of a run, removed with ``overwrite``.

    Raises:
        s3d._paths.UsageError: ``resume`` and ``overwrite`` together.
        FileExistsError: an earlier run is there and neither ``resume`` nor ``overwrite`` is set; the
            message names what is there and both options.

    Example:
        >>> claim_run_folder("runs/a", job="finetune", resume=False, overwrite=False, exports=("model",))
    """
    import shutil

    from s3d._paths import UsageError

    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the earlier run, or replace it")
    run_dir = Path(run_dir)
    if resume or not run_dir.is_dir():
        return
    found = [n for n in (LATEST, PREVIOUS, *exports) if (run_dir / n).exists()]
    if not found and not overwrite:
        return
    if not overwrite:
        finished = [n for n in exports if n in found]
        what = (f"the results of a finished {job} run ({', '.join(f'{n}/' for n in finished)})" if finished
                else f"the checkpoint of an earlier {job} run ({found[0]})")
        raise FileExistsError(f"{run_dir} holds {what}: pass --resume to continue it, --overwrite to replace it "
                              "(its checkpoints and results are removed first), or choose a new run folder (--out)")
    for name in found:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    for pattern in scratch:
        for p in run_dir.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()


def save_checkpoint(run_dir: str | os.PathLike[str], state: dict[str, Any], *, job: str) -> Path:
    """Write ``state`` as ``run_dir/checkpoint_latest.pt``; the one it replaces becomes ``checkpoint_previous.pt``.

    Args:
        run_dir: the run folder (created if missing).
        state: tensors and plain values; should hold ``step`` and ``resume_fields``.
        job: ``"pretrain"`` or ``"finetune"``; :func:`load_checkpoint` checks it.

    Returns:
        The path written.

    Raises:
        OSError: the folder is not writable or the disk is full; the message names the path and the
            previous checkpoint is untouched.

    Example:
        >>> save_checkpoint("runs/a", {"step": 1, "model": {}}, job="pretrain")
        PosixPath('runs/a/checkpoint_latest.pt')
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    payload = {"format": FORMAT, "version": VERSION, "job": job, **state}
    try:
        with atomic_path(latest) as tmp:
            torch.save(payload, tmp)
            if latest.exists():  # keep the last good one; the new one is complete before the rename
                os.replace(latest, previous)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (full disk, size limit) as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise OSError(getattr(e, "errno", None), f"cannot write checkpoint {latest} ({reason}): free disk space "
                      f"or make {run_dir} writable (the previous checkpoint is kept)") from e
    return latest


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle, ...: the file is unusable either way
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an s3d checkpoint (holds a {type(state).__name__})")
    return state


def load_checkpoint(run_dir: str | os.PathLike[str], *, job: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the latest checkpoint of ``run_dir`` (``torch.load(weights_only=True)``) and check it.

    When ``checkpoint_latest.pt`` is missing but ``checkpoint_previous.pt`` exists (a kill between
    the two renames of a save), the previous one is used.

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
        CheckpointError: the file is damaged, of another format or of another job; when the
            previous checkpoint is intact the message says how to resume from it.

    Example:
        >>> load_checkpoint("runs/a", job="pretrain")["step"]
        1000
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    path = latest if latest.is_file() else previous
    if not path.is_file():
        raise FileNotFoundError(f"{latest}: no checkpoint to resume from; start without --resume")
    try:
        state = _read(path, map_location)
        _check_kind(path, state, job)
    except CheckpointError as e:
        hint = ""
        if path == latest and previous.is_file():
            with contextlib.suppress(CheckpointError):
                prev = _read(previous, "cpu")
                _check_kind(previous, prev, job)
                hint = (f"; the previous checkpoint {previous} (step {prev.get('step')}) is intact: "
                        f"move it onto {latest} and resume again")
        raise CheckpointError(f"{e}{hint or '; start a new run folder'}") from None
    return state


def _check_kind(path: Path, state: dict[str, Any], job: str) -> None:
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an s3d checkpoint (format {state.get('format')!r}, "
                              f"expected {FORMAT!r} version {VERSION})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, this s3d reads "
                              f"version {VERSION}")
    if state.get("job") != job:
        raise CheckpointError(f"{path}: a {state.get('job')} checkpoint, not a {job} one; check --out")


def check_resume(saved: dict[str, Any], now: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every differing field.

    Args:
        saved: the checkpoint's ``resume_fields``.
        now: the same fields of the run being resumed.
        path: the checkpoint (for the message).

    Raises:
        ResumeError: listing ``field: checkpoint X, now Y`` for each difference.

    Example:
        >>> check_resume({"steps": 100}, {"steps": 200}, "run/checkpoint_latest.pt")
        Traceback (most recent call last):
        ResumeError: run/checkpoint_latest.pt: cannot resume with different settings (steps: checkpoint 100, ...
    """
    keys = sorted(set(saved) | set(now))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diff:
        raise ResumeError(f"{path}: cannot resume with different settings ({'; '.join(diff)}); "
                          "resume with the original settings or start a new run folder")
