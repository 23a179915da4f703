"""``s3d info``: versions, devices, threads; ``--forward`` times one real forward pass."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="versions, torch device and threads; optionally time a forward pass",
                              description="Print versions, devices and threads. With --forward, build a "
                                          "network and run one forward pass on a random volume.")
    p.add_argument("--forward", action="store_true", help="run one forward pass and print shape, time, memory")
    p.add_argument("--config", default="resenc_l",
                   help="network preset for --forward: resenc_l, small, tiny, or a Primus preset primus_s, primus_b, "
                        "primus_m, primus_l, primus_tiny (built for the --size patch) (default: resenc_l)")
    p.add_argument("--size", type=int, nargs="+", default=[64], metavar="N",
                   help="input size in voxels, one value (cube) or three (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    import s3d

    print(f"s3d {s3d.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  numpy {numpy.__version__}")
    print(f"cpu threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {props.name} {props.total_memory / 2**30:.1f} GiB "
                  f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        print("cuda: not available (CPU only)")
    if not args.forward:
        return 0

    from s3d._profiling import measure

    if len(args.size) not in (1, 3):
        print("--size takes one value or three")
        return 2
    size = tuple(args.size) * 3 if len(args.size) == 1 else tuple(args.size)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    x = torch.randn(1, 1, *size, device=device)
    try:
        if args.config.startswith("primus"):
            net = s3d.build_primus(args.config, in_channels=1, num_classes=2, input_shape=size)
        else:
            net = s3d.build_resenc_unet(args.config, in_channels=1, num_classes=2)
    except ValueError as e:
        print(f"--config/--size: {e} (Primus presets: {', '.join(sorted(s3d.nn.PRIMUS_CONFIGS))})")
        return 2
    net = net.to(device).eval()
    n_params = sum(p.numel() for p in net.parameters())
    try:
        net.check_input(x)
    except ValueError as e:
        print(f"--size: {e}")
        return 2
    out = None

    def forward() -> None:
        nonlocal out
        with torch.no_grad():
            out = net(x)

    t = measure(forward, device, repeats=1, warmup=1)
    print(f"{args.config}: {n_params:,} parameters on {device}")
    print(f"forward 1x1x{'x'.join(map(str, size))} -> {tuple(out.shape)} in {t.seconds:.2f} s, "
          f"peak memory {t.peak_bytes / 2**20:.0f} MiB")
    return 0
