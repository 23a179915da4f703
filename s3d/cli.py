"""The ``s3d`` command line.

Every sub-command lives in its own module under :mod:`s3d.commands` and exposes
``register(subparsers)``; this file only discovers and dispatches them, so adding a
command never touches this file. Heavy imports happen inside each command's handler,
which keeps ``s3d --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from s3d._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command of :mod:`s3d.commands` registered."""
    import s3d.commands as commands

    parser = argparse.ArgumentParser(
        prog="s3d",
        description="Sparse MAE pre-training and fine-tuning of ResEnc U-Nets for 3D medical images.",
    )
    parser.add_argument("--version", action="version", version=f"s3d {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"s3d.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``s3d`` console script; returns the process exit code.

    A command that fails prints one line, ``s3d COMMAND: error: ...`` (naming the file, key or
    argument), and exits 1; a usage error exits 2. ``--debug`` (anywhere on the command line) or
    ``S3D_DEBUG=1`` shows the Python traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("S3D_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            raise
        print(f"s3d {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 1
    return int(rc or 0)


def error_line(e: BaseException) -> str:
    """The message for an exception: its text (a list of problems keeps its lines), prefixed with the
    file of an ``OSError`` that does not name it; an exception that is not one a user can cause gets its
    type and a pointer to ``--debug``.

    Example:
        >>> error_line(FileNotFoundError("in/: input folder not found"))
        'in/: input folder not found'
    """
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    user = (ValueError, OSError, KeyError, ImportError, TypeError, FloatingPointError)
    if not isinstance(e, user):
        text = f"{type(e).__name__}: {text} (an internal error; run again with --debug for the traceback)"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
