"""The demo's design choices, measured on VALIDATION subjects (never the demo's test cases).

Not a speed benchmark: it measures Dice. The data are the demo's (``s3d demo`` defaults: MNI source,
48x56x48 voxels of 3.5 mm, cohort seed 0, the same 25-case labelled training pool), but the held-out
cases are validation subjects, seeded by (0, "val", i): no demo test subject, no subject of the
shipped weights' pre-training data. Each candidate recipe is fine-tuned for every seed and size, with
the demo's steps, batch and patch, and scored on the validation subjects. Everything is cached under
``--out``, so candidates can be added and the tables re-printed.

Modes:
    --select    the fine-tuning recipe of each arm: candidates for the pre-trained arm (schedules of the
                paper's Table 2 and learning rates) and learning rates for scratch (the two best of each
                arm; ``--wide``: the whole sweep that narrowed them down); prints the table and
                the winner of each arm (the highest mean validation Dice over seeds and sizes), which is
                what ``s3d.demo.settings.RECIPES`` holds.
    --weights   which weights the pre-trained arm uses, each with its selected recipe: the shipped
                ``s3d-demo``, the demo's own short pre-training (``--short DIR``: a backbone folder), a
                random initialisation saved as "pre-trained" weights (the control).

Example (about 1-2 hours on 2 busy CPU cores):
    python benchmarks/demo_ablation.py --select --seeds 0 1 2 --sizes 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from s3d.demo.settings import RECIPES, DemoSettings, FinetuneRecipe

D = DemoSettings(out=Path("unused"))

#: The wide sweep (``--wide``), run with interim exports of the weights to narrow the candidates (the
#: numbers are in docs/quickstart.md): the paper's best, its shape at scratch's lr, full transfer
#: without warm-up at three lrs, a warm-up of all weights, a frozen encoder, encoder-only transfer
#: (decoder warm-up) at five lrs; scratch at six lrs.
S3D_WIDE = [
    FinetuneRecipe("best", 1e-3),
    FinetuneRecipe("best", 1e-2),
    FinetuneRecipe("no_warmup", 1e-2),
    FinetuneRecipe("no_warmup", 3e-2),
    FinetuneRecipe("no_warmup", 1e-1),
    FinetuneRecipe("warmup_all", 3e-2, 0.1),
    FinetuneRecipe("frozen_encoder", 3e-2, 0.1),
    FinetuneRecipe("frozen_encoder", 6e-2, 0.1),
    *(FinetuneRecipe("decoder_warmup", lr, 0.1) for lr in (1e-2, 3e-2, 6e-2, 1e-1, 2e-1)),
]
SCRATCH_WIDE = [FinetuneRecipe("scratch", lr) for lr in (3e-3, 1e-2, 3e-2, 6e-2, 1e-1, 2e-1)]
#: The final candidates (the default), rerun with the shipped weights: the best of the wide sweep per arm
#: (encoder-only transfer with 10 % warm-ups; scratch) at lr 0.06 / 0.1 / 0.2 and 0.1 / 0.2 / 0.3, so that
#: neither arm's best lr lies at the edge of its grid unnoticed.
S3D_CANDIDATES = [FinetuneRecipe("decoder_warmup", lr, 0.1) for lr in (6e-2, 1e-1, 2e-1)]
SCRATCH_CANDIDATES = [FinetuneRecipe("scratch", lr) for lr in (1e-1, 2e-1, 3e-1)]


def validation_cohort(out: Path, source: str) -> Path:
    """The demo's training pool with validation subjects in imagesTs/labelsTs (cached)."""
    from s3d.data.synthetic import write_demo_dataset

    ds = out / "data" / "Dataset900_DemoTissue"
    if not (ds / "done").exists():
        write_demo_dataset(ds, task="tissue", source=source, num_train=D.num_labelled, num_test=D.num_test,
                           shape=D.shape, spacing_mm=D.spacing_mm, seed=D.data_seed, test_split="val",
                           progress=False)
        (ds / "done").write_text("ok\n")
    return ds


def arm(out: Path, ds: Path, init: str, weights: str | None, recipe: FinetuneRecipe, n: int, seed: int,
        steps: int, tag: str = "") -> dict:
    """Fine-tune, predict the validation subjects, score (cached in RUN/result.json)."""
    from s3d.demo.compare import finetune_and_score

    name = f"{init}{tag}_{recipe.schedule}_lr{recipe.peak_lr:g}_w{recipe.warmup_fraction:g}_{steps}_n{n}_seed{seed}"
    run = out / "runs" / name
    if (run / "result.json").exists():
        return json.loads((run / "result.json").read_text())
    if run.exists():
        import shutil

        shutil.rmtree(run)  # an interrupted run: start it again
    t = time.perf_counter()
    r = finetune_and_score(ds, run, init=init, weights=weights, recipe=recipe, n_train=n, seed=seed, steps=steps,
                           patch_size=D.patch_size, batch_size=D.batch_size, spacing_mm=D.spacing_mm, device="cpu")
    res = {"dice": r.dice, "per_class": r.dice_per_class, "seconds": time.perf_counter() - t}
    (run / "result.json").write_text(json.dumps(res))
    print(f"  {name}: Dice {r.dice:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in r.dice_per_class.items())
          + f" ({res['seconds']:.0f} s)", flush=True)
    return res


