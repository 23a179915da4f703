"""Data-path benchmark: storage formats for 160^3 crops, and crops/s of s3d's loader vs batchgenerators.

Two measurements in one run, on synthetic head-like volumes (an ellipsoid of smoothed noise in a
constant background, z-scored, 1 x 192 x 224 x 192 float32 by default):

1. **storage**: write time, size on disk and time to read one random crop for
   uncompressed ``.npy`` (memory-mapped; float32 and float16), blosc2 (nnU-Net's format: ZSTD,
   chunked; needs ``pip install blosc2``) and ``np.savez_compressed`` (must inflate the whole volume).
   Reads are from the page cache (warm): the numbers are decode costs, not disk speed.
2. **data path**: crops/s of the full pipeline (read crop + rotation/scale/mirroring with the paper's
   probabilities) for s3d (DataLoader workers read crops; one batched ``grid_sample`` on ``--device``)
   and for a batchgenerators pipeline with the same augmentation (``SpatialTransform`` +
   ``MirrorTransform`` on CPU worker processes, as nnssl does; needs ``pip install batchgenerators``).

Run::

    python benchmarks/dataloader.py --patch 160 --batch 2 --batches 20 --workers 4 --device cuda
    python benchmarks/dataloader.py --patch 96 --batches 5 --workers 0 --skip-storage   # quick CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from s3d._fs import write_json_atomic
from s3d.augment import Augment, AugmentConfig
from s3d.data.pretrain_dataset import build_pretrain_loader
from s3d.data.store import open_volume, random_crop_start, read_crop, save_volume


def synthetic_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(1, D, H, W) float32: z-scored smoothed noise inside an ellipsoid, constant outside."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.8
    tissue = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0) * 5
    tissue += 0.3 * rng.standard_normal(shape).astype(np.float32) + 3.0
    vol = np.where(inside, tissue, 0.0).astype(np.float32)
    vol = (vol - vol.mean()) / vol.std()
    return vol[None]


def _dir_size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_storage(vols: list[np.ndarray], tmp: Path, patch: int, reads: int) -> list[dict]:
    rng = np.random.default_rng(0)
    size = (patch,) * 3
    results = []

    def timed_reads(read) -> float:
        times = []
        for i in range(reads):
            v = i % len(vols)
            start = random_crop_start(vols[v].shape[1:], size, rng)
            t = time.perf_counter()
            read(v, start)
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times))

    raw_mb = sum(v.nbytes for v in vols) / 2**20
    for dtype in ("float32", "float16"):
        t = time.perf_counter()
        paths = [save_volume(tmp / f"npy_{dtype}_{i}.npy", v, dtype=dtype) for i, v in enumerate(vols)]
        write = time.perf_counter() - t
        maps = [open_volume(p) for p in paths]
        ms = timed_reads(lambda v, s, maps=maps: read_crop(maps[v], s, size))
        results.append({"format": f"npy {dtype} (mmap)", "write_s": write,
                        "size_mb": sum(p.stat().st_size for p in paths) / 2**20, "raw_mb": raw_mb,
                        "crop_ms": ms})
    try:
        import blosc2
    except ImportError:
        results.append({"format": "blosc2", "error": "not installed (pip install blosc2)"})
    else:
        cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 8}
        t = time.perf_counter()
        paths = []
        for i, v in enumerate(vols):
            p = tmp / f"b2_{i}.b2nd"
            blosc2.asarray(np.ascontiguousarray(v), urlpath=str(p), mode="w", chunks=(1, 64, 64, 64),
                           blocks=(1, 16, 16, 16), cparams=cparams)
            paths.append(p)
        write = time.perf_counter() - t
        arrs = [blosc2.open(str(p), mode="r") for p in paths]

        def b2_read(v: int, s: tuple[int, int, int]) -> np.ndarray:
            a = arrs[v]
            lo = [max(0, x) for x in s]
            hi = [min(n, x + patch) for x, n in zip(s, a.shape[1:], strict=True)]
            return a[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]

        ms = timed_reads(b2_read)
        results.append({"format": "blosc2 zstd-8 chunks 64^3 blocks 16^3", "write_s": write,
                        "size_mb": sum(_dir_size(p) for p in paths) / 2**20, "raw_mb": raw_mb, "crop_ms": ms})
    t = time.perf_counter()
    paths = []
    for i, v in enumerate(vols):
        np.savez_compressed(tmp / f"z_{i}.npz", data=v)
        paths.append(tmp / f"z_{i}.npz")
    write = time.perf_counter() - t
    ms = timed_reads(lambda v, s: read_crop(np.load(paths[v])["data"], s, size))
    results.append({"format": "npz compressed (whole volume inflated)", "write_s": write,
                    "size_mb": sum(p.stat().st_size for p in paths) / 2**20, "raw_mb": raw_mb, "crop_ms": ms})
    return results


def bench_s3d(files: list[str], patch: int, batch: int, batches: int, workers: int, device: str) -> dict:
    warm = 2
    loader = build_pretrain_loader(files, (patch,) * 3, batch, 0, batches + warm, seed=0, workers=workers,
                                   pin_memory=device.startswith("cuda"))
    aug = Augment(AugmentConfig.pretraining())
    t0 = None
    for i, x in enumerate(loader):
        if i == warm:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = x.to(device, non_blocking=True)
        y = aug(x, torch.Generator().manual_seed(i))
        float(y.view(-1)[0])  # wait for the device
    dt = time.perf_counter() - t0
    return {"pipeline": f"s3d (workers={workers}, augment on {device})", "crops_per_s": batches * batch / dt}


def bench_batchgenerators(files: list[str], patch: int, batch: int, batches: int, workers: int,
                          order: int) -> dict:
    try:
        from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from batchgenerators.transforms.abstract_transforms import Compose
        from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    except ImportError:
        return {"pipeline": "batchgenerators", "error": "not installed (pip install batchgenerators)"}

    class CropLoader(SlimDataLoaderBase):
        def __init__(self, files: list[str], batch_size: int) -> None:
            super().__init__(files, batch_size, None)
            self.rng = np.random.default_rng()

        def generate_train_batch(self) -> dict:
            crops = []
            for _ in range(self.batch_size):
                vol = open_volume(self._data[int(self.rng.integers(len(self._data)))])
                start = random_crop_start(vol.shape[1:], (patch,) * 3, self.rng)
                crops.append(read_crop(vol, start, (patch,) * 3))
            return {"data": np.stack(crops)}

    a = math.radians(30)
    transform = Compose([
        SpatialTransform((patch,) * 3, patch_center_dist_from_border=None, do_elastic_deform=False,
                         do_rotation=True, angle_x=(-a, a), angle_y=(-a, a), angle_z=(-a, a),
                         p_rot_per_axis=1,
                         do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
                         order_data=order, random_crop=False, p_el_per_sample=0, p_scale_per_sample=0.2,
                         p_rot_per_sample=0.2),
        MirrorTransform((0, 1, 2)),
    ])
    loader = CropLoader(files, batch)
    gen = (SingleThreadedAugmenter(loader, transform) if workers == 0
           else MultiThreadedAugmenter(loader, transform, workers, num_cached_per_queue=2))
    warm = 2
    for _ in range(warm):
        next(gen)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(gen)
    dt = time.perf_counter() - t0
    if workers:
        gen._finish()
    return {"pipeline": f"batchgenerators (workers={workers}, order {order}, CPU)",
            "crops_per_s": batches * batch / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 224, 192])
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--patch", type=int, default=160)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reads", type=int, default=20, help="crop reads per storage format")
    ap.add_argument("--order", type=int, nargs="+", default=[1, 3], help="batchgenerators spline orders")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-storage", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    vols = [synthetic_volume(tuple(args.shape), i) for i in range(args.volumes)]
    out = {"machine": platform.platform(), "cpu_threads": torch.get_num_threads(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_storage:
            out["storage"] = bench_storage(vols, tmp, args.patch, args.reads)
            for r in out["storage"]:
                print("storage", json.dumps(r))
        files = [str(save_volume(tmp / f"v{i}.npy", v)) for i, v in enumerate(vols)]
        out["pipelines"] = [bench_s3d(files, args.patch, args.batch, args.batches, args.workers, args.device)]
        for order in args.order:
            out["pipelines"].append(bench_batchgenerators(files, args.patch, args.batch, args.batches,
                                                          args.workers, order))
        for r in out["pipelines"]:
            print("pipeline", json.dumps(r))
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
