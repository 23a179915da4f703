"""The ``s3d`` command line.

Every sub-command lives in its own module under :mod:`s3d.commands` and exposes
``register(subparsers)``; this file only discovers and dispatches them, so adding a
command never touches this file. Heavy imports happen inside each command's handler,
which keeps ``s3d --help`` fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import FrameType

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
    argument), and exits 1; a usage error exits 2 (argparse's, or an argument s3d refuses before
    any work, :class:`s3d._paths.UsageError`). ``--debug`` (anywhere on the command line) or
    ``S3D_DEBUG=1`` shows the Python traceback instead. Ctrl-C (SIGINT) at any moment prints one
    line, ``s3d COMMAND: interrupted``, and exits 130; worker processes and threads stay quiet.
    """
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("S3D_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    interrupts = _Interrupts() if as_program else None
    if as_program:  # a file name that is not valid UTF-8 is printed escaped, never an error after the work
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        command = args.command
        if interrupts is not None and command not in _WITHOUT_TORCH:
            interrupts.import_quietly("torch")
        rc = int(args.func(args) or 0)
        if interrupts is not None and interrupts.seen:  # a library swallowed the KeyboardInterrupt
            return _interrupted(command, as_program)
        return rc
    except KeyboardInterrupt:
        return _interrupted(command, as_program)
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            raise
        from s3d._paths import UsageError

        print(f"s3d {command}: error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


#: commands that never import torch (the others import it first, see :meth:`_Interrupts.import_quietly`)
_WITHOUT_TORCH = frozenset({"evaluate"})


class _Interrupts:
    """SIGINT as the ``s3d`` program sees it: raised as ``KeyboardInterrupt`` and remembered.

    A library that turns the ``KeyboardInterrupt`` raised inside its own import into another error and
    catches that (torch's optional CUDA bindings do) would otherwise lose the Ctrl-C; ``seen`` keeps it.

    It is never raised inside code that ``exec()`` or ``eval()`` runs from source text (``dataclasses``
    and ``namedtuple`` do that while modules import): CPython then marks the interrupt as unhandled even
    though :func:`main` catches it, and ends the process by SIGINT after it has cleaned up, instead of
    with exit 130. There it is raised a moment later (every 10 ms), once that code has returned.
    """

    def __init__(self) -> None:
        import signal
        import threading

        self.seen = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        if _inside_exec_of_source(frame):
            import _thread
            import signal
            import threading

            if hasattr(signal, "pthread_kill"):  # a real signal: it also ends a blocking wait
                again = lambda: signal.pthread_kill(threading.main_thread().ident, signum)  # noqa: E731
            else:
                again = lambda: _thread.interrupt_main(signum)  # noqa: E731
            later = threading.Timer(0.01, again)
            later.daemon = True
            later.start()
            return
        raise KeyboardInterrupt

    def import_quietly(self, module: str) -> None:
        """Import ``module`` with SIGINT held back; a Ctrl-C meanwhile is raised right after it."""
        import importlib
        import signal

        if module in sys.modules or not hasattr(signal, "pthread_sigmask"):
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the command that needs it says so
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _inside_exec_of_source(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller below :func:`main` runs code that ``exec()``/``eval()`` compiled from
    a string (its file name is ``<string>``)."""
    while frame is not None and frame.f_code is not main.__code__:
        if frame.f_code.co_filename == "<string>":
            return True
        frame = frame.f_back
    return False


def _interrupted(command: str | None, as_program: bool) -> int:
    """Ctrl-C: one line, exit 130. As the program, a second Ctrl-C while it winds down is ignored and
    threads that fail while the process ends print nothing."""
    import signal
    import threading

    if as_program:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.excepthook = lambda args: None
    try:
        fresh_line = "\n" if sys.stderr.isatty() else ""  # after a progress bar
        sys.stderr.write(f"{fresh_line}s3d{f' {command}' if command else ''}: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


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
