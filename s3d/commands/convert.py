"""``s3d convert SRC --to s3d|nnssl|nnunet -o OUT``: convert checkpoints between formats."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between s3d, nnssl and nnU-Net formats",
        description="Read a checkpoint (registry name, Hub repo, directory, .safetensors or nnssl .pth) "
        "and write it as s3d (safetensors + config.json), nnssl (checkpoint_final.pth with all "
        "DNA alias keys + adaptation_plan.json) or nnU-Net (-pretrained_weights .pth).",
    )
    parser.add_argument("source", help="registry name, org/name Hub repo, directory or file")
    parser.add_argument("--to", required=True, choices=("s3d", "nnssl", "nnunet"), help="output format")
    parser.add_argument("-o", "--out", required=True, help="output directory (or .pth file for nnssl/nnunet)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier conversion in OUT (default: refuse)")
    parser.add_argument(
        "--no-strict",
        action="store_true",
        help="allow missing/unexpected tensors (listed in the output) instead of failing",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from s3d._paths import UsageError
    from s3d.hub import CheckpointError, ChecksumError, HubFileError, StrictLoadError
    from s3d.hub.convert import convert

    try:
        paths, report = convert(
            args.source, args.to, args.out, revision=args.revision, strict=not args.no_strict,
            overwrite=args.overwrite,
        )
    except UsageError as err:
        print(f"s3d convert: error: {err}", file=sys.stderr)
        return 2
    except (
        CheckpointError,
        ChecksumError,
        HubFileError,
        StrictLoadError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        ValueError,
    ) as err:
        print(f"s3d convert: error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    for path in paths:
        print(f"wrote {path}")
    return 0
