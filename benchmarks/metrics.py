"""NSD (surface Dice) time on 256^3 pairs: s3d.metrics.nsd vs DeepMind's surface-distance, in one run.

Pairs: two overlapping spheres (radius 100 and 98 voxels, shifted by a few voxels; bounding box
~200^3) and two random smooth blobs filling the whole volume (bounding box 256^3), each at
isotropic and anisotropic spacing. The target is < 5 s per NSD on the CPU. The reference is the
PyPI package ``surface-distance`` (``pip install surface-distance``); without it only s3d is timed.

    OMP_NUM_THREADS=1 python benchmarks/metrics.py
    python benchmarks/metrics.py --size 128 --repeats 3 --method edt --no-reference
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _pairs(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from scipy import ndimage

    c = size / 2
    grid = np.ogrid[:size, :size, :size]

    def ball(center, radius):
        return sum((g - x) ** 2 for g, x in zip(grid, center, strict=True)) <= radius**2

    r = 100 * size / 256
    spheres = (ball((c, c, c), r), ball((c + 2, c - 1, c + 3), 0.98 * r))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((size, size, size)).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, 6)
    blobs = (smooth > 0, ndimage.gaussian_filter(smooth + 0.002 * noise, 1) > 0.001)
    return {"spheres": spheres, "blobs": blobs}


def _time(fn, repeats: int) -> tuple[float, float]:
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="cube edge, voxels (default 256)")
    p.add_argument("--tau", type=float, default=2.0, help="tolerance, mm")
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    p.add_argument("--method", default="auto", choices=["auto", "edt", "offsets"], help="nsd(method=...)")
    p.add_argument("--no-reference", action="store_true", help="time s3d only")
    args = p.parse_args()

    from s3d.metrics import nsd

    try:
        import surface_distance as sd

        if args.no_reference:
            sd = None
    except ImportError:
        sd = None
        print("surface-distance not installed: timing s3d only (pip install surface-distance)")

    print(f"{'pair':<10}{'spacing mm':<18}{'s3d s':>8}{'ref s':>8}{'s3d/ref':>9}{'s3d NSD':>10}"
          f"{'ref NSD':>10}{'< 5 s':>7}")
    for name, (ref, pred) in _pairs(args.size).items():
        for spacing in ((1.0, 1.0, 1.0), (0.8, 0.8, 2.5)):
            def ours():
                return nsd(pred, ref, spacing, args.tau, method=args.method)  # noqa: B023

            t_ours, v_ours = _time(ours, args.repeats)
            t_ref, v_ref = float("nan"), float("nan")
            if sd is not None:
                def reference():
                    d = sd.compute_surface_distances(ref, pred, spacing)  # noqa: B023
                    return sd.compute_surface_dice_at_tolerance(d, args.tau)
                t_ref, v_ref = _time(reference, args.repeats)
            print(f"{name:<10}{str(spacing):<18}{t_ours:>8.2f}{t_ref:>8.2f}{t_ours / t_ref:>9.2f}"
                  f"{v_ours:>10.5f}{v_ref:>10.5f}{'yes' if t_ours < 5 else 'NO':>7}", flush=True)


if __name__ == "__main__":
    main()
