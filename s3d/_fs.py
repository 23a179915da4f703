"""Atomic file writes: a half-written file never replaces a good one; a full disk is called a full disk."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import tempfile
from collections.abc import Collection, Iterator
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
    except BaseException as e:
        written = 0
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                written = tmp_path.stat().st_size
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        full = disk_full(e, path.parent, written) if isinstance(e, Exception) else None
        if full and not isinstance(e, DiskFullError):
            # a library's own words for it ("unexpected pos 128 vs 0", "Error while creating the NDArray")
            raise DiskFullError(path, full) from e
        raise


class DiskFullError(OSError):
    """A write found no room (full disk, quota, file-size limit); the message names the file and what to do.

    ``strerror`` is the short reason (``"no space left on device"``), ``filename`` the file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(errno.ENOSPC, reason, str(path))

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror}; free disk space or write elsewhere (an earlier "
                f"{Path(self.filename).name}, if any, is kept)")


#: errno values that mean "no room to write": a full disk, a full quota, a file-size limit
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the file system or the process's file size limit"}
_NO_ROOM_TEXT = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
                 "disk quota exceeded": errno.EDQUOT, "file too large": errno.EFBIG}


def disk_full(exc: BaseException, folder: str | os.PathLike[str], written_bytes: int = 0) -> str | None:
    """Why a failed write had no room (``"no space left on device"``, ...), or ``None`` if it had.

    Libraries report a full disk in their own words (safetensors: "I/O error: No space left on device
    (os error 28)"; torch: "unexpected pos 128 vs 0"; blosc2: "Error while creating the NDArray"), so
    this looks at the errno and the text of the exception and its causes, and, as a last resort, at the
    limits: a write that had grown to (nearly) the process's file size limit or all the free space, or a
    folder with under 1 MiB free.

    Args:
        exc: what the write raised.
        folder: where it wrote.
        written_bytes: how large the (removed) partial file had grown.

    Example:
        >>> disk_full(OSError(28, "No space left on device"), "out")
        'no space left on device'
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            return _NO_ROOM[e.errno]
        text = str(e).lower()
        for needle, code in _NO_ROOM_TEXT.items():
            if needle in text:
                return _NO_ROOM[code]
        e = e.__cause__ or e.__context__
    if isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written_bytes > 0 and written_bytes + (1 << 20) >= limit:
            return _NO_ROOM[errno.EFBIG]
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    free = st.f_bavail * st.f_frsize
    if free < 1 << 20 or (written_bytes > 0 and written_bytes + (1 << 20) >= free):
        return f"no space left on device ({free // 1024} kB free in {folder})"
    return None


def probe_writable(folder: str | os.PathLike[str]) -> None:
    """Create and remove a hidden empty file in ``folder``: an ``OSError`` now instead of after the work.

    Example:
        >>> probe_writable("predictions")
    """
    fd, tmp = tempfile.mkstemp(prefix=".s3d-probe-", dir=folder)
    os.close(fd)
    os.unlink(tmp)


def _file_mode(path: Path) -> int:
    """The mode a new file at ``path`` gets: the old file's, else 0o666 less the umask (as ``open``)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary folder next to ``path``; on success it replaces ``path`` as a whole.

    For a folder whose files must agree with each other (a model: weights, ``config.json``,
    ``preprocessing.json``): readers see the old folder or the new one, never a mix. If the body raises,
    the temporary folder is removed and ``path`` is untouched. Leftovers of a killed run
    (``.{name}.partial-*``, ``.{name}.old-*``) are removed first.

    Example:
        >>> with atomic_folder("runs/a/model") as tmp:
        ...     save_pretrained(model, tmp)
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.partial-*"), *path.parent.glob(f".{path.name}.old-*")]:
        if path.exists() or ".partial-" in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\..+)$")


def sweep_temporaries(folder: str | os.PathLike[str], names: Collection[str] | None = None) -> list[Path]:
    """Remove the temporaries :func:`atomic_path` left in ``folder`` when its process was killed; returns them.

    Only hidden files named as :func:`atomic_path` names them (``.{name}.XXXXXXXX{suffixes of name}``);
    with ``names``, only the temporaries of those final file names (another process may be writing the
    others).

    Example:
        >>> sweep_temporaries("prep/cases")
        [PosixPath('prep/cases/.a.b2nd.k2j4x9_a.b2nd')]
    """
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            m = _TEMPORARY_RE.match(p.name)
            if m and (m["name"].endswith(m["suffix"]) or m["suffix"] == ".tmp") and p.is_file() \
                    and (names is None or m["name"] in names):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
