"""The bad-input corpus harness: run the real ``s3d`` command on generated bad input, classify the outcome.

Every corpus test (``tests/test_bad_input_*.py``) is one case, registered with :func:`case`:

    @case("predict", "truncated .nii.gz among 5 cases", "skipped")
    def test_truncated_case(tmp_path): ...

Outcome classes (the columns of ``docs/bad-input.md``):

- ``"error"``: the command stops, exits 1 (2 for an option value refused before any work starts), and
  prints a message naming the file, key or argument; no traceback; no good file is changed.
- ``"skipped"``: a batch command goes on past the bad case, predicts/evaluates the others, reports the bad
  one at the end (and in its failures file) and exits 1.
- ``"handled"``: the input is accepted under a documented policy (exit 0), with a note where it matters.

``tests/test_bad_input_doc.py`` checks that ``docs/bad-input.md`` lists every registered case.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("error", "skipped", "handled")


@dataclass(frozen=True)
class Case:
    """One corpus case: the command, the kind of bad input, the expected outcome class, the test name."""

    command: str
    kind: str
    outcome: str
    test: str


#: every registered case, in registration order
CASES: list[Case] = []


def case(command: str, kind: str, outcome: str) -> Callable:
    """Register the decorated test as a corpus case (see the module docstring)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r}: expected one of {OUTCOMES}")

    def register(fn: Callable) -> Callable:
        CASES.append(Case(command, kind, outcome, fn.__name__))
        return fn

    return register


@dataclass
class Result:
    """What a command run left: exit code and its two streams."""

    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_s3d(*args: str | os.PathLike[str], timeout: float = 600, env: dict[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None) -> Result:
    """Run ``python -m s3d ARGS`` as a user would (a new process, no progress bars)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "s3d", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_s3d_here(capsys, *args: str | os.PathLike[str]) -> Result:
    """Run ``s3d ARGS`` in this process (:func:`s3d.cli.main`) and capture what it prints.

    For cases that are refused before any work starts (bad arguments, overlapping folders, a model folder
    that does not hold together): the same code path as the command, without the seconds a new process
    spends importing torch. Pass pytest's ``capsys`` fixture.
    """
    from s3d.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


def snapshot(*roots: str | os.PathLike[str]) -> dict[str, str]:
    """``{path: sha256}`` of every file under ``roots`` (to show that no good file changed)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_user_error(res: Result, names: Sequence[str], *, rc: int) -> None:
    """An ``"error"`` outcome: exit code ``rc``, no traceback, every one of ``names`` in the message.

    ``rc`` is pinned per case: 2 for an option value refused before any work starts (argparse's usage
    error), 1 for everything found while working (see ``docs/bad-input.md``).
    """
    assert res.rc == rc, f"exit {res.rc}, expected {rc}\n{res.text[-3000:]}"
    assert "Traceback" not in res.text, res.text[-3000:]
    for name in names:
        assert str(name) in res.text, f"{name!r} not named in:\n{res.text[-3000:]}"


def assert_no_traceback(res: Result) -> None:
    """No Python traceback reached the user."""
    assert "Traceback" not in res.text, res.text[-3000:]
