"""Scan and preparation throughput (files/s per worker) on a synthetic archive of many small NIfTI files.

Writes ``--files`` small T1-like images (default 2,000 of 48 x 48 x 40 voxels at 1.2 x 1.2 x 1.5 mm, a
57.6 x 57.6 x 60 mm field of view, so that every one is cropped, z-scored and resampled; 5 % have a 15 mm
field of view and are rejected)
in ``--datasets`` top-level folders, then measures with one thread per process:

- listing (``list_source``: directory walk) and header scan (``scan``) in one process, files/s;
- ``prepare`` in one process (``workers=0``) and with ``--workers`` processes, files/s and files/s
  per worker (the first includes the scan, as a real run does);
- sharded preparation: ``--shards`` shards run one after another into one folder (as N array jobs
  would in parallel), each shard's time, and the automatic merge; the merged manifest is checked
  against the single-process one, entry for entry.

Run::

    OMP_NUM_THREADS=1 python benchmarks/prepare.py --files 2000 --workers 2 --shards 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from s3d._fs import write_json_atomic  # noqa: E402
from s3d.data.scan import ScanFilters, list_source, prepare, read_manifest, scan  # noqa: E402

FILTERS = ScanFilters(min_file_bytes=0)


def write_archive(root: Path, n: int, datasets: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``root/dsK/sub-XXXXX/anat/sub-XXXXX_T1w.nii.gz``: gamma noise inside a 2-voxel zero border."""
    rng = np.random.default_rng(seed)
    spacing = (1.2, 1.2, 1.5)
    affine = np.diag([*spacing, 1.0])
    for i in range(n):
        thin = i % 20 == 19  # 5 %: field of view 10 x 1.5 mm < 50 mm -> rejected by the scan
        s = (shape[0], shape[1], 10) if thin else shape
        d = np.zeros(s, np.float32)
        d[2:-2, 2:-2, 2:-2] = rng.gamma(2.0, 50.0, [k - 4 for k in s])
        p = root / f"ds{i % datasets:03d}" / f"sub-{i:05d}" / "anat" / f"sub-{i:05d}_T1w.nii.gz"
        p.parent.mkdir(parents=True)
        img = nib.Nifti1Image(d, affine)
        img.header.set_zooms(spacing)
        nib.save(img, str(p))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 48, 40])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--store", default="b2nd", choices=("b2nd", "npy"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                 "args": vars(args)}

    def report(key: str, seconds: float, files: int, workers: int = 1) -> None:
        res[key] = {"s": seconds, "files": files, "files_per_s": files / seconds,
                    "files_per_s_per_worker": files / seconds / workers, "workers": workers}
        print(key, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res[key].items()}),
              flush=True)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        raw = write_archive(tmp / "raw", args.files, args.datasets, tuple(args.shape))
        res["write_archive_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rows = list_source(raw)
        report("list", time.perf_counter() - t, len(rows))
        t = time.perf_counter()
        entries = scan(raw, FILTERS)
        report("scan (headers)", time.perf_counter() - t, len(entries))
        t = time.perf_counter()
        single = prepare(raw, tmp / "one", FILTERS, workers=0, progress=False, store=args.store)
        report("prepare, 1 process", time.perf_counter() - t, len(single["entries"]))
        res["counts"] = single["counts"]
        print("counts", json.dumps(single["counts"]), flush=True)
        if single["counts"]["ok"] < 0.9 * args.files:
            raise SystemExit(f"only {single['counts']['ok']} of {args.files} files accepted: fix --shape")
        if args.workers > 0:
            t = time.perf_counter()
            prepare(raw, tmp / "pool", FILTERS, workers=args.workers, progress=False, store=args.store)
            report(f"prepare, {args.workers} worker processes", time.perf_counter() - t, len(single["entries"]),
                   args.workers)
        t = time.perf_counter()
        rerun = prepare(raw, tmp / "one", FILTERS, workers=0, progress=False, store=args.store)
        report("prepare again (all finished: resume skips them)", time.perf_counter() - t, len(rerun["entries"]))
        shard_s = []
        for i in range(args.shards):
            t = time.perf_counter()
            prepare(raw, tmp / "sharded", FILTERS, workers=0, progress=False, store=args.store, shard=(i, args.shards))
            shard_s.append(time.perf_counter() - t)
        res["shards_s"] = shard_s
        print("shards_s", [round(s, 2) for s in shard_s])
        merged = read_manifest(tmp / "sharded")
        res["merged_equals_single"] = merged["entries"] == single["entries"]
        print("merged manifest equals the single-process one:", res["merged_equals_single"])
    res["load_avg_end"] = os.getloadavg()
    if args.json:
        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
