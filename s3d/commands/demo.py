"""``s3d demo``: generate brain-MRI-like data, pre-train, fine-tune vs scratch, evaluate, write a report."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the paper's experiment in miniature on built-in data (no download), with a report",
        description="Generate a synthetic brain-MRI cohort, pre-train a small ResEnc U-Net with the S3D "
                    "recipe scaled down, fine-tune it with the paper's best schedule on 5/10/20 labelled "
                    "cases, train the same network from scratch on the same cases, predict held-out cases, "
                    "score Dice and NSD, and write OUT/report.md with the table and figures.")
    p.add_argument("--out", default="s3d-demo", help="output folder (default: ./s3d-demo)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget in minutes; training steps are sized to fit (default: 10)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (well under 2 minutes; used by CI)")
    p.add_argument("--source", default="auto", choices=["auto", "mni", "phantom"],
                   help="anatomy: MNI152 template via nilearn (s3d[demo]), procedural phantom, or auto "
                        "(mni when nilearn is installed)")
    p.add_argument("--task", default="tissue", choices=["tissue", "lesion"],
                   help="labelled task: CSF/GM/WM tissue segmentation or MS-like lesions (default: tissue)")
    p.add_argument("--schedule", default="best",
                   help="fine-tuning schedule of the pre-trained network (default: best, the paper's; "
                        "see s3d finetune --list-schedules)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None, help="fix the pre-training steps")
    p.add_argument("--finetune-steps", type=int, default=None, help="fix the steps of each fine-tuning run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s3d.demo import demo_settings, run_demo

    overrides = {"schedule": args.schedule, "source": args.source, "task": args.task, "device": args.device,
                 "seed": args.seed, "progress": not args.no_progress}
    if not args.quick:
        overrides["minutes"] = args.minutes
    if args.pretrain_steps is not None:
        overrides["pretrain_steps"] = args.pretrain_steps
    if args.finetune_steps is not None:
        overrides["finetune_steps"] = args.finetune_steps
    if args.minutes <= 0:
        print("--minutes must be positive")
        return 2
    try:
        run_demo(demo_settings(args.out, quick=args.quick, **overrides))
    except (FileExistsError, ValueError, ImportError) as e:
        print(f"s3d demo: {e}")
        return 1
    return 0
