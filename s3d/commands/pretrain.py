"""``s3d pretrain``: scan + preprocess a folder of MRIs, then pre-train a backbone (1 or N processes).

Examples::

    s3d pretrain --data raw_mri/ --out runs/prep --prepare-only --prep-workers 16
    s3d pretrain --data raw_mri/ --out /shared/prep --prepare-only --shard $SLURM_ARRAY_TASK_ID/16
    s3d pretrain --merge /shared/prep          # (automatic when the last shard finishes)
    s3d pretrain --report runs/prep            # what was used: counts per rule and per dataset
    s3d pretrain --data runs/prep --recipe s3d-b --out runs/s3d-b
    torchrun --nproc_per_node 4 -m s3d pretrain --data runs/prep --recipe s3d-l --out runs/s3d-l
    s3d pretrain --data runs/prep --recipe s3d-b --out runs/s3d-b --resume
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from s3d._triple import to_3tuple
from s3d.commands._common import AMP_CHOICES

if TYPE_CHECKING:
    from s3d.runtime.method import PatchProblem


def _patch(values: list[int] | None) -> tuple[int, int, int] | None:
    """``--patch-size N`` or ``--patch-size D H W`` (voxels); anything else exits naming the flag."""
    if values is None:
        return None
    try:
        return to_3tuple(values[0] if len(values) == 1 else values, "--patch-size")
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` as argparse reads it: a malformed value is a usage error (exit 2), like ``--tau 0``."""
    from s3d.data.scan import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard").lstrip(": ")) from None


