"""Data-path benchmark: volume stores for 160^3 crops, and crops/s per core of s3d's data path vs batchgenerators.

One run measures, on synthetic head-like volumes (an ellipsoid of smoothed noise in a constant
background, z-scored, 1 x 192 x 224 x 192 float32 by default), with ONE thread everywhere
(torch, blosc2, OpenMP):

1. **stores**: bytes on disk, write time, time to read one random crop (median and min) and
   crops/s of one worker reading crops back to back, for ``.npy`` float32/float16 (memory-mapped),
   s3d's ``.b2nd`` (blosc2 LZ4-5 + shuffle, chunks 80^3, blocks 16^3: :mod:`s3d.data.store`), the
   same data with nnU-Net's blosc2 settings (nnunetv2 ``nnUNetDatasetBlosc2.save_case`` /
   ``comp_blosc2_params``: LZ4HC level 5, the smaller of NOFILTER/SHUFFLE on a centre slab, blocks
   32^3 and chunks 128 x 128 x 96 for a 160^3 patch of float32, read with 1 thread and mmap) and
   ``np.savez_compressed``. Reads hit the page cache (warm): decode costs, not disk speed.
2. **data path, one core each, same interpolation order (trilinear), same run**: s3d = crop read
   (``RandomCropDataset``) + ``s3d.augment.Augment(AugmentConfig.pretraining())`` on the CPU, vs
   batchgenerators = the same crop read + ``SpatialTransform`` (order 1, the paper's probabilities)
   + ``MirrorTransform`` (``SingleThreadedAugmenter``). The pipelines take turns batch by batch so
   that load from other jobs hits them alike; rates are crops over the summed time of each, the
   ratio is printed with its per-round spread.
3. **profile** of s3d's per-crop time: read, float16 -> float32 conversion, augmentation parameters,
   sampling grid, ``grid_sample``, mirroring, and the expected augmentation cost per crop.
4. **node extrapolation**: DataLoader workers a 16-core node needs for 24 crops/s (ResEnc-L,
   batch 6, 0.25 s/step) from the per-worker rates measured here.

Run::

    OMP_NUM_THREADS=1 python benchmarks/dataloader.py                     # everything, ~3 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/dataloader.py --skip-storage --rounds 2   # data path only
    python benchmarks/dataloader.py --patch 160 --batches 20 --workers 8 --device cuda --skip-storage  # GPU path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from s3d._fs import write_json_atomic  # noqa: E402
from s3d.augment import Augment, AugmentConfig  # noqa: E402
from s3d.data.pretrain_dataset import RandomCropDataset, build_pretrain_loader  # noqa: E402
from s3d.data.store import open_volume, random_crop_start, read_crop, save_volume  # noqa: E402

NEED_CROPS_PER_S = 24.0  # ResEnc-L at batch 6 and 0.25 s/step
NODE_CORES = 16


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


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- 1. stores ---------------------------------------------------------------------------------------
def _nnunet_b2nd(vols: list[np.ndarray], tmp: Path) -> list[Path]:
    """The volumes written with nnU-Net's blosc2 settings for a 160^3 float32 patch."""
    import blosc2

    blocks, chunks = (1, 32, 32, 32), (1, 128, 128, 96)
    paths = []
    for i, v in enumerate(vols):
        slab = np.ascontiguousarray(v[(slice(None), *[slice((n - min(c, n)) // 2, (n - min(c, n)) // 2 + min(c, n))
                                                      for n, c in zip(v.shape[1:], chunks[1:], strict=True)])])
        sizes = {}
        for f in (blosc2.Filter.NOFILTER, blosc2.Filter.SHUFFLE):  # nnU-Net keeps the smaller (ties: NOFILTER)
            trial = blosc2.asarray(slab, chunks=slab.shape, blocks=tuple(min(b, s) for b, s in zip(blocks, slab.shape)),
                                   cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [f], "nthreads": 1})
            sizes[f] = trial.schunk.cbytes
        filt = min(sizes, key=lambda f: (sizes[f], f != blosc2.Filter.NOFILTER))
        p = tmp / f"nnunet_{i}.b2nd"
        blosc2.asarray(np.ascontiguousarray(v), urlpath=str(p), mode="w", chunks=chunks, blocks=blocks,
                       cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [filt], "nthreads": 1})
        paths.append(p)
    return paths


def _open_nnunet(p: Path):
    import blosc2

    return blosc2.open(str(p), mode="r", dparams={"nthreads": 1}, mmap_mode="r")


