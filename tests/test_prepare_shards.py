"""Sharded preparation: N disjoint shards merge into the single-machine manifest; workers die with their parent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from synthetic_scans import write_t1_archive

from s3d.data.scan import (
    MANIFEST_NAME,
    ScanFilters,
    list_source,
    merge_shards,
    parse_shard,
    prepare,
    read_manifest,
    shard_of,
)
from s3d.data.scan.headers import source_key
from s3d.pretrain import read_metrics
from s3d.pretrain import run as pretrain

FILTERS = ScanFilters(min_file_bytes=0, min_fov_mm=20.0)
TINY = {"recipe": "s3d-b", "architecture": "tiny", "batch_size": 2, "patch_size": (32, 32, 32),
        "method_kwargs": {"block_size": 16}, "workers": 0, "progress": False, "val_fraction": 0.2,
        "steps": 2, "val_every": 0, "snapshot_every": 0, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Two 'datasets' of small T1 images plus rejects: a 10 mm field of view and a text file."""
    root = tmp_path_factory.mktemp("raw")
    write_t1_archive(root / "dsA", [(36, 38, 34), (34, 36, 38), (40, 34, 36), (38, 38, 38)], seed=1)
    write_t1_archive(root / "dsB", [(34, 34, 40), (36, 40, 34), (38, 36, 36)], seed=2)
    rng = np.random.default_rng(3)
    small = np.zeros((40, 40, 10), np.float32)
    small[2:-2, 2:-2, 2:-2] = rng.gamma(2.0, 50.0, (36, 36, 6))
    (root / "dsB" / "thin").mkdir()
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / "dsB" / "thin" / "thin_T1w.nii.gz"))
    (root / "dsA" / "README_T1w.txt").write_text("not an image")
    return root


def test_shard_assignment_is_a_stable_hash_of_the_path_under_the_root(raw: Path, tmp_path: Path) -> None:
    rows = list_source(raw)
    for r in rows:  # reference: blake2b of the key, 8 bytes big-endian, modulo N
        key = source_key(r)
        ref = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 3
        assert shard_of(key, 3) == ref
    # independent of where the archive is mounted: a copy elsewhere gives the same keys
    moved = tmp_path / "mnt" / "elsewhere"
    moved.parent.mkdir(parents=True)
    os.symlink(raw, moved)
    assert [source_key(r) for r in list_source(moved)] == [source_key(r) for r in rows]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_three_shards_merge_into_the_single_machine_manifest_and_train_alike(raw: Path, tmp_path: Path) -> None:
    single = prepare(raw, tmp_path / "one", FILTERS, progress=False)
    assert single["counts"]["ok"] == 7 and single["counts"]["rejected"] == 2
    out = tmp_path / "sharded"
    parts = []
    for i in range(3):
        if i == 2:  # before the last shard there is no manifest.json, and the error says what to do
            with pytest.raises(FileNotFoundError, match="2 of 3"):
                read_manifest(out)
        parts.append(prepare(raw, out, FILTERS, progress=False, shard=(i, 3)))
    merged = read_manifest(out)  # merged automatically by the last shard
    assert merged["entries"] == single["entries"]  # file for file, in listing order
    assert merged["counts"] == single["counts"]
    assert {k: v for k, v in merged.items() if k not in ("shards",)} == \
        {k: v for k, v in read_manifest(tmp_path / "one").items() if k not in ("shards",)}
    # every listed file is in exactly one shard, and the shards are not all in one
    paths = [e["path"] for p in parts for e in p["entries"]]
    assert sorted(paths) == sorted(e["path"] for e in single["entries"]) and len(set(paths)) == len(paths)
    assert sum(bool(p["entries"]) for p in parts) >= 2
    # the same cases, bitwise
    for e in single["entries"]:
        if e["status"] == "ok":
            assert (out / e["file"]).read_bytes() == (tmp_path / "one" / e["file"]).read_bytes()
    # training from either gives the same first losses, bitwise
    a = pretrain(data=str(tmp_path / "one"), out=str(tmp_path / "run_one"), **TINY)
    b = pretrain(data=str(out), out=str(tmp_path / "run_sharded"), **TINY)
    la, lb = read_metrics(tmp_path / "run_one"), read_metrics(tmp_path / "run_sharded")
    assert sorted(la) == [1, 2] and la == lb and a.metrics["loss"] == b.metrics["loss"]
    wait = read_metrics(tmp_path / "run_one", "loader_wait")  # logged: does the step wait for data?
    assert sorted(wait) == [1, 2] and all(0 <= w <= 1 for w in wait.values())


