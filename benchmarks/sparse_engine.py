"""One sparse-MAE pre-training step, "blocks" engine vs "dense" engine: time, peak memory, ratio.

A step is what :class:`s3d.SparseMAEWrapper` does (mask -> masked encoder -> densify -> decoder ->
masked MSE) plus backward and an SGD step; only the encoder engine differs. The dense engine's
cost does not depend on the mask ratio, so it is measured once per (config, size) unless
``--dense-per-ratio``. The blocks engine is run at every ``--min-block-edges`` value so the
crossover (the block edge below which a stage runs dense) is measured, not guessed.
On CUDA, peak memory is ``max_memory_allocated``; on CPU it is the sampled process RSS above the
level at the start of the measurement (includes allocator slack).

    OMP_NUM_THREADS=2 python benchmarks/sparse_engine.py                       # CPU table
    python benchmarks/sparse_engine.py --min-block-edges 4,8,16     # crossover sweep
    python benchmarks/sparse_engine.py --device cuda --min-block-edges 4,8 [--amp bf16]  # GPU cases
    python benchmarks/sparse_engine.py --cases tiny:32:16:2 --ratios 0.75 --auto   # + the "auto" choice
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import s3d
from s3d._profiling import Timing
from s3d._profiling import measure as _measure
from s3d.sparse.block_engine import block_plan, blocks_engine
from s3d.sparse.mask import sample_block_mask
from s3d.sparse.wrapper import SparseMAEWrapper, masked_mse_loss

#: CPU-sized patches; on a GPU the paper's 160^3 patch at batch 2 and 6 (S3D-B uses 6).
CPU_CASES = "tiny:64:16:2,resenc_l:64:16:1,resenc_l:128:32:1"
GPU_CASES = "tiny:64:16:2,resenc_l:128:32:2,resenc_l:160:32:2,resenc_l:160:32:6,resenc_l:160:16:2"


Result = Timing  # median wall s, median process CPU s, peak bytes (s3d._profiling)


def measure(fn, device: torch.device, repeats: int, warmup: int) -> Timing:
    """Time ``fn``: wall and CPU time (CPU time is robust to other processes' load on a shared box)."""
    return _measure(fn, device, repeats=repeats, warmup=warmup)


def make_step(mae: SparseMAEWrapper, opt: torch.optim.Optimizer, x: torch.Tensor, keep: torch.Tensor,
              engine: str, min_block_edge: int | None, amp: torch.dtype | None):
    """A closure running one full pre-training step with the given encoder engine."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            plan = mae.plan(keep, x.shape[2:])  # one mask plan per step, as the wrapper's forward builds it
            if engine == "dense":
                feats = mae.backbone.encoder(x, plan.keeps)
            else:
                feats = blocks_engine(mae.backbone.encoder, x, plan, min_block_edge=min_block_edge)
            rec = mae.backbone.decoder(mae.densifier(feats, plan.keeps[1:]))
        loss = masked_mse_loss(rec, x, plan.keeps[0])
        loss.backward()
        opt.step()

    return step


def _row(head: str, engine: str, mbe: str, at: str, t: Result, dense: Result) -> str:
    return (f"{head} | {engine} | {mbe} | {at} | {t.seconds:.3f} | {1 / t.seconds:.3f} | "
            f"{t.cpu_seconds:.2f} | {t.peak_bytes / 2**20:.0f} | {dense.seconds / t.seconds:.2f} | "
            f"{dense.cpu_seconds / t.cpu_seconds:.2f} | {t.peak_bytes / max(dense.peak_bytes, 1):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=None,
                   help="comma list of config:size:block_size:batch (default: CPU_CASES or GPU_CASES)")
    p.add_argument("--ratios", default="0.6,0.75,0.9")
    p.add_argument("--min-block-edges", default="8", help="comma list of crossover edges to try")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    p.add_argument("--dense-per-ratio", action="store_true")
    p.add_argument("--auto", action="store_true",
                   help="also print what engine='auto' picks for each case (s3d.sparse.autotune)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.cases is None:
        args.cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp or "")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device {device} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"amp {args.amp or 'off'}; step = fwd + bwd + SGD through SparseMAEWrapper's pieces")
    print("| config | size | bs | batch | ratio (visible) | engine | min edge | blocks at | wall s/step | "
          "steps/s | CPU s/step | peak MiB | dense/blocks wall | dense/blocks CPU | blocks/dense mem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        cfg, size, bs, batch = case.split(":")
        size, bs, batch = int(size), int(bs), int(batch)
        torch.manual_seed(0)
        net = s3d.build_resenc_unet(cfg, in_channels=1, num_classes=1).to(device)
        mae = SparseMAEWrapper(net, block_size=bs).to(device)
        opt = torch.optim.SGD(mae.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
        x = torch.randn(batch, 1, size, size, size, device=device)
        dense_t = None
        for ratio in [float(r) for r in args.ratios.split(",")]:
            gen = torch.Generator().manual_seed(1)
            keep = sample_block_mask(batch, x.shape[2:], bs, ratio, True, gen).to(device)
            vis = float(keep.float().mean())
            head = f"| {cfg} | {size} | {bs} | {batch} | {ratio:.2f} ({vis:.2f})"

            if dense_t is None or args.dense_per_ratio:
                dense_t = measure(make_step(mae, opt, x, keep, "dense", None, amp), device, args.repeats,
                                  args.warmup)
                print(_row(head, "dense", "-", "-", dense_t, dense_t), flush=True)
            for mbe in [int(m) for m in args.min_block_edges.split(",")]:
                plan = block_plan(mae.backbone.encoder, bs, mbe)
                at = f"stem+{sum(plan[1:])}" if plan[0] else "none"
                t = measure(make_step(mae, opt, x, keep, "blocks", mbe, amp), device, args.repeats,
                            args.warmup)
                print(_row(head, "blocks", str(mbe), at, t, dense_t), flush=True)
            if args.auto:
                ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
                with ctx:
                    choice = mae.engine_choice(x, mae.plan(keep, x.shape[2:]))
                print(f"# {choice.message()}", flush=True)

if __name__ == "__main__":
    main()
