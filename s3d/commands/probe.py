"""``s3d probe``: how much a set of weights helps a light head with few labels, against random weights."""

from __future__ import annotations

import argparse

from s3d.commands._common import AMP_CHOICES

MARKER = ".s3d-probe"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe", help="frozen-encoder probe of pre-trained weights against random weights",
        description="Train a fresh decoder on the FROZEN encoder of --weights, and on a random encoder of the "
                    "same architecture, on a few labelled cases of an nnU-Net v2 raw dataset for a fixed small "
                    "budget (fine-tuning's preprocessing, split and loss; schedule frozen_encoder), then report the "
                    "validation Dice of both for every seed. Writes OUT/probe.json; run again to resume.")
    p.add_argument("--weights", required=True,
                   help="registry name (s3d-demo, s3d-b, ...), Hub repo, model folder or checkpoint")
    p.add_argument("--data", required=True, metavar="DATASET", help="nnU-Net v2 raw dataset folder (dataset.json)")
    p.add_argument("-o", "--out", default="s3d-probe", help="output folder (default: ./s3d-probe)")
    p.add_argument("--n-train", type=int, default=5, help="labelled training cases (default: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per run (default: 150)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate, PolyLR (default: 0.01)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="training patch, voxels (default: fine-tuning's automatic size)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SD", "SH", "SW"),
                   help="target spacing in mm (default 1 1 1), as for s3d finetune")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out and scored (default 0.2)")
    p.add_argument("--num-val-cases", type=int, default=None, help="score at most this many held-out cases")
    p.add_argument("--no-random", action="store_true", help="probe the weights only (no random reference)")
    p.add_argument("--keep-models", action="store_true", help="keep each run's checkpoint and model")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    p.add_argument("--cache-dir", default=None, help="preprocessing cache (default: DATASET/.s3d_cache)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _prepare_out(out: str) -> None:
    """Refuse a non-empty folder that no earlier ``s3d probe`` wrote; mark ours."""
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"-o/--out {out}: exists and is not a folder; choose another")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).exists():
        raise FileExistsError(f"-o/--out {out}: not empty and not written by s3d probe; choose a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by s3d probe; a later run with the same settings resumes here\n")


def run(args: argparse.Namespace) -> int:
    from s3d.finetune.probing import probe

    if args.num_val_cases is not None and args.num_val_cases < 1:
        raise ValueError(f"--num-val-cases: must be >= 1, got {args.num_val_cases}")
    from s3d.data.nnunet import read_dataset_json
    from s3d.hub import load_pretrained

    read_dataset_json(args.data)  # a wrong --data or --weights is one line before any folder is made
    weights = load_pretrained(args.weights)
    _prepare_out(args.out)
    result = probe(weights, args.data, args.out, n_train=args.n_train, seeds=tuple(args.seeds),
                   steps=args.steps, peak_lr=args.lr, batch_size=args.batch_size,
                   patch_size=tuple(args.patch_size) if args.patch_size else None,
                   target_spacing_mm=tuple(args.spacing), random=not args.no_random, keep_models=args.keep_models,
                   device=args.device, progress=not args.no_progress, val_fraction=args.val_fraction,
                   num_val_cases=args.num_val_cases, amp=args.amp, cache_dir=args.cache_dir, name=args.weights)
    runs = sorted(result.runs, key=lambda r: (r.seed, r.init))
    for r in runs:
        print(f"seed {r.seed} {r.init:7s}: validation Dice {r.dice:.4f}  trained on {', '.join(r.train_cases)}; "
              f"scored {', '.join(r.val_cases)}")
    print(result.summary())
    print(f"results: {args.out}/probe.json")
    return 0
