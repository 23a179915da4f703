"""Fine-tuning augmentation: time per call of s3d.augment vs nnU-Net's own transforms (batchgeneratorsv2).

One call augments a batch (default 2 x 1 x 128^3 float32 image + a 3-label map) on the CPU:

- s3d: ``Augment()(x, gen, labels=y)``, the whole batch at once;
- nnU-Net: the transforms of ``nnUNetTrainer.get_training_transforms`` (3D, no deep supervision, no
  cascade, no regions) built from batchgeneratorsv2 with nnU-Net's settings, applied to each sample of
  the batch in turn, as its data-loader workers do. The spatial transform's input is the patch itself
  (nnU-Net crops it from a larger one, which costs the same grid_sample).

Rows: the default pipeline (mean over ``--calls`` draws, so each transform at its probability), every
transform alone with probability 1 (and 1 per channel), and all of them at once. batchgeneratorsv2 is
not an s3d dependency: give an interpreter that has it with ``--nnunet-python`` (a separate venv), or
leave it out to time s3d only.

Run::

    python3 -m venv /tmp/venv-aug && /tmp/venv-aug/bin/pip install torch batchgeneratorsv2 pandas scikit-image
    PYTHONPATH=$PWD python benchmarks/augment.py --nnunet-python /tmp/venv-aug/bin/python --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROWS = ["default (nnU-Net probabilities)", "rotation + scaling", "gaussian noise", "gaussian blur", "brightness",
        "contrast", "low resolution", "gamma (inverted)", "gamma", "mirroring (p 0.5 per axis)",
        "all transforms on"]


def _inputs(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, size, generator=g)
    coarse = torch.rand(batch, 1, 8, 8, 8, generator=g)
    y = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear")[:, 0]
    return x, torch.bucketize(y, torch.tensor([0.45, 0.6])).long()  # labels 0, 1, 2


def _time(fn, calls: int) -> tuple[float, float]:
    fn(0)  # warm-up
    ts = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i + 1)
        ts.append(time.perf_counter() - t0)
    return statistics.mean(ts), statistics.median(ts)


def bench_s3d(batch: int, size: int, calls: int) -> dict[str, tuple[float, float]]:
    from s3d.augment import Augment, AugmentConfig

    x, y = _inputs(batch, size)
    off = AugmentConfig.off()
    alone = {"rotation + scaling": {"p_rotation": 1.0, "p_scale": 1.0}, "gaussian noise": {"p_noise": 1.0},
             "gaussian blur": {"p_blur": 1.0, "p_blur_per_channel": 1.0}, "brightness": {"p_brightness": 1.0},
             "contrast": {"p_contrast": 1.0}, "low resolution": {"p_lowres": 1.0, "p_lowres_per_channel": 1.0},
             "gamma (inverted)": {"p_gamma_inverted": 1.0}, "gamma": {"p_gamma": 1.0},
             "mirroring (p 0.5 per axis)": {"p_mirror": 0.5}}
    configs = {"default (nnU-Net probabilities)": AugmentConfig()}
    for name, on in alone.items():
        configs[name] = dataclasses.replace(off, **on)
    configs["all transforms on"] = AugmentConfig(**{k: v for on in alone.values() for k, v in on.items()})
    out = {}
    for name, cfg in configs.items():
        aug = Augment(cfg)
        out[name] = _time(lambda i, aug=aug: aug(x, torch.Generator().manual_seed(i), labels=y),
                          calls if name.startswith("default") else max(3, calls // 4))
    return out


def bench_nnunet(batch: int, size: int, calls: int) -> dict[str, tuple[float, float]]:
    """nnU-Net's get_training_transforms (3D full-res settings), built from batchgeneratorsv2."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    rot = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)

    def pipeline(p: dict[str, float], per_channel: float | None = None) -> ComposeTransforms:
        return ComposeTransforms([
            SpatialTransform((size,) * 3, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                             p_rotation=p["rotation"], rotation=rot, p_scaling=p["rotation"], scaling=(0.7, 1.4),
                             p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                             border_mode_seg="constant", padding_value_seg=-1),
            RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                            apply_probability=p["noise"]),
            RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                                  synchronize_axes=False, p_per_channel=per_channel or 0.5,
                                                  benchmark=True), apply_probability=p["blur"]),
            RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                              synchronize_channels=False, p_per_channel=1),
                            apply_probability=p["brightness"]),
            RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                              synchronize_channels=False, p_per_channel=1),
                            apply_probability=p["contrast"]),
            RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                           synchronize_axes=True, ignore_axes=None,
                                                           allowed_channels=None, p_per_channel=per_channel or 0.5),
                            apply_probability=p["lowres"]),
            RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                           p_per_channel=1, p_retain_stats=1), apply_probability=p["gamma_inv"]),
            RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                           p_per_channel=1, p_retain_stats=1), apply_probability=p["gamma"]),
            RandomTransform(MirrorTransform(allowed_axes=(0, 1, 2)), apply_probability=p["mirror"]),
            RemoveLabelTansform(-1, 0),
        ])

    default = {"rotation": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15, "lowres": 0.25,
               "gamma_inv": 0.1, "gamma": 0.3, "mirror": 1.0}
    zero = {k: 0.0 for k in default}
    keys = {"rotation + scaling": "rotation", "gaussian noise": "noise", "gaussian blur": "blur",
            "brightness": "brightness", "contrast": "contrast", "low resolution": "lowres",
            "gamma (inverted)": "gamma_inv", "gamma": "gamma", "mirroring (p 0.5 per axis)": "mirror"}
    pipes = {"default (nnU-Net probabilities)": pipeline(default)}
    for name, k in keys.items():
        pipes[name] = pipeline({**zero, k: 1.0}, per_channel=1.0)
    pipes["all transforms on"] = pipeline({k: 1.0 for k in default}, per_channel=1.0)
    x, y = _inputs(batch, size)
    seg = y.to(torch.int16)
    out = {}
    for name, pipe in pipes.items():
        def call(i: int, pipe=pipe) -> None:
            np.random.seed(i)
            torch.manual_seed(i)
            for b in range(batch):  # one sample at a time, as nnU-Net's workers
                pipe(image=x[b].clone(), segmentation=seg[b][None].clone())
        out[name] = _time(call, calls if name.startswith("default") else max(3, calls // 4))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="patch edge (voxels)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls of the default pipeline (others: calls/4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (nnU-Net's workers use 1)")
    ap.add_argument("--nnunet-python", help="an interpreter with batchgeneratorsv2 (separate venv)")
    ap.add_argument("--part", choices=["both", "s3d", "nnunet"], default="both")
    ap.add_argument("--json", action="store_true", help="print the timings as JSON only")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res: dict[str, dict] = {}
    if a.part in ("both", "s3d"):
        res["s3d"] = bench_s3d(a.batch, a.size, a.calls)
    if a.part == "nnunet":
        res["nnunet"] = bench_nnunet(a.batch, a.size, a.calls)
    elif a.part == "both" and a.nnunet_python:
        cmd = [a.nnunet_python, __file__, "--part", "nnunet", "--json", "--batch", str(a.batch), "--size",
               str(a.size), "--calls", str(a.calls), "--threads", str(a.threads)]
        res["nnunet"] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["nnunet"]
    if a.json:
        print(json.dumps(res))
        return
    print(f"batch {a.batch} x 1 x {a.size}^3 float32 + labels (3 classes), CPU, {a.threads} thread(s), "
          f"torch {torch.__version__}; ms per call, mean (median)")
    print("| transform | s3d | nnU-Net (batchgeneratorsv2) | nnU-Net / s3d |\n|---|---|---|---|")
    for row in ROWS:
        cells = []
        for side in ("s3d", "nnunet"):
            v = res.get(side, {}).get(row)
            cells.append(f"{1e3 * v[0]:.0f} ({1e3 * v[1]:.0f})" if v else "-")
        s, n = res.get("s3d", {}).get(row), res.get("nnunet", {}).get(row)
        ratio = f"{n[0] / s[0]:.2f}" if s and n else "-"
        print(f"| {row} | {cells[0]} | {cells[1]} | {ratio} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