def bench_stores(vols: list[np.ndarray], tmp: Path, patch: int, reads: int) -> list[dict]:
    size = (patch,) * 3
    raw = sum(v.nbytes for v in vols)
    starts = [random_crop_start(vols[i % len(vols)].shape[1:], size, np.random.default_rng(i)) for i in range(reads)]

    def measure(name: str, write, opener, note: str = "", reader=None) -> dict:
        reader = reader or (lambda a, s: read_crop(a, s, size))
        t = time.perf_counter()
        paths = write()
        write_s = time.perf_counter() - t
        arrs = [opener(p) for p in paths]
        reader(arrs[0], starts[0])  # warm the page cache
        times = []
        for i, s in enumerate(starts):
            t = time.perf_counter()
            reader(arrs[i % len(arrs)], s)
            times.append(time.perf_counter() - t)
        disk = sum(_size(p) for p in paths)
        row = {"store": name, "bytes": disk, "ratio_vs_raw": raw / disk, "write_s_per_volume": write_s / len(vols),
               "crop_ms_median": 1000 * float(np.median(times)), "crop_ms_min": 1000 * min(times),
               "crops_per_s_per_worker": len(times) / sum(times)}
        if note:
            row["note"] = note
        print("store", json.dumps(row), flush=True)
        return row

    rows = []
    for dtype in ("float32", "float16"):
        rows.append(measure(f"npy {dtype} (mmap)",
                            lambda d=dtype: [save_volume(tmp / f"n{d}_{i}.npy", v, d) for i, v in enumerate(vols)],
                            open_volume))
    rows.append(measure("b2nd s3d (LZ4-5 shuffle, chunks 80^3, blocks 16^3)",
                        lambda: [save_volume(tmp / f"s3d_{i}.b2nd", v) for i, v in enumerate(vols)], open_volume))
    rows.append(measure("b2nd s3d float16", lambda: [save_volume(tmp / f"s3d16_{i}.b2nd", v, "float16")
                                                       for i, v in enumerate(vols)], open_volume))
    rows.append(measure("b2nd nnU-Net (LZ4HC-5, chunks 128x128x96, blocks 32^3)",
                        lambda: _nnunet_b2nd(vols, tmp), _open_nnunet))

    def npz_write() -> list[Path]:
        out = []
        for i, v in enumerate(vols):
            np.savez_compressed(tmp / f"z_{i}.npz", data=v)
            out.append(tmp / f"z_{i}.npz")
        return out

    rows.append(measure("npz compressed", npz_write, lambda p: p, note="inflates the whole volume for every crop",
                        reader=lambda p, s: read_crop(np.load(p)["data"], s, size)))
    return rows


# ---- 2. data path ------------------------------------------------------------------------------------
def _s3d_batch(ds: RandomCropDataset, aug: Augment, batch: int, first: int) -> float:
    """Seconds for one batch: read ``batch`` crops, augment them on the CPU."""
    t = time.perf_counter()
    x = torch.stack([ds[first + j] for j in range(batch)])
    aug(x, torch.Generator().manual_seed(first))
    return time.perf_counter() - t


def _bg_pipeline(files: list[str], patch: int, batch: int, order: int):
    try:
        from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from batchgenerators.transforms.abstract_transforms import Compose
        from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    except ImportError:
        return None

    class CropLoader(SlimDataLoaderBase):
        def __init__(self) -> None:
            super().__init__(files, batch, None)
            self.ds = RandomCropDataset(files, (patch,) * 3, seed=1)  # the same crop reads as s3d's
            self.i = 0

        def generate_train_batch(self) -> dict:
            crops = [self.ds[self.i + j].numpy() for j in range(self.batch_size)]
            self.i += self.batch_size
            return {"data": np.stack(crops)}

    a = math.radians(30)
    transform = Compose([
        SpatialTransform((patch,) * 3, patch_center_dist_from_border=None, do_elastic_deform=False,
                         do_rotation=True, angle_x=(-a, a), angle_y=(-a, a), angle_z=(-a, a), p_rot_per_axis=1,
                         do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
                         order_data=order, random_crop=False, p_el_per_sample=0, p_scale_per_sample=0.2,
                         p_rot_per_sample=0.2),
        MirrorTransform((0, 1, 2)),
    ])
    return SingleThreadedAugmenter(CropLoader(), transform)


