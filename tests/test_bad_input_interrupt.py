"""Bad-input corpus, Ctrl-C: a real SIGINT to the whole process group (as a terminal sends it), at several moments.

Every run must end with one line, ``s3d COMMAND: interrupted``, exit code 130, no traceback from the
command, its worker processes or its threads, and no process of the group left behind. The moments are
chosen by what the command has done (a file it wrote), not only by the clock, so they hold on a slow or
busy machine: while Python starts and imports torch, while worker processes preprocess, and while a
training loop runs with its loader threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from badinput import Result, case, snapshot
from synthetic_scans import write_t1_archive

pytest.importorskip("scipy")
if not Path("/proc/self/stat").exists():
    pytest.skip("the process-group check reads /proc (Linux)", allow_module_level=True)

from test_nnunet_data import make_sphere_dataset  # noqa: E402


def _interrupt(args: list, when: Callable[[int], bool] | float, timeout: float = 300) -> Result:
    """Start ``python -m s3d ARGS`` in a new process group; SIGINT the group once ``when(pgid)`` (or after
    ``when`` seconds); return what it printed. The command must still be running when the signal is sent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "s3d", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        if callable(when):
            while not when(proc.pid):
                assert proc.poll() is None, f"finished before the moment came:\n{proc.communicate()[1][-3000:]}"
                assert time.monotonic() < deadline, "the moment never came"
                time.sleep(0.05)
        else:
            time.sleep(when)
        assert proc.poll() is None, "finished before the signal"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    left = _running_in_group(proc.pid)
    for _ in range(150):  # no worker of the command outlives it (a helper may take a moment to notice)
        if not left:
            break
        time.sleep(0.1)
        left = _running_in_group(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes of the command's group still running 15 s after it ended: {left}"
    return Result(proc.returncode, out, err)


def _running_in_group(pgid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(cmd.strip())
    return live


def _assert_quiet(res: Result, command: str) -> None:
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.rc == 130, f"exit {res.rc}\n{res.err[-3000:]}"
    assert lines == [f"s3d {command}: interrupted"], res.err[-3000:]


@case("pretrain", "Ctrl-C during --prepare-only with worker processes: at start-up, while importing, while "
      "the workers preprocess", "error")
def test_ctrl_c_while_preparing(tmp_path: Path) -> None:
    raw = write_t1_archive(tmp_path / "raw", [(48, 48, 48)] * 16)
    before = snapshot(raw)
    args = ["pretrain", "--data", raw, "--out", tmp_path / "prep", "--prepare-only", "--min-file-kb", "0",
            "--min-fov-mm", "20", "--no-progress", "--prep-workers", "2"]
    cases = tmp_path / "prep" / "cases"
    for i, when in enumerate((0.2, 1.5, lambda _: cases.is_dir() and any(cases.glob("*.json")))):
        res = _interrupt(args, when)
        _assert_quiet(res, "pretrain")
        assert not (tmp_path / "prep" / "manifest.json").exists(), f"moment {i}: the preparation was not stopped"
        left = sorted(p.name for p in cases.glob(".*")) if cases.is_dir() else []
        assert not left, f"moment {i}: temporary files left: {left}"
    assert snapshot(raw) == before


@case("finetune", "Ctrl-C while training (loader threads running)", "error")
def test_ctrl_c_while_training(tmp_path: Path) -> None:
    root = make_sphere_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    res = _interrupt(["finetune", root, "-o", out, "--config", "tiny", "--patch-size", "32", "32", "32",
                      "--schedule", "scratch", "--steps", "100000", "--val-every", "100000", "--device", "cpu",
                      "--no-progress", "--loader-threads", "2"],
                     lambda _: metrics.is_file() and metrics.stat().st_size > 0)
    _assert_quiet(res, "finetune")
    assert not (out / "model").exists() and not list(out.glob(".*"))


@case("evaluate", "Ctrl-C while worker processes evaluate", "error")
def test_ctrl_c_while_evaluating(tmp_path: Path) -> None:
    import json

    import nibabel as nib
    import numpy as np

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        nib.save(nib.Nifti1Image(rng.integers(0, 3, (64, 64, 64)).astype(np.uint8), np.eye(4)),
                 str(ref / f"case_{i:03d}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    res = _interrupt(["evaluate", "--pred", ref, "--ref", ref, "--labels", tmp_path / "dataset.json", "--out",
                      tmp_path / "out", "--workers", "2"],
                     lambda pgid: sum("spawn_main" in cmd for cmd in _running_in_group(pgid)) >= 2)  # 2 workers up
    _assert_quiet(res, "evaluate")
    assert not (tmp_path / "out" / "summary.json").exists()


_EXEC_THEN_WAIT = """
import sys
import s3d.commands.info as info

def run(args):
    # what dataclasses and namedtuple do while a module imports: run code compiled from source text;
    # the Ctrl-C arrives inside it
    exec("import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\n"
         "t0 = time.monotonic()\\nwhile time.monotonic() < t0 + 1.0: pass")
    import time
    time.sleep(60)
    return 0

info.run = run
from s3d.cli import main
sys.argv = ["s3d", "info"]
sys.exit(main())
"""


def test_ctrl_c_inside_code_run_from_source_text_still_exits_130(tmp_path: Path) -> None:
    """A ``KeyboardInterrupt`` that leaves ``exec()`` of a string makes CPython end a ``python -m``
    program by SIGINT (exit -2 to the parent) even when it is caught; CI met it when Ctrl-C came while
    ``torch._dynamo`` imported. Here the signal comes inside such code every time; the command must still
    exit 130, at once (not after the 60 s wait that follows)."""
    (tmp_path / "exec_then_wait.py").write_text(_EXEC_THEN_WAIT)
    t0 = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-m", "exec_then_wait"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 130, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == ["s3d info: interrupted"], res.stderr[-3000:]
    assert time.monotonic() - t0 < 50, "the interrupt waited for the sleep to end"