def table(rows: list[tuple[str, list[dict]]], seeds: list[int], sizes: list[int]) -> str:
    classes = list(rows[0][1][0]["per_class"])
    head = " | ".join(f"n={n} seed {s}" for n in sizes for s in seeds)
    lines = [f"| candidate | {head} | mean ± sd | " + " | ".join(classes) + " |",
             "|---|" + "---:|" * (len(sizes) * len(seeds) + 1 + len(classes))]
    for name, res in rows:
        d = [r["dice"] for r in res]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        per = [statistics.mean(r["per_class"][c] for r in res) for c in classes]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in d) + f" | {statistics.mean(d):.3f} ± {sd:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in per) + " |")
    return "\n".join(lines)


def select(out: Path, ds: Path, weights: str, seeds: list[int], sizes: list[int], steps: int,
           arms: list[str], wide: bool = False) -> dict:
    chosen = {}
    s3d, scratch = (S3D_WIDE, SCRATCH_WIDE) if wide else (S3D_CANDIDATES, SCRATCH_CANDIDATES)
    for init, cands, w in (("s3d", s3d, weights), ("scratch", scratch, None)):
        if init not in arms:
            continue
        rows = []
        for rec in cands:
            print(f"{init}: {rec.label()}", flush=True)
            rows.append((rec.label(), [arm(out, ds, init, w, rec, n, s, steps) for n in sizes for s in seeds]))
        best = max(range(len(cands)), key=lambda i: statistics.mean(r["dice"] for r in rows[i][1]))
        chosen[init] = cands[best]
        print(f"\n{init} arm, validation Dice ({len(seeds)} seeds x sizes {sizes}, {steps} steps):\n")
        print(table(rows, seeds, sizes))
        print(f"\nchosen for {init}: {cands[best].label()}\n", flush=True)
    (out / "selection.json").write_text(json.dumps({k: asdict(v) for k, v in chosen.items()}, indent=2))
    if chosen != {k: RECIPES[k] for k in chosen}:
        print(f"NOTE: s3d.demo.settings.RECIPES is {RECIPES}; the selection above differs: {chosen}")
    return chosen


def weights_ablation(out: Path, ds: Path, weights: str, short: str | None, seeds: list[int], sizes: list[int],
                     steps: int) -> None:
    import torch

    from s3d import build_resenc_unet, save_pretrained

    control = out / "control_backbone"
    if not control.exists():
        torch.manual_seed(123)
        save_pretrained(build_resenc_unet("tiny", in_channels=1, num_classes=1), control)
    arms = [("shipped " + weights, weights), ("random weights as backbone (control)", str(control))]
    if short:
        arms.append((f"short pre-training {short}", short))
    rows = []
    for label, w in arms:
        tag = "_" + Path(w).name.replace("-", "")
        rows.append((label, [arm(out, ds, "s3d", w, RECIPES["s3d"], n, s, steps, tag) for n in sizes for s in seeds]))
    rows.append(("scratch", [arm(out, ds, "scratch", None, RECIPES["scratch"], n, s, steps)
                             for n in sizes for s in seeds]))
    print(f"\nweights of the pre-trained arm (recipe {RECIPES['s3d'].label()}), validation Dice:\n")
    print(table(rows, seeds, sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_ablation"))
    ap.add_argument("--select", action="store_true", help="choose each arm's fine-tuning recipe")
    ap.add_argument("--wide", action="store_true", help="--select over the wide sweep (S3D_WIDE, SCRATCH_WIDE)")
    ap.add_argument("--weights-ablation", action="store_true", help="compare the weights of the pre-trained arm")
    ap.add_argument("--weights", default="s3d-demo", help="weights of the pre-trained arm (default: s3d-demo)")
    ap.add_argument("--short", default=None, help="a backbone folder from a short pre-training, for --weights-ablation")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--sizes", nargs="+", type=int, default=[5])
    ap.add_argument("--steps", type=int, default=D.finetune_steps, help="fine-tuning steps per run")
    ap.add_argument("--source", default="mni", choices=["mni", "phantom"])
    ap.add_argument("--arms", nargs="+", default=["s3d", "scratch"], choices=["s3d", "scratch"],
                    help="the arms whose recipe --select chooses")
    a = ap.parse_args()
    if not (a.select or a.weights_ablation):
        ap.error("give --select and/or --weights-ablation")
    ds = validation_cohort(a.out, a.source)
    if a.select:
        select(a.out, ds, a.weights, a.seeds, a.sizes, a.steps, a.arms, a.wide)
    if a.weights_ablation:
        weights_ablation(a.out, ds, a.weights, a.short, a.seeds, a.sizes, a.steps)


if __name__ == "__main__":
    main()
