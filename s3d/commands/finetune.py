"""``s3d finetune``: fine-tune a (pretrained) ResEnc U-Net or Primus on an nnU-Net v2 raw dataset."""

from __future__ import annotations

import argparse

from s3d.commands._common import AMP_CHOICES

_TABLE8 = {"25k": 25_000, "37.5k": 37_500, "50k": 50_000, "75k": 75_000, "150k": 150_000, "275k": 275_000}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune on an nnU-Net dataset with the paper's schedules",
        description="Validate and preprocess an nnU-Net v2 raw dataset (cached), transfer pretrained weights "
                    "and train with a schedule preset of the paper's Table 2 (a Primus: --schedule primus, "
                    "primus_decoder_warmup or primus_scratch, AdamW). Writes split.json, "
                    "metrics.jsonl, checkpoint_latest.pt and, at the end, OUT/model (for s3d predict -m). "
                    "Multi-GPU: torchrun --nproc_per_node N -m s3d finetune ... (--batch-size is the global "
                    "batch).")
    p.add_argument("dataset", nargs="?", help="nnU-Net v2 raw dataset folder (holding dataset.json)")
    p.add_argument("-o", "--out", help="run folder (required)")
    p.add_argument("-p", "--pretrained", default=None,
                   help="registry name, Hub repo, model dir or checkpoint of either family (default: train from "
                        "scratch)")
    p.add_argument("--schedule", default="best", help="schedule preset (default: best); --list-schedules")
    p.add_argument("--list-schedules", action="store_true", help="print the schedule presets and exit")
    p.add_argument("--steps", type=int, default=None, help="total steps incl. warm-ups (default 250000)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps per warm-up (default 5%% of --steps)")
    p.add_argument("--table8", choices=sorted(_TABLE8, key=_TABLE8.get), default=None,
                   help="a Table 8 length: that many total steps with 12.5k-step warm-ups")
    p.add_argument("--lr", type=float, default=None, help="override the schedule's peak lr")
    p.add_argument("--strategy", choices=["all", "encoder"], default=None,
                   help="weights to transfer (default: the schedule's)")
    p.add_argument("--stem", choices=["replicate", "random"], default="replicate",
                   help="multi-channel stem: replicate the pretrained one (default) or random")
    p.add_argument("--train-stem-in-warmup", action="store_true",
                   help="also train the stem during the decoder warm-up (default: frozen)")
    p.add_argument("--config", default="resenc_l",
                   help="architecture preset when training from scratch: resenc_l, ... or primus_m, ... (a Primus "
                        "takes --patch-size as its input_shape)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="training patch in voxels (default: automatic for ResEnc; a Primus's input_shape, which "
                        "this sets, interpolating a pretrained position embedding)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SD", "SH", "SW"),
                   help="target spacing in mm (default 1 1 1)")
    p.add_argument("--mask-for-norm", choices=["off", "on", "auto"], default="off",
                   help="z-score over the nonzero mask only (nnU-Net's use_mask_for_norm, for skull-stripped "
                        "images); auto: nnU-Net's planner rule (default: off, as the pre-training)")
    p.add_argument("--no-deep-supervision", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--n-train", type=int, default=None, help="use only N training cases (low-data regime)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--val-every", type=int, default=1000, help="steps between validations")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16, off")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d on GPU")
    p.add_argument("--cache-dir", default=None,
                   help="keep the preprocessing cache here instead of DATASET/.s3d_cache (default: "
                        "$S3D_CACHE_DIR if set); needed for a read-only dataset")
    p.add_argument("--loader-threads", type=int, default=2,
                   help="background threads sampling the next steps' patches (default 2; 0 = none)")
    p.add_argument("--val-tile-batch", type=int, default=4,
                   help="tiles per forward pass in the periodic validations (default 4)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_latest.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUT (its checkpoints and model/ are removed first)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from s3d.finetune import PAPER_STEPS, PAPER_WARMUP_STEPS, SCHEDULES, FinetuneConfig, Trainer
    from s3d.runtime.checkpoint import CheckpointError
    from s3d.runtime.distributed import cleanup

    if args.list_schedules:
        for name, s in SCHEDULES.items():
            print(f"{name:26s} {s.table2_row}")
        return 0
    if not args.dataset or not args.out:
        print("s3d finetune: DATASET and -o/--out are required", file=sys.stderr)
        return 2
    if args.schedule not in SCHEDULES:
        print(f"--schedule: unknown {args.schedule!r}; known: {', '.join(SCHEDULES)}", file=sys.stderr)
        return 2
    steps, warmup = args.steps, args.warmup_steps
    if args.table8:
        if steps is not None:
            print("--table8 and --steps are exclusive", file=sys.stderr)
            return 2
        steps, warmup = _TABLE8[args.table8], PAPER_WARMUP_STEPS if warmup is None else warmup
    cfg = FinetuneConfig(
        dataset=args.dataset, out_dir=args.out, pretrained=args.pretrained, schedule=args.schedule,
        steps=steps or PAPER_STEPS, warmup_steps=warmup, peak_lr=args.lr, strategy=args.strategy,
        stem=args.stem, train_stem_in_decoder_warmup=args.train_stem_in_warmup, config=args.config,
        batch_size=args.batch_size, patch_size=tuple(args.patch_size) if args.patch_size else None,
        target_spacing_mm=tuple(args.spacing),
        use_mask_for_norm={"off": False, "on": True, "auto": "auto"}[args.mask_for_norm],
        deep_supervision=not args.no_deep_supervision,
        augment=not args.no_augment, val_fraction=args.val_fraction, n_train=args.n_train,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
        amp=args.amp, channels_last=args.channels_last, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress,
        cache_dir=args.cache_dir, loader_threads=args.loader_threads, val_tile_batch=args.val_tile_batch,
    )
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except CheckpointError as e:  # one line, whatever the loader's message held
        raise CheckpointError(" ".join(str(e).split())) from None
    finally:
        cleanup()
    if not trainer.main:
        return 0
    if trainer.final_val is not None:
        dice = f"final validation Dice {trainer.final_val['final_dice']:.4f} (sliding window)"
    else:
        last = trainer.val_history[-1]["val_dice"] if trainer.val_history else float("nan")
        dice = f"validation Dice {last:.4f} (tiles)"
    print(f"done: {trainer.step} steps, {dice}, model in {trainer.out / 'model'}")
    return 0