def bench_data_path(files: dict[str, list[str]], patch: int, batch: int, batches: int, rounds: int,
                    order: int) -> dict:
    """crops/s on one core: s3d (each store) and batchgenerators (default store). The pipelines take turns
    batch by batch, so that load from other jobs hits them alike; rates are crops over summed time."""
    aug = Augment(AugmentConfig.pretraining())
    np.random.seed(0)  # batchgenerators draws from NumPy's global generator
    gen = _bg_pipeline(files["b2nd"], patch, batch, order)
    dss = {k: RandomCropDataset(v, (patch,) * 3, seed=1) for k, v in files.items()}
    names = [f"s3d {k}" for k in files] + (["batchgenerators b2nd"] if gen is not None else [])
    for k in files:
        _s3d_batch(dss[k], aug, batch, 10**6)  # warm-up (opens the volumes)
    if gen is not None:
        next(gen)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    total = {n: 0.0 for n in names}
    for r in range(rounds):
        spent = {n: 0.0 for n in names}
        for b in range(batches):
            first = (r * batches + b) * batch
            for k in files:
                spent[f"s3d {k}"] += _s3d_batch(dss[k], aug, batch, first)
            if gen is not None:
                t = time.perf_counter()
                next(gen)
                spent["batchgenerators b2nd"] += time.perf_counter() - t
        for n in names:
            per_round[n].append(batches * batch / spent[n])
            total[n] += spent[n]
        print("round", r, json.dumps({n: round(v[-1], 2) for n, v in per_round.items()}), flush=True)
    out: dict = {n: {"crops_per_s": rounds * batches * batch / total[n], "rounds": per_round[n]} for n in names}
    if gen is None:
        out["batchgenerators"] = "not installed (pip install batchgenerators)"
        return out
    bg = "batchgenerators b2nd"
    for k in files:
        out[f"ratio s3d {k} / batchgenerators"] = out[f"s3d {k}"]["crops_per_s"] / out[bg]["crops_per_s"]
        out[f"ratio s3d {k} / batchgenerators per round"] = [a / b for a, b in zip(per_round[f"s3d {k}"],
                                                                                    per_round[bg], strict=True)]
    return out


