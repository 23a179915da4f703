"""``s3d predict``: sliding-window prediction of a folder of NIfTI cases with a model directory."""

from __future__ import annotations

import argparse

from s3d.commands._common import AMP_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="segment a folder of NIfTI cases ({case}_XXXX.nii.gz) with a model directory",
        description="Predict every case of IN ({case}_{XXXX}.nii.gz, one file per channel) with the model "
                    "in MODEL_DIR (model.safetensors + config.json + preprocessing.json) and write "
                    "OUT/{case}.nii.gz label maps with the input's shape, affine and header. A case that "
                    "cannot be read or used is skipped: the others are predicted, the failures are listed "
                    "at the end and in OUT/failures.json, and the exit status is 1.")
    p.add_argument("-i", "--input", required=True, metavar="IN", help="folder of input NIfTI files")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the predictions")
    p.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                   help="model directory (save_pretrained output + preprocessing.json)")
    p.add_argument("--tile-batch", type=int, default=4, metavar="N",
                   help="tiles per forward pass (default: 4)")
    p.add_argument("--step", type=float, default=0.5,
                   help="distance between tiles as a fraction of the patch (default: 0.5)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="mirroring test-time augmentation over all 3 axes (8 passes per tile), on by default as "
                        "in nnU-Net; --no-mirror is 8x faster")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="off",
                   help="autocast for the network: off (fp32, default), auto (bf16 on GPUs that support it, "
                        "else fp16; off on CPU), bf16, fp16")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="tile size in voxels (default: preprocessing.json's patch_size)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write OUT/{case}.npz with the probabilities (K, D, H, W)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from s3d.infer import BatchPredictionError, PatchSizeError, PredictionNote, predict_folder

    if args.tile_batch < 1:
        print(f"s3d predict: error: --tile-batch must be >= 1, got {args.tile_batch}", file=sys.stderr)
        return 2
    if not 0 < args.step <= 1:
        print(f"s3d predict: error: --step must be in (0, 1], got {args.step}", file=sys.stderr)
        return 2
    if args.patch_size is not None and min(args.patch_size) < 1:
        print(f"s3d predict: error: --patch-size {' '.join(map(str, args.patch_size))}: each size must be >= 1 "
              "voxel", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PredictionNote)
        try:
            written = predict_folder(
                args.input, args.output, args.model, step=args.step, mirror=args.mirror,
                tile_batch=args.tile_batch, device=args.device, amp=args.amp, patch_size=args.patch_size,
                save_probabilities=args.save_probabilities, progress=not args.no_progress)
            failed = None
        except PatchSizeError as e:
            if args.patch_size is None:
                raise
            text = str(e).split(": ", 1)[-1]
            raise ValueError(f"--patch-size {' '.join(map(str, args.patch_size))}: {text}") from None
        except BatchPredictionError as e:
            written, failed = e.written, e
    for w in caught:  # notes at the end, where they are seen; other warnings as Python shows them
        if issubclass(w.category, PredictionNote):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {len(written)} prediction(s) to {args.output}")
    if failed is not None:
        print(f"s3d predict: error: {failed}", file=sys.stderr)
        return 1
    return 0
