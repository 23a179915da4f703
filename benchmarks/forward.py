"""Forward and forward+backward time and peak memory: s3d's ResEnc U-Net vs DNA's, in one run.

Variants: fp32, channels_last_3d, and autocast (bf16; fp16 too on CUDA). Each row is measured for
s3d and for dynamic-network-architectures' ResidualEncoderUNet built from the same config with
the same weights; the last column is s3d time / DNA time.

    python benchmarks/forward.py --config resenc_l --size 64 --batch 1
    python benchmarks/forward.py --config resenc_l --size 160 --batch 2 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import s3d  # noqa: E402
from s3d._profiling import measure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="resenc_l")
    p.add_argument("--size", type=int, default=64, help="cube edge, voxels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma list of fp32,channels_last,bf16,fp16")
    args = p.parse_args()

    from dna_reference import build_dna, load_into_dna  # the reference, as used by the tests

    device = torch.device(args.device)
    ours = s3d.build_resenc_unet(args.config, num_classes=2).to(device)
    dna = build_dna(ours.config).to(device)
    load_into_dna(dna, ours.state_dict())
    x = torch.randn(args.batch, 1, *(args.size,) * 3, device=device)

    variants = ["fp32", "channels_last", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    if args.variants:
        variants = args.variants.split(",")

    print(f"# {args.config}, input {args.batch}x1x{args.size}^3, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| variant | pass | s3d s | DNA s | s3d peak MiB | DNA peak MiB | s3d/DNA time |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        fmt = torch.channels_last_3d if variant == "channels_last" else torch.contiguous_format
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant)
        xv = x.contiguous(memory_format=fmt)
        for net in (ours, dna):
            net.to(memory_format=fmt)

        def ctx(dtype=dtype):
            return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

        for kind in ("fwd", "fwd+bwd"):
            results = []
            for net in (ours, dna):
                def step(net=net, kind=kind, xv=xv) -> None:
                    if kind == "fwd":
                        with torch.no_grad(), ctx():
                            net(xv)
                    else:
                        net.zero_grad(set_to_none=True)
                        with ctx():
                            out = net(xv)
                        out.float().square().mean().backward()
                results.append(measure(step, device, repeats=args.repeats))
            a, b = results
            print(f"| {variant} | {kind} | {a.seconds:.3f} | {b.seconds:.3f} | {a.peak_bytes / 2**20:.0f} | "
                  f"{b.peak_bytes / 2**20:.0f} | {a.seconds / b.seconds:.2f} |")


if __name__ == "__main__":
    main()
