"""What the shipped demo weights buy, measured on VALIDATION cases (issue 25): checks, probe, levers.

Not a speed benchmark: it measures Dice, on the demo's data (``benchmarks/demo_ablation.py``'s
validation cohort: the demo's 25-case labelled pool, cohort seed 0). Every run here is scored on the
pool's held-out split (5 cases of each seed's split, never a demo test subject), with sliding windows
as ``s3d predict`` predicts; the trainer's cheap tiled validation is printed next to it. Everything
is cached under ``--out``.

Modes:
    --checks      where pre-training and fine-tuning could disagree: the loaded encoder equals the shipped
                  file, pre-training preparation equals fine-tuning preprocessing, the dense encoder equals
                  the masked one with every cell visible, train == eval mode, the decoder's inputs at
                  fine-tuning against pre-training's densified ones, how far each layer moved from its
                  (reproduced) initialisation.
    --probe       the frozen-encoder probe (``s3d.finetune.probe``) of ``--weights`` against random weights
                  for every ``--steps`` x ``--lrs``.
    --few-labels  the s3d arm's recipe (decoder warm-up, lr 0.1) on ``--weights`` and on random weights
                  saved as weights (seeded 1000 + seed), with ``--sizes`` labelled cases (default 1 2).

Example (each mode 20-60 minutes on 2 busy CPU cores):
    python benchmarks/probe_levers.py --checks
    python benchmarks/probe_levers.py --probe --steps 150 --lrs 0.01 0.1
    python benchmarks/probe_levers.py --few-labels --sizes 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from s3d.demo.settings import RECIPES


def checks(ds: Path) -> None:
    """The step-by-step checks between pre-training and fine-tuning (prints one line per check)."""
    import numpy as np
    from safetensors.torch import load_file

    import s3d
    from s3d.data.io import read_nifti
    from s3d.data.nnunet import PreprocessingSpec, read_dataset_json
    from s3d.data.nnunet.preprocessing import _preprocess
    from s3d.data.scan.prepared import preprocess_image
    from s3d.finetune import prepare_model
    from s3d.nn.masked import stage_keeps

    shipped = load_file(str(Path(s3d.__file__).parent / "zoo" / "s3d-demo" / "model.safetensors"))
    net = prepare_model("s3d-demo", in_channels=1, num_classes=4, strategy="encoder", config="tiny")
    enc = [k for k in shipped if k.startswith("encoder.")]
    same = all(torch.equal(net.state_dict()[k], shipped[k]) for k in enc)
    print(f"loaded encoder == shipped file: {same} ({len(enc)} tensors; strict load)")
    img_path = sorted((ds / "imagesTr").glob("*.nii.gz"))[0]
    img, hdr = read_nifti(img_path)
    spec = PreprocessingSpec.from_dataset(read_dataset_json(ds), target_spacing_mm=(3.5,) * 3, use_mask_for_norm=False)
    a, _, _ = _preprocess(img[None], None, hdr, spec, [img_path])
    b, _ = preprocess_image(img[None], hdr.spacing_mm, 3.5)
    print(f"fine-tuning preprocessing vs pre-training preparation, {img_path.name}: max |diff| "
          f"{float(np.abs(a - b).max()):.3g} (shapes {a.shape} / {b.shape})")
    x = torch.from_numpy(np.ascontiguousarray(a[None, :, :32, :48, :32]))
    net.eval()
    with torch.no_grad():
        dense = net.encoder(x)
        keeps = stage_keeps(torch.ones(1, 1, 2, 3, 2), x.shape[2:], net.config.stage_strides())
        masked = net.encoder(x, keeps)
        net.train()
        train = net.encoder(x)
    print("dense vs masked (every cell visible), per stage: max |diff| "
          + ", ".join(f"{float((u - v).abs().max()):.1e}" for u, v in zip(dense, masked, strict=True)))
    print("train vs eval mode, per stage: max |diff| "
          + ", ".join(f"{float((u - v).abs().max()):.1e}" for u, v in zip(dense, train, strict=True)))
    for s, f in enumerate(dense):
        m, sd = f.mean(dim=(2, 3, 4)), f.std(dim=(2, 3, 4))
        print(f"decoder input (skip) {s} at fine-tuning: per-channel mean {float(m.mean()):+.2f} "
              f"[{float(m.min()):+.2f}, {float(m.max()):+.2f}], sd {float(sd.mean()):.2f}; in pre-training: "
              f"mean 0, sd 1 (masked InstanceNorm){', then a 3x3x3 densify conv' if s else ''}")
    torch.manual_seed(0)  # PretrainRun builds the backbone right after torch.manual_seed(cfg.seed = 0)
    init = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=1, deep_supervision=False).state_dict()
    for k in shipped:
        if k.endswith("conv.weight") or k.endswith("norm.weight"):
            w0 = init[k].float()
            print(f"{k:52s} |W - W0| / |W0| {float((shipped[k].float() - w0).norm() / w0.norm()):.3f}; after "
                  f"weight decay alone (x0.887): {float((shipped[k].float() - 0.887 * w0).norm() / w0.norm()):.3f}")


def _control(out: Path, seed: int) -> str:
    """A random tiny backbone saved as if it were pre-trained weights (seeded ``seed``)."""
    from s3d import build_resenc_unet, save_pretrained

    path = out / f"control_tiny_{seed}"
    if not path.exists():
        torch.manual_seed(seed)
        save_pretrained(build_resenc_unet("tiny", in_channels=1, num_classes=1), path)
    return str(path)


def pool_run(out: Path, ds: Path, weights: str, tag: str, n: int, seed: int, steps: int = 150) -> dict:
    """The s3d arm's recipe on ``weights``: fine-tune on ``n`` cases, score the held-out split (cached)."""
    from s3d.finetune import run as finetune

    recipe = RECIPES["s3d"]
    run = out / "runs" / f"{tag}_{recipe.schedule}_lr{recipe.peak_lr:g}_n{n}_s{seed}_{steps}"
    if (run / "res.json").exists():
        return json.loads((run / "res.json").read_text())
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    finetune(ds, run, pretrained=weights, schedule=recipe.schedule, peak_lr=recipe.peak_lr,
             warmup_steps=max(1, round(recipe.warmup_fraction * steps)), steps=steps, config="tiny", batch_size=2,
             patch_size=(32, 32, 32), target_spacing_mm=(3.5,) * 3, n_train=n, val_fraction=0.2, val_every=steps,
             checkpoint_every=steps, final_validation=True, seed=seed, device="cpu", progress=False, loader_threads=0)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    res = {"dice": [r for r in recs if "final_dice" in r][-1]["final_dice"],
           "tiled": [r for r in recs if "val_dice" in r][-1]["val_dice"], "s": time.perf_counter() - t}
    (run / "res.json").write_text(json.dumps(res))
    for p in run.glob("checkpoint_*.pt"):
        p.unlink()
    return res


