"""``s3d demo``: synthetic cohort, S3D in miniature, shipped weights vs control vs scratch, probe, report."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="what pre-training buys with few labels, on built-in data (no download), with a report",
        description="Generate a synthetic brain-MRI cohort, run a short S3D pre-training (the workflow and its "
                    "reconstruction figure), then three arms for every labelled-set size and seed: fine-tune the "
                    "demo weights that were pre-trained once at scale (s3d-demo, shipped with s3d), the same "
                    "network from random weights with exactly that recipe (the control) and from scratch with "
                    "scratch's recipe (2 and 10 labelled cases, 3 seeds); predict held-out cases, score Dice and "
                    "NSD; probe the weights' frozen encoder against a random one; write OUT/report.md and "
                    "OUT/results.json.")
    p.add_argument("--out", default="s3d-demo", help="output folder (default: ./s3d-demo)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget in minutes; the short pre-training gets what fine-tuning leaves (default: 10)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (well under 2 minutes; used by CI)")
    p.add_argument("--source", default="auto", choices=["auto", "mni", "phantom"],
                   help="anatomy: MNI152 template via nilearn (s3d[demo]), procedural phantom, or auto "
                        "(mni when nilearn is installed)")
    p.add_argument("--task", default="tissue", choices=["tissue", "lesion"],
                   help="labelled task: CSF/GM/WM tissue segmentation or MS-like lesions (default: tissue)")
    p.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                   help="weights of the pre-trained arm (default: s3d-demo, shipped). s3d-b: the OpenMind ResEnc-L S3D "
                        "weights (downloaded; 64^3 patches at 2 mm; the plan prints how long it will take)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: 0 1 2)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="labelled training-set sizes (default: 2 10)")
    p.add_argument("--plan", action="store_true", help="print the plan and the time it will take, then stop")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cohort (default: 0)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="fix the steps of the short pre-training")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="steps of each fine-tuning run (default: 150, the count the recipes were chosen at)")
    p.add_argument("--probe-steps", type=int, default=None,
                   help="steps of each run of the frozen-encoder probe (0: no probe; default: the demo's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--make-weights", metavar="DIR", default=None,
                   help="instead of the demo: pre-train the demo network once on a large synthetic cohort (the "
                        "weights shipped as s3d-demo; hours on CPU, resumable: run again to continue) into DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s3d.demo import demo_settings, run_demo

    if args.make_weights is not None:
        from s3d.demo.weights import make_demo_weights

        out = make_demo_weights(args.make_weights, progress=not args.no_progress, device=args.device,
                                command=f"s3d demo --make-weights {args.make_weights}")
        print(f"weights: {out} (copy model.safetensors, config.json and README.md to s3d/zoo/s3d-demo/)")
        return 0
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    overrides = {"source": args.source, "task": args.task, "device": args.device, "data_seed": args.seed,
                 "progress": not args.no_progress, "plan_only": args.plan}
    if not args.quick:
        overrides["minutes"] = args.minutes
    for key, value in (("weights", args.pretrained), ("pretrain_steps", args.pretrain_steps),
                       ("finetune_steps", args.finetune_steps), ("probe_steps", args.probe_steps)):
        if value is not None:
            overrides[key] = value
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    if args.sizes is not None:
        overrides["train_sizes"] = tuple(args.sizes)
    run_demo(demo_settings(args.out, quick=args.quick, **overrides))
    return 0
