"""Where s3d reads and writes: folders given as arguments, names taken from metadata, outputs apart from inputs.

Three rules, one function each, used by every command and by the Python API alike:

- a folder argument is a folder (:func:`input_folder`, :func:`output_folder`): a file where a
  folder is expected, or the other way round, is one error that names the path and says what it found;
- a name that comes from a file (``dataset.json``, ``preprocessing.json``, ``config.json``, a manifest,
  a checkpoint) is checked before it becomes part of a path (:func:`safe_name`, :func:`safe_relative`,
  :func:`check_file_ending`): a model folder from the internet never chooses where s3d writes;
- an output never overlaps an input (:func:`check_apart`): not the same folder, not inside it, not
  around it (symbolic links resolved).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

#: the NIfTI endings s3d reads and writes (nnU-Net's ``file_ending`` values for NIfTI)
FILE_ENDINGS = (".nii.gz", ".nii")


class UsageError(ValueError):
    """An argument the caller gave is wrong, found before any input is read or any output written.

    The ``s3d`` command exits with 2 for it (as for an option value argparse refuses).
    """


def _describe(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    return "neither a file nor a folder" if path.exists() else "missing"


def input_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a folder to read, or an error naming it and what is there instead.

    Args:
        path: the folder.
        what: what the caller calls it in messages, e.g. ``"input folder"`` or ``"-i/--input"``.

    Raises:
        FileNotFoundError: nothing is there.
        NotADirectoryError: a file (or something else) is there.

    Example:
        >>> input_folder("imagesTs", "input folder")
        PosixPath('imagesTs')
    """
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        found = "a broken symbolic link" if path.is_symlink() else "nothing is there"
        raise FileNotFoundError(f"{path}: {what} not found ({found})")
    raise NotADirectoryError(f"{path}: {what} is {_describe(path)}, not a folder; pass the folder that holds it"
                             + (f" ({path.parent})" if path.is_file() else ""))


def output_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a folder to write (it may not exist yet), or an error naming the path in the way.

    A file at ``path`` or at one of its parents is refused before anything is written; an existing
    folder must be writable.

    Raises:
        FileExistsError: a file (or something that is not a folder) is at ``path`` or a parent.
        PermissionError: ``path`` (or the first existing parent) cannot be written.

    Example:
        >>> output_folder("predictions", "output folder")
        PosixPath('predictions')
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            where = "" if p == path else f" (in the way of {path})"
            raise FileExistsError(f"{p}: {what} is {_describe(p)}{where}, not a folder; remove it or choose "
                                  "another folder")
    else:  # pragma: no cover - the root always exists
        p = path
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"{p}: cannot write the {what} {path} (permission denied); make it writable or "
                              "choose another folder")
    return path


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def check_apart(output: str | os.PathLike[str], what: str,
                inputs: Sequence[tuple[str | os.PathLike[str] | None, str]]) -> None:
    """Refuse an output folder that is an input, lies inside one or holds one.

    Paths are compared after resolving symbolic links, so a link to the input folder is the input
    folder.

    Args:
        output: the folder s3d will write.
        what: what the caller calls it, e.g. ``"output folder"``.
        inputs: ``(path, what)`` of every input (a folder or a file; ``None`` entries are skipped).

    Raises:
        UsageError: naming both paths and what to do.

    Example:
        >>> check_apart("imagesTs", "output folder", [("imagesTs", "input folder")])
        Traceback (most recent call last):
        s3d._paths.UsageError: imagesTs: the output folder is the input folder imagesTs; s3d never writes ...
    """
    out = _resolved(output)
    for given, name in inputs:
        if given is None:
            continue
        inp = _resolved(given)
        if out == inp:
            how = f"is the {name} {given}"
        elif _inside(out, inp):
            how = f"is inside the {name} {given}"
        elif _inside(inp, out):
            how = f"holds the {name} {given}"
        else:
            continue
        raise UsageError(f"{output}: the {what} {how}; s3d never writes among its inputs: choose a folder "
                         f"apart from the {name}")


def safe_name(name: object, what: str, source: str | os.PathLike[str]) -> str:
    """A name from a file, checked to be usable as one path component (a file or folder name).

    Refused: anything but a non-empty string; ``.`` and ``..``; a path separator (``/`` or ``\\``);
    a NUL or other control character; a leading or trailing space.

    Args:
        name: the value read from the file.
        what: what it is, e.g. ``"case id"``.
        source: the file it was read from (named in the message).

    Raises:
        ValueError: naming ``source``, ``what`` and the value.

    Example:
        >>> safe_name("case_001", "case id", "split.json")
        'case_001'
    """
    problem = ""
    if not isinstance(name, str) or not name:
        problem = "is not a non-empty string"
    elif name in (".", ".."):
        problem = "is a relative folder reference"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "holds a control character"
    elif name != name.strip():
        problem = "starts or ends with a space"
    if problem:
        raise ValueError(f"{source}: {what} {name!r} {problem}; a name from a file may only be a plain file "
                         "name (s3d never lets a file choose where it writes)")
    return name


def safe_relative(path: object, what: str, source: str | os.PathLike[str], base: str | os.PathLike[str]) -> Path:
    """A relative path from a file (e.g. a manifest's ``cases/x.b2nd``), checked to stay inside ``base``.

    Returns:
        ``base / path``.

    Raises:
        ValueError: an absolute path, a ``..`` component, a drive, or any component :func:`safe_name`
            refuses; the message names ``source``.

    Example:
        >>> safe_relative("cases/a.b2nd", "file", "prep/manifest.json", "prep")
        PosixPath('prep/cases/a.b2nd')
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"{source}: {what} {path!r} is not a non-empty relative path")
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise ValueError(f"{source}: {what} {path!r} is an absolute path; expected a path inside {base}")
    for part in PurePosixPath(path).parts:
        safe_name(part, f"{what} {path!r}: component", source)
    return Path(base) / path


def check_file_ending(ending: object, source: str | os.PathLike[str] | None = None, key: str = "file_ending") -> str:
    """A ``file_ending`` from ``dataset.json`` or ``preprocessing.json``: one of :data:`FILE_ENDINGS`.

    Args:
        ending: the value read.
        source: the file it was read from (named in the message), or ``None``.
        key: the key's name in the file.

    Raises:
        ValueError: naming ``source``, the key and the value.

    Example:
        >>> check_file_ending(".nii.gz", "preprocessing.json")
        '.nii.gz'
    """
    if ending not in FILE_ENDINGS:
        where = f"{source}: " if source is not None else ""
        raise ValueError(f"{where}{key} {ending!r} is not supported; use one of {', '.join(FILE_ENDINGS)} (s3d "
                         "never builds a path from any other value)")
    return str(ending)
