"""The `s3d` command line: one line per failure (no traceback), `--debug` for the traceback, one --amp vocabulary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s3d.cli import build_parser, error_line, main


def test_a_failing_command_prints_one_line_and_exits_1(capsys, tmp_path) -> None:
    missing = tmp_path / "no-such-folder"
    assert main(["pretrain", "--data", str(missing), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"s3d pretrain: error: {missing}: --data not found (a folder of NIfTI files, a .txt list, a .csv, "
                   "or a prepared folder)"]


def test_debug_shows_the_traceback(tmp_path) -> None:
    missing = tmp_path / "no-such-folder"
    proc = subprocess.run([sys.executable, "-m", "s3d", "pretrain", "--data", str(missing), "--out",
                           str(tmp_path / "run"), "--no-progress", "--debug"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_error_line_names_the_file_and_flags_internal_errors() -> None:
    assert "/ro/out" in error_line(PermissionError(13, "Permission denied", "/ro/out"))
    assert "internal error" in error_line(AssertionError("x")) and "--debug" in error_line(AssertionError("x"))


def test_every_command_takes_the_same_amp_values() -> None:
    from s3d.commands._common import AMP_CHOICES
    from s3d.runtime.device import AMP_MODES

    assert AMP_CHOICES == AMP_MODES
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("pretrain", "finetune", "predict"):
        amp = next(a for a in sub.choices[name]._actions if a.dest == "amp")
        assert tuple(amp.choices) == AMP_MODES, name
    with pytest.raises(SystemExit):  # the old spellings are refused by the parser
        parser.parse_args(["predict", "-i", "a", "-o", "b", "-m", "c", "--amp", "none"])
