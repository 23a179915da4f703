"""The ``s3d`` command line.

Every sub-command lives in its own module under :mod:`s3d.commands` and exposes
``register(subparsers)``; this file only discovers and dispatches them, so adding a
command never touches this file. Heavy imports happen inside each command's handler,
which keeps ``s3d --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"s3d.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``s3d`` console script; returns the process exit code."""
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
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