def _json_object(text: str) -> dict:
    """``--method-kwargs`` as argparse reads it: a JSON object, else a usage error (exit 2) saying how to write one."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e}): {text!r}; write a JSON object with double-quoted keys, e.g. "
            "'{\"block_size\": 16}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{\"key\": value, ...}}), got {text!r}")
    return value


def resolve_recipe(recipe: str | None, method: str | None) -> str:
    """The recipe name from ``--recipe`` / ``--method`` (the method's default recipe,
    :data:`s3d.pretrain.METHODS`); a recipe of another method is an error."""
    from s3d.pretrain import get_method, get_recipe

    name = recipe or get_method(method or "mae").default_recipe
    if method is not None and get_recipe(name).method != method:
        raise ValueError(f"--recipe {name} is a {get_recipe(name).method!r} recipe, not --method {method}")
    return name


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="preprocess a folder of MRIs and pre-train a ResEnc U-Net backbone",
        description="Scan and preprocess --data (a folder, .txt list or .csv of NIfTI files) into a prepared "
                    "directory (or use one prepared before), then pre-train with a recipe. Launch with "
                    "`torchrun --nproc_per_node N -m s3d pretrain ...` for DDP on N processes.")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="raw folder / .txt / .csv, or a prepared dir with manifest.json")
    g.add_argument("--out", default=None, help="run directory, required (with --prepare-only: the prepared directory)")
    g.add_argument("--prepared", default=None, help="where to write preprocessed data (default: OUT/data)")
    g.add_argument("--prepare-only", action="store_true", help="scan and preprocess, then stop")
    g.add_argument("--prep-workers", type=int, default=os.cpu_count() or 1, help="preprocessing processes")
    g.add_argument("--min-fov-mm", type=float, default=50.0, help="reject a field of view below this (mm)")
    g.add_argument("--max-spacing-mm", type=float, default=6.5, help="reject spacing above this (mm)")
    g.add_argument("--min-file-kb", type=float, default=200.0,
                   help="reject files below this size (kB = 1000 B)")
    g.add_argument("--modalities", nargs="+", default=None,
                   help="modality allow-list (default: T1/T2/FLAIR variants; 'any' accepts all)")
    g.add_argument("--reject-unknown-modality", action="store_true",
                   help="reject files whose modality is not in the CSV or the file name")
    g.add_argument("--split-4d", action="store_true", help="split 4D images into volumes (default: reject)")
    g.add_argument("--spacing-mm", type=float, default=1.0, help="isotropic target spacing (mm)")
    g.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                   help="stored dtype of preprocessed volumes")
    g.add_argument("--store", choices=("b2nd", "npy"), default="b2nd",
                   help="volume store: b2nd (blosc2, ~3x smaller, default) or npy (uncompressed, memory-mapped)")
    g.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="with --prepare-only: prepare shard I of N (0 <= I < N) into the shared --out; the "
                        "shard manifests merge into manifest.json when the last one finishes")
    g.add_argument("--merge", default=None, metavar="PREPARED_DIR",
                   help="merge the shard manifests of PREPARED_DIR into manifest.json, then stop")
    g.add_argument("--report", default=None, metavar="PREPARED_DIR",
                   help="print what PREPARED_DIR's manifest used and rejected, per rule and per dataset, then stop")
    t = p.add_argument_group("training")
    t.add_argument("--recipe", default=None,
                   help="recipe name (s3d-b, s3d-l, t1a-*, t1b-*, mg, vf, voco; `s3d pretrain --list-recipes`); "
                        "default: the method's own recipe")
    t.add_argument("--method", choices=["mae", "mg", "vf", "voco"], default=None,
                   help="pre-training method: mae (sparse MAE, S3D), mg (Models Genesis), vf (VolumeFusion), "
                        "voco (VoCo); picks that method's default recipe (mae -> s3d-b)")
    t.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    t.add_argument("--config", "--arch", dest="architecture", default=None,
                   help="backbone preset overriding the recipe's (resenc_l, small, tiny; or a Primus: primus_m, "
                        "primus_tiny, ... with method mae, token-sparse, input_shape = --patch-size)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="global batch (all processes)")
    t.add_argument("--patch-size", type=int, nargs="+", default=None, metavar="N", help="1 or 3 ints")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--method-kwargs", type=_json_object, default=None,
                   help='JSON merged into the recipe, e.g. \'{"block_size": 16}\'')
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast: auto (bf16 on GPUs that support it, else fp16; off on CPU), bf16, fp16, off")
    t.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    t.add_argument("--compile", action="store_true", help="torch.compile the training module")
    t.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers per process (default: 4, or the CPU count if smaller)")
    t.add_argument("--no-augment", action="store_true", help="disable rotation/scaling/mirroring")
    t.add_argument("--val-fraction", type=float, default=0.02, help="fraction of subjects held out")
    t.add_argument("--val-every", type=int, default=1000)
    t.add_argument("--snapshot-every", type=int, default=5000, help="PNG snapshot interval (0 = off)")
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument("--tensorboard", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_latest.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in OUT (its checkpoints, backbone/ and nnssl/ are removed first)")
    t.add_argument("--stop-after", type=int, default=None, help="stop after this step (no export)")
    t.add_argument("--no-progress", action="store_true")
    q = p.add_argument_group("probe (is the encoder learning anything useful?)")
    q.add_argument("--probe", default=None, metavar="DATASET",
                   help="nnU-Net raw dataset: after checkpoints (and once on the initial weights) train a fresh "
                        "decoder on the frozen encoder on a few labelled cases and log its validation Dice "
                        "(probe_dice in metrics.jsonl, OUT/probe.png); rank 0 only under torchrun")
    q.add_argument("--probe-every", type=int, default=0, metavar="N",
                   help="probe every N steps (a multiple of --checkpoint-every); default 0: whenever the probes "
                        "stay within --probe-budget of the training time")
    q.add_argument("--probe-budget", type=float, default=0.05,
                   help="the probes' share of the training time with --probe-every 0 (default 0.05)")
    q.add_argument("--probe-options", type=_json_object, default=None, metavar="JSON",
                   help='s3d.finetune.probe arguments, e.g. \'{"n_train": 5, "steps": 150, "seeds": [0], '
                        '"patch_size": [32, 32, 32]}\' (default spacing: the recipe\'s)')
    q.add_argument("--probe-timeout", type=float, default=7200.0, metavar="S",
                   help="under torchrun: how long the other ranks wait for a probe, seconds (default 7200)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.list_recipes:
        from s3d.pretrain import get_recipe, list_recipes

        for name in list_recipes():
            r = get_recipe(name)
            print(f"{name:18s} {r.method:5s} {r.description}")
        return 0
    if args.report or args.merge:
        return _report_or_merge(args)
    if not args.data or not args.out:
        print("error: s3d pretrain needs --data and --out", file=sys.stderr)
        return 2
    try:
        recipe = resolve_recipe(args.recipe, args.method)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from s3d.data.scan import MANIFEST_NAME, ScanFilters, prepare
    from s3d.pretrain import PatchProblemError, PretrainConfig

    shard = args.shard
    if shard is not None and not args.prepare_only:
        print("s3d pretrain: error: --shard prepares one slice of the data and needs --prepare-only; train on "
              "the merged directory afterwards", file=sys.stderr)
        return 2
    from s3d._paths import check_apart, output_folder

    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: --data not found (a folder of NIfTI files, a .txt list, a .csv, or a "
                                "prepared folder)")
    prepared = data if (data / MANIFEST_NAME).is_file() else None
    target = Path(args.out) if args.prepare_only else Path(args.prepared or Path(args.out) / "data")
    output_folder(args.out, "--out folder")
    if prepared is None:
        output_folder(target, "prepared folder (--prepared)")
        if data.is_dir():  # the raw images are an input: nothing is written among them
            check_apart(target, "prepared folder" if not args.prepare_only else "--out folder",
                        [(data, "--data folder")])
            check_apart(args.out, "--out folder", [(data, "--data folder")])
    elif not args.prepare_only and Path(args.out).resolve() / "data" != data.resolve():
        # training writes its run beside prepared data it was given, never into it (OUT/data is its own)
        check_apart(args.out, "--out folder", [(data, "prepared --data folder")])
    cfg = None
    if not args.prepare_only:  # every training setting is checked before any file is read or written
        cfg = PretrainConfig(
            data=str(prepared or target), out=args.out, recipe=recipe, architecture=args.architecture,
            steps=args.steps, batch_size=args.batch_size, patch_size=_patch(args.patch_size), lr=args.lr,
            method_kwargs=args.method_kwargs or {}, seed=args.seed,
            device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
            workers=args.workers, augment=not args.no_augment, val_fraction=args.val_fraction,
            val_every=args.val_every, snapshot_every=args.snapshot_every,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, tensorboard=args.tensorboard,
            resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
            progress=not args.no_progress, probe=args.probe, probe_every=args.probe_every,
            probe_budget=args.probe_budget, probe_options=args.probe_options or {},
            probe_timeout_s=args.probe_timeout)
        try:
            cfg.check()
        except PatchProblemError as e:
            raise ValueError(_flag_advice(e.problem)) from None
        if not (cfg.resume or cfg.overwrite):  # an earlier run in --out is refused before hours of preparation
            from s3d.pretrain.loop import EXPORTS, JOB
            from s3d.runtime.checkpoint import claim_run_folder

            claim_run_folder(args.out, job=JOB, resume=False, overwrite=False, exports=EXPORTS)
    if prepared is None:
        from s3d.data.scan.manifest import read_manifest, shard_manifests

        if shard_manifests(data) and not args.shard:
            read_manifest(data)  # a sharded preparation not merged yet: raises with what to do
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"error: {data} is not a prepared directory; under torchrun, prepare it first with "
                  f"`s3d pretrain --data {data} --out PREP --prepare-only`", file=sys.stderr)
            return 2
        modalities = args.modalities
        if modalities is not None and [m.lower() for m in modalities] == ["any"]:
            filters_mod = None
        elif modalities is not None:
            filters_mod = tuple(m.lower() for m in modalities)
        else:
            filters_mod = ScanFilters().modalities
        filters = ScanFilters(min_fov_mm=args.min_fov_mm, max_spacing_mm=args.max_spacing_mm,
                              min_file_bytes=int(args.min_file_kb * 1000), modalities=filters_mod,
                              allow_unknown_modality=not args.reject_unknown_modality, split_4d=args.split_4d)
        manifest = prepare(data, target, filters, workers=args.prep_workers,
                           target_spacing_mm=args.spacing_mm, dtype=args.store_dtype,
                           progress=not args.no_progress, store=args.store, shard=shard)
        c = manifest["counts"]
        where = target / MANIFEST_NAME
        if shard is not None:
            from s3d.data.scan.manifest import shard_manifest_name

            where = target / shard_manifest_name(*shard)
        print(f"prepared {target}{f' shard {shard[0]}/{shard[1]}' if shard else ''}: {c['ok']} ok "
              f"({c['processed']} processed, {c['skipped']} already done), {c['rejected']} rejected, "
              f"{c['failed']} failed; reasons in {where} (summary: s3d pretrain --report {target})")
        # a batch command: files that could not be read are reported and make the exit status 1
        # (the others are prepared and kept; training from the folder works, without them)
        status = 0
        if c["failed"]:
            print(f"{c['failed']} file(s) could not be read or prepared (listed with rule 'unreadable' in {where}); "
                  "repair or remove them and run the same command again (finished files are not redone)")
            status = 1
        if shard is not None:
            if "merge_error" in manifest:
                print(f"all {shard[1]} shard manifests are there but do not merge yet: {manifest['merge_error']}")
            elif (target / MANIFEST_NAME).is_file() and _merged_now(target, shard[1]):
                print(f"all {shard[1]} shards done: merged into {target / MANIFEST_NAME}")
            else:
                print(f"waiting for the other shards; the last one merges them (or: s3d pretrain --merge {target})")
            return status
        if c["ok"] == 0:
            raise ValueError(f"{data}: no image was accepted ({c['rejected']} rejected, {c['failed']} failed); "
                             f"see `s3d pretrain --report {target}` for the rules that rejected them")
        if args.prepare_only:
            return status
    elif args.prepare_only:
        print(f"{data} is already prepared ({MANIFEST_NAME} exists)")
        return 0

    from s3d.pretrain import run as pretrain

    assert cfg is not None
    try:
        result = pretrain(cfg)
    except PatchProblemError as e:
        raise ValueError(_flag_advice(e.problem)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.to_dict()))
    return 0


def _flag_advice(problem: PatchProblem) -> str:
    """The library's patch problem in this command's flags (``--patch-size``, ``--method-kwargs``)."""
    fixes = []
    if problem.fix_patch_size is not None:
        fixes.append(f"--patch-size {' '.join(map(str, problem.fix_patch_size))}")
    if problem.fix_method_kwargs:
        fixes.append(f"--method-kwargs '{json.dumps(problem.fix_method_kwargs)}'")
    use = f"; use {' or '.join(fixes)}" if fixes else ""
    return f"--patch-size {' '.join(map(str, problem.patch_size))}: {problem.reason}{use}"


def _merged_now(target, count: int) -> bool:
    import json

    from s3d.data.scan import MANIFEST_NAME

    try:
        return json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8")).get("shards") == count
    except (OSError, ValueError):
        return False


def _report_or_merge(args: argparse.Namespace) -> int:
    from s3d.data.scan import MANIFEST_NAME, format_report, merge_shards, read_manifest

    if args.merge:
        m = merge_shards(args.merge)
        c = m["counts"]
        print(f"merged {m['shards']} shards into {os.path.join(args.merge, MANIFEST_NAME)}: {c['ok']} ok, "
              f"{c['rejected']} rejected, {c['failed']} failed of {m['listed']} listed file(s)")
    if args.report:
        print(format_report(read_manifest(args.report), name=os.path.join(args.report, MANIFEST_NAME)))
    return 0