# ---- 3. profile --------------------------------------------------------------------------------------
def _best_ms(f, n: int = 3) -> float:
    f()
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def profile(files: dict[str, list[str]], f16_file: str, patch: int) -> dict:
    import torch.nn.functional as F

    from s3d.augment import AugmentParams
    from s3d.augment.spatial import _sampling_grid, mirror, sampling_matrices

    size = (patch,) * 3
    out = {}
    for k, fs in files.items():
        vol = open_volume(fs[0])
        start = random_crop_start(vol.shape[1:], size, np.random.default_rng(0))
        out[f"read {k} ms"] = _best_ms(lambda vol=vol, start=start: read_crop(vol, start, size))
    v16 = open_volume(f16_file)
    region = np.asarray(v16[:, :patch, :patch, :patch])
    out["float16 -> float32 conversion ms"] = _best_ms(lambda: region.astype(np.float32))
    cfg = AugmentConfig.pretraining()
    out["parameter draw ms (batch 2)"] = _best_ms(lambda: cfg.sample(2, torch.Generator().manual_seed(0)))
    x = torch.from_numpy(read_crop(open_volume(files["npy"][0]), (0, 0, 0), size))[None]
    p = AugmentParams.identity(1)
    p.angles[:] = torch.tensor([[0.3, -0.2, 0.4]], dtype=torch.float64)
    p.scale[:] = 1.2
    m = sampling_matrices(p).float()
    out["sampling grid ms (one sample)"] = _best_ms(lambda: _sampling_grid(m, size))
    grid = _sampling_grid(m, size)
    out["grid_sample trilinear ms (one sample)"] = _best_ms(
        lambda: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    flip = torch.tensor([[True, False, True]])
    out["mirror ms (one sample)"] = _best_ms(lambda: mirror(x, flip))
    p_moved = 1 - (1 - cfg.p_rotation) * (1 - cfg.p_scale)
    p_flip = 1 - (1 - cfg.p_mirror) ** 3
    resample = out["sampling grid ms (one sample)"] + out["grid_sample trilinear ms (one sample)"]
    out["P(resampled)"] = p_moved
    out["expected augmentation ms per crop"] = p_moved * resample + p_flip * out["mirror ms (one sample)"]
    return out


# ---- device path (augmentation on --device, as s3d pretrain does) ----------------------------------
def bench_device_path(files: list[str], patch: int, batch: int, batches: int, workers: int, device: str) -> dict:
    """crops/s of the training data path: DataLoader workers read crops, the batch is augmented on ``device``;
    with ``loader_wait`` (fraction of the time spent waiting for the next batch)."""
    from s3d.data.pretrain_dataset import LoaderStats

    warm = 2
    loader = LoaderStats(build_pretrain_loader(files, (patch,) * 3, batch, 0, batches + warm, seed=0,
                                               workers=workers, pin_memory=device.startswith("cuda")))
    aug = Augment(AugmentConfig.pretraining())
    t0 = None
    for i, x in enumerate(loader):
        if i == warm:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            loader.take()
            t0 = time.perf_counter()
        y = aug(x.to(device, non_blocking=True), torch.Generator().manual_seed(i))
        float(y.view(-1)[0])  # wait for the device
    dt = time.perf_counter() - t0
    return {"pipeline": f"s3d b2nd, {workers} workers, augmentation on {device}", "crops_per_s": batches * batch / dt,
            **loader.take()}


# ---- 4. extrapolation --------------------------------------------------------------------------------
def bench_workers(files: list[str], patch: int, batch: int, batches: int, workers: int) -> float:
    """crops/s of a DataLoader with ``workers`` processes that only read crops (augmentation on the GPU)."""
    loader = build_pretrain_loader(files, (patch,) * 3, batch, 0, batches + 2, seed=2, workers=workers,
                                   pin_memory=False, prefetch_factor=2)
    it = iter(loader)
    next(it), next(it)
    t = time.perf_counter()
    n = sum(b.shape[0] for b in it)
    return n / (time.perf_counter() - t)


def extrapolate(path: dict, prof: dict, loader_rate: float | None, workers: int) -> dict:
    """Workers a 16-core node needs for 24 crops/s: ``ceil(24 / r)`` for a per-worker rate ``r`` (crops/s
    of one worker on one core), from three rates measured here: the bare crop read (best of 3), the
    DataLoader's rate per worker (read + collate + hand-over to the main process, on this shared
    machine), and the whole data path on one core (read + augmentation on the CPU, for a node without
    a GPU doing the augmentation)."""
    out: dict = {"need crops/s": NEED_CROPS_PER_S, "node cores": NODE_CORES}
    rates = {"bare b2nd read": 1000 / prof["read b2nd ms"]}
    if loader_rate is not None:
        rates[f"DataLoader b2nd per worker ({workers} workers)"] = loader_rate / workers
    rates["read + augmentation on the CPU (b2nd)"] = path["s3d b2nd"]["crops_per_s"]
    for name, r in rates.items():
        out[f"{name}: crops/s per worker"] = r
        out[f"{name}: workers for 24 crops/s"] = math.ceil(NEED_CROPS_PER_S / r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[192, 224, 192])
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--patch", type=int, default=160)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=5, help="batches per pipeline and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reads", type=int, default=20, help="crop reads per store")
    ap.add_argument("--order", type=int, default=1, help="batchgenerators spline order (1 = trilinear, as s3d)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the scaling measurement")
    ap.add_argument("--skip-storage", action="store_true")
    ap.add_argument("--device", default=None,
                    help="also measure the training data path with the augmentation on this device (cuda, cpu); "
                         "with a device other than cpu the per-core CPU comparison is skipped unless --cpu-path")
    ap.add_argument("--cpu-path", action="store_true", help="run the per-core comparison with --device too")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vols = [synthetic_volume(tuple(args.shape), i) for i in range(args.volumes)]
    res: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                 "torch_threads": torch.get_num_threads(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_storage:
            res["stores"] = bench_stores(vols, tmp, args.patch, args.reads)
        files = {k: [str(save_volume(tmp / f"v{i}.{k}", v)) for i, v in enumerate(vols)] for k in ("b2nd", "npy")}
        f16 = str(save_volume(tmp / "v16.b2nd", vols[0], "float16"))
        if args.device is not None:
            res["device_path"] = bench_device_path(files["b2nd"], args.patch, args.batch, args.batches,
                                                   args.workers, args.device)
            print("device_path", json.dumps(res["device_path"]), flush=True)
        path = None
        if args.device in (None, "cpu") or args.cpu_path:
            res["data_path"] = path = bench_data_path(files, args.patch, args.batch, args.batches, args.rounds,
                                                      args.order)
            res["profile"] = prof = profile(files, f16, args.patch)
            print("profile", json.dumps({k: round(v, 3) for k, v in prof.items()}), flush=True)
            rate = bench_workers(files["b2nd"], args.patch, args.batch, 4 * args.batches, args.workers) \
                if args.workers > 0 else None
            res["node"] = extrapolate(path, prof, rate, args.workers)
            print("node", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                      for k, v in res["node"].items()}))
    res["load_avg_end"] = os.getloadavg()
    if path is not None and "batchgenerators b2nd" in path:
        for k in ("b2nd", "npy"):
            print(f"data path, one thread each, trilinear, same run: s3d ({k} store) "
                  f"{path[f's3d {k}']['crops_per_s']:.2f} crops/s vs batchgenerators "
                  f"{path['batchgenerators b2nd']['crops_per_s']:.2f} crops/s: "
                  f"ratio {path[f'ratio s3d {k} / batchgenerators']:.2f}x (per round: "
                  f"{', '.join(f'{r:.2f}' for r in path[f'ratio s3d {k} / batchgenerators per round'])})")
    if args.json:
        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
