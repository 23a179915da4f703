"""Bad-input corpus: `s3d convert` (and through it load_pretrained's file handling) on broken checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from badinput import Result, assert_user_error, case, run_s3d, run_s3d_here, snapshot

import s3d

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # nothing may be sent to the Hub: every source here is local


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return s3d.save_pretrained(s3d.build_resenc_unet("tiny"), tmp_path_factory.mktemp("m") / "model")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@case("convert", "source path that does not exist", "error")
def test_missing_source(tmp_path: Path) -> None:
    res = run_s3d("convert", tmp_path / "nope" / "model.safetensors", "--to", "s3d", "-o", tmp_path / "out",
                  env=OFFLINE)
    assert_user_error(res, [str(tmp_path / "nope" / "model.safetensors")], rc=1)
    assert not (tmp_path / "out").exists()


@case("convert", "a text file named .pth", "error")
def test_text_file_as_pth(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint_final.pth"
    bad.write_text("this is not a checkpoint\n")
    res = run_s3d("convert", bad, "--to", "s3d", "-o", tmp_path / "out", env=OFFLINE)
    assert_user_error(res, [str(bad)], rc=1)
    assert not (tmp_path / "out").exists()


@case("convert", "truncated model.safetensors", "error")
def test_truncated_safetensors(saved: Path, tmp_path: Path) -> None:
    model = _copy(saved, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = run_s3d("convert", model, "--to", "nnssl", "-o", tmp_path / "out", env=OFFLINE)
    assert_user_error(res, [str(weights)], rc=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@case("convert", "config.json with an unknown key", "error")
def test_config_unknown_key(saved: Path, tmp_path: Path) -> None:
    model = _copy(saved, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architecture"]["depth"] = 3
    (model / "config.json").write_text(json.dumps(cfg))
    res = run_s3d("convert", model, "--to", "s3d", "-o", tmp_path / "out", env=OFFLINE)
    assert_user_error(res, [str(model / "config.json"), "architecture.depth"], rc=1)


@case("convert", "directory without model.safetensors", "error")
def test_directory_without_weights(saved: Path, tmp_path: Path) -> None:
    model = _copy(saved, tmp_path / "model")
    (model / "model.safetensors").unlink()
    res = run_s3d("convert", model, "--to", "s3d", "-o", tmp_path / "out", env=OFFLINE)
    assert_user_error(res, [str(model), "model.safetensors"], rc=1)
    assert not (tmp_path / "out").exists()  # nothing half-written


@case("convert", "output onto an existing good model (converted again, with --overwrite)", "handled")
def test_rewrite_keeps_a_complete_model(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_s3d("convert", saved, "--to", "s3d", "-o", out, env=OFFLINE)
    assert first.rc == 0, first.text
    from safetensors.torch import load_file

    before, weights = snapshot(out), load_file(out / "model.safetensors")
    again = run_s3d("convert", saved, "--to", "s3d", "-o", out, "--overwrite", env=OFFLINE)
    assert again.rc == 0, again.text
    # written again atomically: the same complete files, no temporaries, the same tensors (the safetensors
    # header may list them in another order, so compare tensors, not bytes)
    assert set(snapshot(out)) == set(before)
    again_weights = load_file(out / "model.safetensors")
    assert set(again_weights) == set(weights) and all(again_weights[k].equal(v) for k, v in weights.items())


@case("convert", "output onto an earlier conversion without --overwrite (s3d and nnssl)", "error")
def test_convert_again_without_overwrite(saved: Path, tmp_path: Path, capsys) -> None:
    for to, written in (("s3d", "model.safetensors"), ("nnssl", "checkpoint_final.pth")):
        out = tmp_path / to
        assert run_s3d_here(capsys, "convert", saved, "--to", to, "-o", out).rc == 0
        before = snapshot(out)
        res = run_s3d_here(capsys, "convert", saved, "--to", to, "-o", out)
        assert_user_error(res, [str(out / written), "exists", "--overwrite"], rc=1)
        assert snapshot(out) == before


@case("convert", "output = the source folder, or inside it", "error")
def test_output_overlaps_source(saved: Path, tmp_path: Path, capsys) -> None:
    model = _copy(saved, tmp_path / "model")
    before = snapshot(model)
    for out, how in ((model, "is the source"), (model / "nnssl", "is inside the source")):
        res = run_s3d_here(capsys, "convert", model, "--to", "nnssl", "-o", out, "--overwrite")
        assert_user_error(res, [str(out), how], rc=2)
    assert snapshot(model) == before and not (model / "nnssl").exists()


@case("convert", "disk full while writing (file size limit)", "error")
def test_disk_full(saved: Path, tmp_path: Path) -> None:
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    for to, written in (("s3d", "model.safetensors"), ("nnssl", "checkpoint_final.pth")):
        out = tmp_path / to
        proc = subprocess.run([sys.executable, "-m", "s3d", "convert", str(saved), "--to", to, "-o", str(out)],
                              capture_output=True, text=True, timeout=600, preexec_fn=limit,
                              env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"})
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        # was "SafetensorError: ... (an internal error...)" / "RuntimeError: unexpected pos 128 vs 0"
        assert_user_error(res, [f"cannot write {out / written}", "free disk space"], rc=1)
        assert "internal error" not in res.err and res.err.count("\n") == 1
        assert not [p.name for p in out.iterdir()]  # no partial file left behind
