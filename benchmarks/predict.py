"""Sliding-window tile throughput: s3d's ``sliding_window_predict`` vs MONAI's ``sliding_window_inference``.

Both run the same network (same weights) on the same volume in one process, with Gaussian blending
(sigma = patch / 8), the same overlap (1 - step) and the same tiles per forward pass. Tiles are
counted by wrapping the network, so "tiles/s" is what each implementation actually ran (the two
place tiles differently and may run different counts). The last columns compare the outputs:
max |difference| of the logits and the fraction of voxels with the same argmax.

MONAI is a benchmark/example-only dependency: ``pip install monai``.

    python benchmarks/predict.py --config tiny --size 96 --patch 32
    python benchmarks/predict.py --config resenc_l --size 320 --patch 160 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import s3d
from s3d._profiling import measure
from s3d.infer import gaussian_importance_map, sliding_window_predict


class TileCounter(torch.nn.Module):
    """Forwards to ``net`` and counts the tiles (batch entries) it was given."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.tiles = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += x.shape[0]
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="network preset (tiny, small, resenc_l)")
    p.add_argument("--size", type=int, nargs="+", default=[96], help="volume size, voxels (1 or 3 values)")
    p.add_argument("--patch", type=int, nargs="+", default=[32], help="patch size, voxels (1 or 3 values)")
    p.add_argument("--step", type=float, default=0.5,
                   help="tile step as a fraction of the patch (overlap = 1 - step)")
    p.add_argument("--tile-batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    try:
        from monai.inferers import sliding_window_inference
    except ImportError as e:
        raise SystemExit("this benchmark needs MONAI: pip install monai") from e
    import monai

    size = tuple(args.size) * 3 if len(args.size) == 1 else tuple(args.size)
    patch = tuple(args.patch) * 3 if len(args.patch) == 1 else tuple(args.patch)
    device = torch.device(args.device)
    amp = args.amp
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    net = s3d.build_resenc_unet(args.config, in_channels=1, num_classes=args.classes).to(device).eval()
    counter = TileCounter(net)
    x = torch.randn(1, 1, *size, device=device)

    def ctx():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    outputs: dict[str, torch.Tensor] = {}

    def run_s3d() -> None:
        outputs["s3d"] = sliding_window_predict(counter, x, patch, step=args.step, tile_batch=args.tile_batch,
                                                device=device, amp=amp)

    def run_monai(weights: torch.Tensor | None = None, key: str = "monai") -> None:
        with torch.inference_mode(), ctx():
            out = sliding_window_inference(x, patch, args.tile_batch, counter, overlap=1 - args.step,
                                           mode="gaussian", sigma_scale=0.125, roi_weight_map=weights)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out  # MONAI may return a MetaTensor
        outputs[key] = out.float()

    rows = []
    for name, fn in (("s3d", run_s3d), ("monai", run_monai)):
        counter.tiles = 0
        fn()
        tiles = counter.tiles
        t = measure(fn, device, repeats=args.repeats, warmup=1)
        rows.append((name, tiles, t))

    # the same blending weights on both sides: differences left are tile placement only
    run_monai(gaussian_importance_map(patch, device=device), "monai_same_weights")
    a, b = outputs["s3d"].to(device), outputs["monai"].to(device)
    diff = float((a - b).abs().max())
    diff_same = float((a - outputs["monai_same_weights"].to(device)).abs().max())
    scale = float(b.abs().max())
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {args.config}, volume 1x1x{'x'.join(map(str, size))}, patch {'x'.join(map(str, patch))}, "
          f"step {args.step}, tile batch {args.tile_batch}, amp {args.amp}, device {device} ({dev_name}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, monai {monai.__version__}")
    print("| implementation | tiles | s per volume | tiles/s | peak MiB |")
    print("|---|---|---|---|---|")
    for name, tiles, t in rows:
        mib = t.peak_bytes / 2**20
        print(f"| {name} | {tiles} | {t.seconds:.3f} | {tiles / t.seconds:.1f} | {mib:.0f} |")
    s3d_t, monai_t = rows[0][2].seconds, rows[1][2].seconds
    print(f"\ns3d/MONAI time per volume: {s3d_t / monai_t:.2f}; "
          f"tiles/s ratio: {(rows[0][1] / s3d_t) / (rows[1][1] / monai_t):.2f}")
    print(f"outputs: max |logit difference| {diff:.3g} (max |logit| {scale:.3g}); "
          f"argmax agreement {agree:.4%}; with s3d's Gaussian as MONAI's roi_weight_map: max |difference| "
          f"{diff_same:.3g} (0 up to rounding when both place tiles alike)")


if __name__ == "__main__":
    main()