def _row(name: str, values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} ± {sd:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("probe_levers"))
    ap.add_argument("--checks", action="store_true")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--few-labels", action="store_true")
    ap.add_argument("--weights", default="s3d-demo")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", nargs="+", type=int, default=[150])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-2, 1e-1])
    ap.add_argument("--source", default="mni", choices=["mni", "phantom"])
    a = ap.parse_args()
    if not (a.checks or a.probe or a.few_labels):
        ap.error("give --checks, --probe and/or --few-labels")
    torch.set_num_threads(1)  # a tiny network on a shared machine: one thread is faster (s3d.demo.run)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from demo_ablation import validation_cohort

    ds = validation_cohort(a.out, a.source)
    if a.checks:
        checks(ds)
    head = "| | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean ± sd |\n|---|" + "---:|" * (len(a.seeds) + 1)
    if a.probe:
        from s3d.finetune import probe

        for steps in a.steps:
            for lr in a.lrs:
                r = probe(a.weights, ds, a.out / "probe" / f"st{steps}_lr{lr:g}", n_train=5, seeds=a.seeds,
                          steps=steps, peak_lr=lr, patch_size=(32, 32, 32), target_spacing_mm=(3.5,) * 3,
                          device="cpu", progress=False, loader_threads=0)
                tiled = {i: [x.dice_tiled for x in sorted(r.runs, key=lambda x: x.seed) if x.init == i]
                         for i in ("weights", "random")}
                print(f"\nprobe, {steps} steps, lr {lr:g} (validation Dice; sliding windows, then tiles):\n\n{head}")
                print("\n".join([_row(a.weights, r.dice("weights")), _row("random weights", r.dice("random")),
                                 _row(f"{a.weights}, tiles", tiled["weights"]),
                                 _row("random weights, tiles", tiled["random"])]), flush=True)
    if a.few_labels:
        for n in a.sizes:
            rows = {w: [pool_run(a.out, ds, _control(a.out, 1000 + s) if w == "control" else w, w.replace("-", ""),
                                 n, s) for s in a.seeds] for w in (a.weights, "control")}
            print(f"\n{n} labelled case(s), recipe {RECIPES['s3d'].label()} (validation Dice, sliding windows):\n")
            print(head)
            print("\n".join(_row(w, [x["dice"] for x in v]) for w, v in rows.items()), flush=True)


if __name__ == "__main__":
    main()
