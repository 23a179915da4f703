"""Fine-tune a tiny ResEnc U-Net on a synthetic nnU-Net dataset with the paper's "best" schedule (CPU).

Builds a 2-channel dataset of bright spheres (label 1), stands in a "pretrained" 1-channel network
(random weights here; use ``pretrained="s3d-b"`` for real weights), and runs the schedule: warm-up 1
(decoder only, replicated stem frozen), warm-up 2 (all weights), then PolyLR from 1e-3.

    python examples/finetune_tiny.py [OUT_DIR] [--quick]     # --quick: 12 steps (the CI setting)

The run folder holds split.json, metrics.jsonl, checkpoint_latest.pt and model/ (for ``s3d predict -m``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import s3d
from s3d.data.io import write_nifti
from s3d.finetune import get_schedule
from s3d.finetune import run as finetune
from s3d.hub import save_pretrained


def make_dataset(root: Path, n: int = 6, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    for i in range(n):
        c, r = rng.uniform(10, size - 10, 3), rng.uniform(4, 7)
        sphere = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
        for ch in range(2):
            img = rng.normal(0, 1, (size,) * 3).astype(np.float32) + 3.0 * sphere * (1 + ch)
            write_nifti(root / "imagesTr" / f"case{i:03d}_{ch:04d}.nii.gz", img, np.eye(4))
        write_nifti(root / "labelsTr" / f"case{i:03d}.nii.gz", sphere.astype(np.uint8), np.eye(4))
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "sphere": 1},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    quick = "--quick" in sys.argv[1:]
    out = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="s3d_ft_"))
    data = make_dataset(out / "Dataset900_Spheres")
    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=1), out / "pretend_pretrained")
    steps, warmup = (12, 2) if quick else (150, 25)
    for p in get_schedule("best").plan(steps, warmup, peak_lr=1e-2):
        print(f"{p.name:15s} steps {p.start:4d}-{p.stop:4d}  trains {p.trains:7s}  lr {p.lr} to {p.peak_lr}")
    finetune(data, out / "run", pretrained=str(out / "pretend_pretrained"), schedule="best", steps=steps,
             warmup_steps=warmup, peak_lr=1e-2, config="tiny", patch_size=(32, 32, 32), val_every=steps // 3,
             checkpoint_every=steps // 3)
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    vals = [json.loads(x) for x in lines if "val_dice" in x]
    print("validation Dice:", ", ".join(f"step {v['step']}: {v['val_dice']:.3f}" for v in vals))
    print(f"model for s3d predict: {out / 'run' / 'model'}")


if __name__ == "__main__":
    main()
