"""Steps/s and peak memory of one pre-training step on synthetic data (the trainer's exact step).

One step = batched augmentation on the device + forward of the recipe's method (sparse MAE) +
backward (with GradScaler for fp16) + grad-norm clipping + SGD + PolyLR, as in
:mod:`s3d.pretrain.loop`. Variants: ``fp32``, ``bf16``, ``fp16`` (CUDA), ``channels_last``
(fp32 / bf16 on CUDA) and ``compile`` (torch.compile, bf16 on CUDA).

    python benchmarks/pretrain_step.py --recipe s3d-b --patch 160 --batch 6 --device cuda
    python benchmarks/pretrain_step.py --config tiny --patch 64 --batch 2 --variants fp32   # CPU check

Reference (paper): S3D-B, batch 6 at 160^3, took 1.61 s/step on one A100 40GB (0.62 steps/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform

import torch

from s3d._profiling import measure
from s3d.augment import Augment, AugmentConfig
from s3d.nn import build_resenc_unet
from s3d.pretrain import build_method, get_recipe
from s3d.runtime.lr import lr_at, set_lr
from s3d.runtime.optim import backward_and_step, grad_scaler, sgd


def make_step(recipe, device: torch.device, amp: torch.dtype | None, channels_last: bool, compile_: bool,
              batch: int, patch: int):
    torch.manual_seed(0)
    net = build_resenc_unet(recipe.architecture, in_channels=1, num_classes=1, deep_supervision=False)
    method = build_method(recipe.method, net, **recipe.method_kwargs).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    method = method.to(memory_format=fmt)
    opt = sgd(method.parameters(), recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scaler = grad_scaler(amp, device)
    model = torch.compile(method) if compile_ else method
    phases = recipe.lr_phases()
    aug = Augment(AugmentConfig.pretraining())
    x0 = torch.randn(batch, 1, patch, patch, patch, device=device)
    def ctx():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    state = {"i": 0}

    def step() -> None:
        state["i"] += 1
        x = aug(x0, torch.Generator().manual_seed(state["i"])).contiguous(memory_format=fmt)
        set_lr(opt, lr_at(phases, state["i"], recipe.poly_exponent))
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = model(x).loss
        backward_and_step(loss, opt, scaler, recipe.grad_clip)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="s3d-b")
    p.add_argument("--config", default=None, help="backbone preset overriding the recipe's (e.g. tiny)")
    p.add_argument("--patch", type=int, default=160)
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's batch size")
    p.add_argument("--block-size", type=int, default=None, help="mask cell edge (default: the recipe's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=None,
                   help="comma list of fp32,bf16,fp16,channels_last,compile (default: all that apply)")
    args = p.parse_args()

    device = torch.device(args.device)
    changes = {"patch_size": (args.patch,) * 3}
    if args.config:
        changes["architecture"] = args.config
    if args.batch:
        changes["batch_size"] = args.batch
    if args.block_size:
        changes["method_kwargs"] = {"block_size": args.block_size}
    recipe = get_recipe(args.recipe).replace(**changes)
    cuda = device.type == "cuda"
    half = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    table = {
        "fp32": (None, False, False),
        "bf16": (torch.bfloat16, False, False),
        "fp16": (torch.float16, False, False),
        "channels_last": (half if cuda else None, True, False),
        "compile": (half if cuda else None, False, True),
    }
    names = args.variants.split(",") if args.variants else (
        list(table) if cuda else ["fp32", "bf16", "channels_last"])
    print(json.dumps({"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "recipe": recipe.name, "architecture": recipe.architecture,
                      "patch": args.patch, "batch": recipe.batch_size,
                      "block_size": recipe.method_kwargs.get("block_size")}))
    for name in names:
        amp, cl, comp = table[name]
        try:
            step = make_step(recipe, device, amp, cl, comp, recipe.batch_size, args.patch)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = measure(step, device, repeats=args.repeats, warmup=args.warmup)
            peak = torch.cuda.max_memory_allocated(device) if cuda else t.peak_bytes
            row = {"variant": name, "s_per_step": round(t.seconds, 4), "steps_per_s": round(1 / t.seconds, 3),
                   "patches_per_s": round(recipe.batch_size / t.seconds, 2),
                   "peak_mem_gib": round(peak / 2**30, 3),
                   "amp": str(amp).replace("torch.", "") if amp else "none"}
        except Exception as e:  # noqa: BLE001 - report the variant, keep measuring the others
            row = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
