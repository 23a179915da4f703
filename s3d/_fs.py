"""Atomic file writes: a half-written file never replaces a good one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary file keeps ``path``'s suffixes (``.nii.gz`` stays ``.nii.gz``) so writers that
    pick a format from the name work. If the body raises, the temporary file is removed and
    ``path`` is untouched.

    Example:
        >>> with atomic_path("out/model.safetensors") as tmp:
        ...     save_file(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    # SIGTERM (which s3d turns into SystemExit to clean up) is held back while the temporary is created
    # and not yet known here; delivered when the mask is restored, it finds the name set and removes it
    mask = getattr(signal, "pthread_sigmask", None)
    tmp_path: Path | None = None
    try:
        old = mask(signal.SIG_BLOCK, {signal.SIGTERM}) if mask else None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
        finally:
            if mask:
                mask(signal.SIG_SETMASK, old)
        yield tmp_path
        os.chmod(tmp_path, _file_mode(path))
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        raise


def _file_mode(path: Path) -> int:
    """The mode a new file at ``path`` gets: the old file's, else 0o666 less the umask (as ``open``)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
