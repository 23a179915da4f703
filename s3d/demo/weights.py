"""The demo's shipped weights: how ``s3d-demo`` was pre-trained, and the command that does it again.

A model zoo works this way round: pre-training is done once, at scale, and users load the weights
and fine-tune briefly. ``s3d demo --make-weights DIR`` (:func:`make_demo_weights`) is that one run for
the demo network: it draws a large unlabelled cohort of the demo's data (:data:`WEIGHTS_COHORT`, seed
stream ``(1000, "unlabelled", i)``, never a demo training, validation or test subject), pre-trains the
``tiny`` ResEnc U-Net with the S3D-B recipe scaled down (sparse MAE, mask cells = the network's total
stride 16), and writes s3d safetensors with a model card (recipe, steps, data, seed, command, loss
curve). Every stage resumes: run the same command again after an interruption. The result ships in
the package as ``s3d/zoo/s3d-demo`` and loads offline with ``s3d.load_pretrained("s3d-demo")``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from s3d._fs import write_json_atomic
from s3d.runtime.metrics import MetricsLog

#: Cohort seed of the weights' pre-training data; the demo's own cohorts use seeds 0-99.
WEIGHTS_SEED = 1000


@dataclass(frozen=True)
class WeightsRecipe:
    """What :func:`make_demo_weights` does (stored in the model card and ``config.json``).

    Attributes:
        source / shape / spacing_mm: the demo's data (anatomy source, grid in voxels, voxel size mm).
        num_volumes: unlabelled volumes drawn for pre-training (T1/T2/FLAIR/PD, every cohort factor).
        cohort_seed: their cohort seed (volume i is seeded by (cohort_seed, "unlabelled", i)).
        architecture: the demo network (``tiny`` ResEnc U-Net preset, total stride 16).
        recipe: the pre-training recipe (``s3d-b``: sparse MAE, mask ratio U[0.6, 0.9], SGD Nesterov
            0.99, lr 1e-2, PolyLR), scaled down by the fields below.
        steps / batch_size / patch_size: optimiser steps, patches per step, patch (voxels).
        block_size: mask cell edge, voxels (= the network's total stride, as 32 is for ResEnc-L).
        seed: the pre-training run's seed.
    """

    source: str = "mni"
    shape: tuple[int, int, int] = (48, 56, 48)
    spacing_mm: float = 3.5
    num_volumes: int = 3000
    cohort_seed: int = WEIGHTS_SEED
    architecture: str = "tiny"
    recipe: str = "s3d-b"
    steps: int = 8000
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (48, 48, 48)
    block_size: int = 16
    seed: int = 0


def _loss_curve(metrics: Path, bins: int = 16) -> list[dict[str, float]]:
    """Mean training loss (and the last validation loss) in ``bins`` equal step ranges."""
    log = MetricsLog(metrics)
    loss, val = list(log.values("loss").items()), list(log.values("val_loss").items())
    if not loss:
        return []
    last = loss[-1][0]
    edges = [round(last * k / bins) for k in range(bins + 1)]
    rows = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        chunk = [v for s, v in loss if a < s <= b]
        vals = [v for s, v in val if a < s <= b]
        if chunk:
            row = {"steps": f"{a + 1}-{b}", "train_loss": sum(chunk) / len(chunk)}
            if vals:
                row["val_loss"] = vals[-1]
            rows.append(row)
    return rows


def model_card(w: WeightsRecipe, curve: list[dict[str, Any]], n_train: int, n_val: int, hours: float,
               command: str) -> str:
    """The README.md of the shipped weights: what they are, how they were made, the loss curve."""
    lines = [
        "---", "license: cc-by-4.0", "library_name: s3d", "tags: [s3d, mae, 3d, segmentation, demo]", "---", "",
        "# s3d-demo: the demo network, pre-trained once with the S3D recipe", "",
        f"A `{w.architecture}` ResEnc U-Net (total stride 16) pre-trained with sparse-MAE recipe `{w.recipe}` "
        "scaled down, for `s3d demo`. Not a model for real images: it has only seen synthetic brain MRI.", "",
        "## How it was made", "",
        f"- Data: {w.num_volumes} unlabelled synthetic volumes from `s3d.data.synthetic` (source `{w.source}`, "
        f"{tuple(w.shape)} voxels of {w.spacing_mm} mm, sequences T1/T2/FLAIR/PD, every anatomy and "
        f"acquisition factor of docs/quickstart.md), cohort seed {w.cohort_seed}: volume i is seeded by "
        f"({w.cohort_seed}, 'unlabelled', i), so no demo training, validation or test subject (cohort seeds "
        f"0-99) is among them. {n_train} volumes trained, {n_val} held out for the validation loss.",
        f"- Recipe: `{w.recipe}` (sparse MAE, mask ratio U[0.6, 0.9], L2 on masked voxels, SGD Nesterov 0.99, "
        f"lr 1e-2, weight decay 3e-5, PolyLR) with {w.steps} steps of batch {w.batch_size}, patch "
        f"{tuple(w.patch_size)}, mask cells of {w.block_size}^3 voxels (the network's total stride), seed "
        f"{w.seed}.",
        f"- Time: {hours:.1f} h on CPU.",
        f"- Command: `{command}`", "",
        "## Loss curve (masked L2 in z-score units)", "",
        "| steps | mean training loss | validation loss (end of range) |", "|---|---:|---:|",
    ]
    for row in curve:
        val = f"{row['val_loss']:.4f}" if "val_loss" in row else ""
        lines.append(f"| {row['steps']} | {row['train_loss']:.4f} | {val} |")
    lines += ["", "## Use", "", "```python", "import s3d", "",
              'net = s3d.load_pretrained("s3d-demo", in_channels=1, num_classes=4)  # offline: shipped with s3d',
              "```", ""]
    return "\n".join(lines)


def make_demo_weights(out: str | os.PathLike[str], w: WeightsRecipe | None = None, progress: bool = True,
                      device: str = "auto", command: str = "s3d demo --make-weights DIR") -> Path:
    """Draw the cohort, pre-train and write ``OUT/weights`` (safetensors + config + model card); resumable.

    Args:
        out: work folder (``data/``, ``prep/``, ``pretrain/``, ``weights/``); run again to resume.
        w: the recipe (default :class:`WeightsRecipe`).
        progress: progress bars.
        device: "auto", "cpu" or "cuda".
        command: the command line recorded in the model card.

    Returns:
        ``OUT/weights``, ready to copy to ``s3d/zoo/s3d-demo``.

    Example:
        >>> make_demo_weights("runs/demo-weights")  # doctest: +SKIP
        PosixPath('runs/demo-weights/weights')
    """
    from s3d.data.scan import ScanFilters, prepare
    from s3d.data.synthetic import write_unlabelled
    from s3d.hub import load_pretrained, save_pretrained
    from s3d.pretrain import run as pretrain

    w = w or WeightsRecipe()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "weights_recipe.json", asdict(w))
    t0 = time.perf_counter()
    data = root / "data"
    done = {p.name.split("_")[1] for p in data.glob("demo_u*.nii.gz")} if data.exists() else set()
    start = 0
    while f"u{start:05d}" in done:  # resume the draw where it stopped
        start += 1
    if start < w.num_volumes:
        write_unlabelled(data, w.num_volumes - start, source=w.source, shape=w.shape, spacing_mm=w.spacing_mm,
                         seed=w.cohort_seed, start=start, progress=progress)
    prep = root / "prep"
    prepare(data, prep, ScanFilters(min_file_bytes=0), target_spacing_mm=w.spacing_mm, progress=progress)
    run_dir = root / "pretrain"
    result = pretrain(data=str(prep), out=str(run_dir), recipe=w.recipe, architecture=w.architecture, steps=w.steps,
                      batch_size=w.batch_size, patch_size=w.patch_size, method_kwargs={"block_size": w.block_size},
                      seed=w.seed, device=device, workers=0, val_fraction=0.02, val_every=500, val_max_cases=16,
                      snapshot_every=2000, checkpoint_every=250, resume=True, progress=progress)
    if not result.finished:
        raise RuntimeError(f"{run_dir}: pre-training stopped at step {result.step}; run again to resume")
    info = json.loads((run_dir / "run.json").read_text())
    hours = _elapsed_hours(run_dir / "metrics.jsonl", fallback_s=time.perf_counter() - t0)
    net = load_pretrained(result.paths["backbone"], in_channels=1, num_classes=1)
    card = model_card(w, _loss_curve(run_dir / "metrics.jsonl"), info["n_train"], info["n_val"], hours, command)
    recipe = {"name": "s3d-demo", **asdict(w), "pretrain_recipe": info["recipe"],
              "data": {"n_train": info["n_train"], "n_val": info["n_val"]}, "command": command}
    return save_pretrained(net, root / "weights", recipe=recipe, model_card_text=card)


def _elapsed_hours(metrics: Path, fallback_s: float) -> float:
    """Hours spent in the logged training steps: the sum of gaps under 2 minutes between ``time`` stamps
    (so the pauses of an interrupted and resumed run do not count)."""
    stamps = sorted(MetricsLog(metrics).values("time").values())
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True) if b - a < 120]
    return sum(gaps) / 3600 if gaps else fallback_s / 3600
