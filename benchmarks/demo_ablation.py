"""Why the CPU demo's pre-training does not beat scratch: the ablation behind docs/quickstart.md.

Not a speed benchmark: it measures test Dice. One cohort of the demo's data (MNI source, 48x56x48
voxels of 3.5 mm, 200 unlabelled + 40 labelled + 10 test volumes), the demo network (``tiny``), patch
48^3, batch 2, 5 labelled cases, a fixed number of fine-tuning steps; each arm is one pre-training
setting (cells, steps, lr) and one fine-tuning schedule, run for every seed. Everything is cached
under ``--out``, so arms can be added and the table re-printed.

Arms:
    scratch            nnU-Net default from a random init (the demo's baseline)
    control            random weights saved as a "pre-trained" backbone, schedule no_warmup: checks that
                       the pre-trained code path itself costs nothing
    <cells>c<steps>s[<lr>]:<schedule>
                       MAE pre-training with mask cells of <cells>^3 voxels for <steps> steps (lr 1e-2
                       unless given), then the named fine-tuning schedule, e.g. ``8c600s:best``,
                       ``8c600s0.05:no_warmup``, ``16c600s:decoder_warmup``

Example (about 40 minutes on 2 CPU cores):
    python benchmarks/demo_ablation.py --arms scratch control 8c600s:best 8c600s:no_warmup \\
        8c600s:decoder_warmup --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

SHAPE, SPACING, PATCH, BATCH, ARCH = (48, 56, 48), 3.5, (48, 48, 48), 2, "tiny"


def cohort(out: Path) -> Path:
    from s3d.data.scan import ScanFilters, prepare
    from s3d.data.synthetic import write_demo_cohort

    root = out / "data"
    if not (root / "done").exists():
        write_demo_cohort(root, task="tissue", source="mni", num_train=40, num_test=10, num_unlabelled=200,
                          shape=SHAPE, spacing_mm=SPACING, seed=0, progress=False)
        prepare(root / "unlabelled", root / "prep", ScanFilters(min_file_bytes=0), target_spacing_mm=SPACING,
                progress=False)
        (root / "done").write_text("ok\n")
    return root


def backbone(out: Path, root: Path, cells: int, steps: int, lr: float | None) -> Path:
    """Pre-train (cached) and return the backbone folder; steps 0 = random weights (the control)."""
    from s3d import build_resenc_unet, save_pretrained
    from s3d.pretrain import PretrainConfig
    from s3d.pretrain import run as pretrain

    run = out / "pretrain" / f"c{cells}_s{steps}_lr{lr}"
    if (run / "backbone").exists():
        return run / "backbone"
    if steps == 0:
        torch.manual_seed(123)
        save_pretrained(build_resenc_unet(ARCH, in_channels=1, num_classes=1), run / "backbone")
        return run / "backbone"
    t = time.perf_counter()
    pretrain(PretrainConfig(data=str(root / "prep"), out=str(run), recipe="s3d-b", architecture=ARCH, steps=steps,
                            batch_size=BATCH, patch_size=PATCH, lr=lr, method_kwargs={"block_size": cells}, seed=0,
                            device="cpu", workers=0, val_fraction=0.1, val_every=steps, val_max_cases=2,
                            snapshot_every=steps, checkpoint_every=steps, progress=False))
    print(f"pre-trained {run.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return run / "backbone"


def finetune_arm(out: Path, root: Path, name: str, pretrained: Path | None, schedule: str, steps: int, n: int,
                 seed: int) -> dict:
    from s3d.finetune import run as finetune
    from s3d.infer import predict_folder
    from s3d.metrics import evaluate_folder

    ds = next(root.glob("Dataset*"))
    run = out / "finetune" / f"{name}_{schedule}_{steps}_n{n}_seed{seed}"
    if (run / "result.json").exists():
        return json.loads((run / "result.json").read_text())
    finetune(ds, run, pretrained=None if pretrained is None else str(pretrained), schedule=schedule, steps=steps,
             warmup_steps=max(1, steps // 20), config=ARCH, batch_size=BATCH, patch_size=PATCH,
             target_spacing_mm=(SPACING,) * 3, n_train=n, val_fraction=0.2, val_every=steps,
             checkpoint_every=steps, num_val_cases=2, seed=seed, device="cpu", progress=False)
    predict_folder(ds / "imagesTs", run / "pred", run / "model", device="cpu", mirror=False, progress=False)
    ev = evaluate_folder(run / "pred", ds / "labelsTs", ds / "dataset.json", tau_mm=SPACING, progress=False)
    res = {"dice": ev.summary["foreground_mean"]["dice"],
           "per_class": {k: v["dice"] for k, v in ev.summary["mean"].items()}}
    (run / "result.json").write_text(json.dumps(res))
    return res


def linear_probe(root: Path, backbone_dir: Path | None, n_fit: int = 5, n_test: int = 5) -> list[float]:
    """Test Dice per foreground class of a linear classifier on the features in front of the seg head.

    The classifier (softmax regression, L-BFGS, features standardised) is fitted on 48^3 crops of
    ``n_fit`` training cases and scored on crops of ``n_test`` test cases; ``backbone_dir`` None =
    random weights (seed 0). Shows what the pre-trained features hold before any fine-tuning.
    """
    import nibabel as nib
    import numpy as np

    from s3d import build_resenc_unet, load_pretrained

    torch.manual_seed(0)
    net = (build_resenc_unet(ARCH, in_channels=1, num_classes=4, deep_supervision=False) if backbone_dir is None
           else load_pretrained(backbone_dir, in_channels=1, num_classes=4)).eval()
    ds = next(root.glob("Dataset*"))
    crop = tuple(slice(0, p) for p in PATCH)

    def case(split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = sorted((ds / f"images{split}").glob("*_0000.nii.gz"))[i]
        lab = ds / f"labels{split}" / img.name.replace("_0000", "")
        x = np.asarray(nib.load(str(img)).dataobj, np.float32)
        x = (x - x.mean()) / x.std()
        feats: dict[str, torch.Tensor] = {}
        hook = net.decoder.seg_layers[-1].register_forward_hook(lambda m, a, o: feats.setdefault("f", a[0]))
        with torch.no_grad():
            net(torch.from_numpy(x[crop])[None, None])
        hook.remove()
        y = torch.from_numpy(np.asarray(nib.load(str(lab)).dataobj).astype(np.int64)[crop]).flatten()
        return feats["f"][0].flatten(1).T, y

    fit = [case("Tr", i) for i in range(n_fit)]
    f, y = torch.cat([a for a, _ in fit]), torch.cat([b for _, b in fit])
    mu, sd = f.mean(0), f.std(0) + 1e-6
    w = torch.zeros(f.shape[1], 4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    fn = (f - mu) / sd

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fn @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    dice = []
    for i in range(n_test):
        ft, yt = case("Ts", i)
        pred = (((ft - mu) / sd) @ w + b).argmax(1)
        dice.append([float(2 * ((pred == k) & (yt == k)).sum() / max(1, int((pred == k).sum() + (yt == k).sum())))
                     for k in (1, 2, 3)])
    return [float(v) for v in np.mean(dice, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_ablation"))
    ap.add_argument("--arms", nargs="+", default=["scratch", "control", "8c600s:best", "8c600s:no_warmup",
                                                  "8c600s:decoder_warmup"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    ap.add_argument("--n-train", type=int, default=5)
    ap.add_argument("--probe", action="store_true",
                    help="also print a linear probe (test Dice of CSF/GM/WM) of random and pre-trained features")
    a = ap.parse_args()
    root = cohort(a.out)
    if a.probe:
        print("linear probe, test Dice CSF / GM / WM:")
        print("  random weights: " + " / ".join(f"{v:.3f}" for v in linear_probe(root, None)), flush=True)
    rows = []
    for arm in a.arms:
        if arm == "scratch":
            pre, schedule = None, "scratch"
        elif arm == "control":
            pre, schedule = backbone(a.out, root, 0, 0, None), "no_warmup"
        else:
            m = re.fullmatch(r"(\d+)c(\d+)s([0-9.e-]*):(\w[\w.-]*)", arm)
            if m is None:
                raise SystemExit(f"--arms: cannot read {arm!r}; expected e.g. 8c600s:best or 8c600s0.05:no_warmup")
            lr = float(m[3]) if m[3] else None
            pre, schedule = backbone(a.out, root, int(m[1]), int(m[2]), lr), m[4]
            if a.probe:
                probe = " / ".join(f"{v:.3f}" for v in linear_probe(root, pre))
                print(f"  {arm.split(':')[0]}: {probe}", flush=True)
        res = [finetune_arm(a.out, root, arm.split(":")[0], pre, schedule, a.steps, a.n_train, s) for s in a.seeds]
        rows.append((arm, res))
        print(f"{arm}: " + " / ".join(f"{r['dice']:.3f}" for r in res), flush=True)
    classes = list(rows[0][1][0]["per_class"])
    print(f"\n| arm | Dice ({' / '.join(f'seed {s}' for s in a.seeds)}) | "
          + " | ".join(f"{c} (mean over seeds)" for c in classes) + " |")
    print("|---|---|" + "---:|" * len(classes))
    for arm, res in rows:
        per = [sum(r["per_class"][c] for r in res) / len(res) for c in classes]
        dice = " / ".join(f"{r['dice']:.3f}" for r in res)
        print(f"| {arm} | {dice} | " + " | ".join(f"{v:.3f}" for v in per) + " |")


if __name__ == "__main__":
    main()