def test_shards_resume_and_added_files_stay_put(raw: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    out = tmp_path / "prep"
    for i in range(3):
        prepare(src, out, FILTERS, progress=False, shard=(i, 3))
    before = {e["path"]: e for e in read_manifest(out)["entries"]}
    write_t1_archive(src / "dsC", [(36, 36, 36)], seed=5)  # a new file
    again = [prepare(src, out, FILTERS, progress=False, shard=(i, 3)) for i in range(3)]
    assert sum(p["counts"]["processed"] for p in again) == 1  # only the new file
    assert sum(p["counts"]["skipped"] for p in again) == 7
    after = read_manifest(out)
    assert after["listed"] == len(before) + 1 and after["counts"]["ok"] == 8
    for e in after["entries"]:
        if e["path"] in before:
            assert {k: v for k, v in e.items() if k != "listing_index"} == \
                {k: v for k, v in before[e["path"]].items() if k != "listing_index"}


def test_merge_refuses_missing_and_inconsistent_shards(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare(raw, out, FILTERS, progress=False, shard=(0, 3))
    with pytest.raises(ValueError, match=r"2 of 3 shards not prepared yet \(1/3, 2/3\)"):
        merge_shards(out)
    prepare(raw, out, FILTERS, progress=False, shard=(1, 3), dtype="float16")
    last = prepare(raw, out, FILTERS, progress=False, shard=(2, 3))  # all present, but they do not merge
    assert not (out / MANIFEST_NAME).exists() and "dtype 'float16' differs" in last["merge_error"]
    with pytest.raises(ValueError, match="dtype 'float16' differs"):
        merge_shards(out)
    prepare(raw, out, FILTERS, progress=False, shard=(1, 3))  # fixed: this shard again, same options
    assert read_manifest(out)["shards"] == 3


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_workers_end_when_the_preparing_process_is_killed(tmp_path: Path) -> None:
    # enough anisotropic images (cubic resampling) that the pool is busy when the parent dies
    raw = write_t1_archive(tmp_path / "raw", [(96, 96, 48)] * 12, seed=4)
    for p in raw.rglob("*.nii.gz"):
        img = nib.load(str(p))
        img.header.set_zooms((1.0, 1.0, 2.0))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.0, 1.0, 2.0, 1.0])), str(p))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "s3d", "pretrain", "--data", str(raw), "--out", str(tmp_path / "prep"),
           "--prepare-only", "--prep-workers", "2", "--min-file-kb", "0", "--no-progress"]
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            # the pool workers are the python children of the parent (besides multiprocessing's tracker)
            workers = [c for c in _children(parent.pid)
                       if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="ignore")]
        assert len(workers) >= 2, "the pool did not start"
        while time.time() < deadline and not list((tmp_path / "prep" / "cases").glob("*.b2nd")):
            time.sleep(0.2)  # the workers are at work once the first case is written
        assert parent.poll() is None, "prepare finished before it could be killed; make the images bigger"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
        assert not left, f"worker process(es) {left} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in {*workers, *_children(parent.pid)}:  # never leave an orphan behind, even when failing
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    # the killed preparation resumes: finished cases are kept, the rest is done, all accounted for
    m = prepare(raw, tmp_path / "prep", ScanFilters(min_file_bytes=0), progress=False)
    assert m["counts"]["ok"] == 12 and m["counts"]["processed"] + m["counts"]["skipped"] == 12
    assert json.loads((tmp_path / "prep" / MANIFEST_NAME).read_text())["counts"] == m["counts"]


def test_a_shard_sweeps_the_temporaries_of_its_own_files_only(raw: Path, tmp_path: Path) -> None:
    """Temporaries of a shard that was killed are removed when that shard runs again; those of the other
    shards' files (which may be writing them at this moment) are kept."""
    out = tmp_path / "prep"
    parts = [prepare(raw, out, FILTERS, progress=False, shard=(i, 3)) for i in range(2)]
    mine, theirs = ({e["case_id"] for e in p["entries"] if e["status"] == "ok"} for p in parts)
    assert mine and theirs and not mine & theirs
    cases = out / "cases"
    planted = {cid: [f".{cid}{suffix}.k2j4x9_a{suffix}" for suffix in (".b2nd", ".json")]
               for cid in (min(mine), min(theirs))}  # named as s3d._fs.atomic_path names them
    for names in planted.values():
        for name in names:
            (cases / name).write_bytes(b"partial")
    prepare(raw, out, FILTERS, progress=False, shard=(0, 3))
    left = sorted(p.name for p in cases.glob(".*"))
    assert left == sorted(planted[min(theirs)]), left
