"""Fine-tuning data path vs network: patches/s of the loader against steps/s of the training step.

Three measurements on synthetic cached cases (memory-mapped ``.npy`` files, as ``s3d finetune`` reads
its cache; one sphere label per case, so foreground oversampling has something to find):

1. **loader**: patches/s of :func:`s3d.finetune.loader.sample_step` (random + foreground patches,
   zero padding) alone, and through :class:`~s3d.finetune.loader.PatchPrefetcher` with ``--threads``
   background threads (pinned memory on CUDA);
2. **step**: s/step of the trainer's step on ``--device`` (augmentation on the device, forward with deep
   supervision, Dice+CE, backward, clip, SGD) for each variant (``fp32``; CUDA also ``bf16`` and
   ``channels_last``), with the batch already on the device;
3. **overlap**: the same step fed by the prefetcher: the time the step waited for its batch.

The table's ratio is loader patches/s (prefetched) over the patches/s the step consumes (batch x
steps/s): above 1 the network never waits. Wall times and process CPU times (all threads) are both
printed; on a shared machine the CPU times are the steadier numbers.

    python benchmarks/finetune_data.py --config tiny --patch 32 --batch 2 --device cpu
    python benchmarks/finetune_data.py --config resenc_l --patch 160 --batch 2 --device cuda --threads 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from s3d.augment import Augment
from s3d.finetune.loader import PatchPrefetcher, augment_generator, sample_step
from s3d.finetune.losses import DiceCELoss
from s3d.finetune.patches import CachedCase
from s3d.nn import build_resenc_unet
from s3d.runtime.optim import backward_and_step, grad_scaler, sgd


def synthetic_cases(folder: Path, n: int, shape: tuple[int, int, int], channels: int, seed: int = 0
                    ) -> list[CachedCase]:
    """``n`` cases written as .npy and memory-mapped back: noise with a bright labelled sphere."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    cases = []
    for i in range(n):
        centre = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
        seg = (((grid - centre[:, None, None, None]) ** 2).sum(0) < (min(shape) / 6) ** 2).astype(np.int16)
        data = (rng.standard_normal((channels, *shape)) + 2 * seg).astype(np.float32)
        np.save(folder / f"c{i}_data.npy", data)
        np.save(folder / f"c{i}_seg.npy", seg)
        locs = np.concatenate([np.ones((int(seg.sum()), 1)), np.argwhere(seg == 1)], 1).astype(np.int32)
        cases.append(CachedCase(f"c{i}", np.load(folder / f"c{i}_data.npy", mmap_mode="r"),
                                np.load(folder / f"c{i}_seg.npy", mmap_mode="r"), locs))
    return cases


def loader_rates(cases, batch: int, patch: int, steps: int, threads: int, device: torch.device) -> dict:
    def make(t: int):
        return sample_step(cases, batch, (patch,) * 3, seed=0, rank=0, step=t)

    for t in range(2):  # page the memory maps in
        make(t)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(steps):
        make(t)
    sync_wall, sync_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    with PatchPrefetcher(make, 0, steps, device, threads=threads) as batches:
        for t in range(steps):
            batches.get(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    pre_wall, pre_cpu = time.perf_counter() - t0, time.process_time() - c0
    n = steps * batch
    return {"loader_patches_per_s": round(n / sync_wall, 2), "loader_cpu_s_per_patch": round(sync_cpu / n, 5),
            "prefetch_patches_per_s": round(n / pre_wall, 2), "prefetch_cpu_s_per_patch": round(pre_cpu / n, 5),
            "threads": threads}


def make_step(config: str, channels: int, device: torch.device, amp: torch.dtype | None, channels_last: bool):
    torch.manual_seed(0)
    net = build_resenc_unet(config, in_channels=channels, num_classes=2, deep_supervision=True).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = sgd(net.parameters(), 1e-3, momentum=0.99, weight_decay=3e-5)
    scaler, loss_fn, aug = grad_scaler(amp, device), DiceCELoss(), Augment()

    def ctx():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor, t: int) -> None:
        x, y = aug(x, augment_generator(0, 0, t), labels=y)
        x = x.contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        with ctx():
            out = net(x)
        backward_and_step(loss_fn(out, y), opt, scaler, 12.0)

    return step


def step_rates(step, cases, batch: int, patch: int, device: torch.device, repeats: int, threads: int) -> dict:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x, y = sample_step(cases, batch, (patch,) * 3, seed=0, rank=0, step=0)
    x, y = x.to(device), y.to(device)
    for t in range(2):
        step(x, y, t)
    sync()
    walls, cpus = [], []
    for t in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y, t)
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    wall, cpu = walls[len(walls) // 2], cpus[len(cpus) // 2]

    def make(t: int):
        return sample_step(cases, batch, (patch,) * 3, seed=0, rank=0, step=t)

    waited = 0.0
    t0 = time.perf_counter()
    with PatchPrefetcher(make, 0, repeats, device, threads=threads) as batches:
        for t in range(repeats):
            w0 = time.perf_counter()
            xb, yb = batches.get(t)
            waited += time.perf_counter() - w0
            step(xb, yb, t)
        sync()
    fed = (time.perf_counter() - t0) / repeats
    return {"s_per_step": round(wall, 4), "steps_per_s": round(1 / wall, 3), "cpu_s_per_step": round(cpu, 4),
            "fed_s_per_step": round(fed, 4), "waited_s_per_step": round(waited / repeats, 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--case-shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="cached case shape (default: 1.25x the patch, plus 8)")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=None, help="comma list of fp32,bf16,channels_last (default: what applies)")
    p.add_argument("--threads", type=int, default=2, help="prefetch threads")
    p.add_argument("--loader-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = tuple(args.case_shape) if args.case_shape else (int(args.patch * 1.25) + 8,) * 3
    variants = args.variants.split(",") if args.variants else (["fp32", "bf16", "channels_last"] if cuda else ["fp32"])
    table = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "channels_last": (torch.bfloat16, True)}
    print(json.dumps({"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "threads_torch": torch.get_num_threads(), "config": args.config,
                      "patch": args.patch, "batch": args.batch, "case_shape": shape}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = synthetic_cases(Path(tmp), args.cases, shape, args.channels)
        loader = loader_rates(cases, args.batch, args.patch, args.loader_steps, args.threads, device)
        print(json.dumps({"variant": "loader", **loader}), flush=True)
        for name in variants:
            if name not in table or (not cuda and name != "fp32"):
                print(json.dumps({"variant": name, "skipped": f"not measured on {device.type}"}))
                continue
            amp, cl = table[name]
            try:
                step = make_step(args.config, args.channels, device, amp, cl)
                r = step_rates(step, cases, args.batch, args.patch, device, args.repeats, args.threads)
                r["ratio"] = round(loader["prefetch_patches_per_s"] / (args.batch * r["steps_per_s"]), 2)
                r["cpu_ratio"] = round(r["cpu_s_per_step"] / (args.batch * loader["prefetch_cpu_s_per_patch"]), 2)
                if cuda:
                    r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            except Exception as e:  # noqa: BLE001 - report the variant, measure the others
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            row = {"variant": name, **r}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n| {args.config} {args.patch}^3 x{args.batch} | s/step | steps/s | loader patches/s "
          f"({args.threads} threads) | ratio (wall) | ratio (CPU time) | waited s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | | |")
            continue
        print(f"| {r['variant']} | {r['s_per_step']} | {r['steps_per_s']} | {loader['prefetch_patches_per_s']} "
              f"| {r['ratio']} | {r['cpu_ratio']} | {r['waited_s_per_step']} |")


if __name__ == "__main__":
    main()
