"""One arm of the comparison: fine-tune (from weights, random weights or scratch), predict, score.

:func:`finetune_and_score` is what the demo runs for every (arm, training-set size, seed) and what
``benchmarks/demo_ablation.py`` runs to choose the recipes on validation cases. It goes through the
public API only: :func:`s3d.finetune.run`, :func:`s3d.infer.predict_folder`,
:func:`s3d.metrics.evaluate_folder`.

The arms: ``s3d`` (the pre-trained weights, its recipe), ``control`` (random weights through exactly
the ``s3d`` arm's recipe: the network the ``s3d`` arm builds, with its encoder left at the random
initialisation the weights would overwrite) and ``scratch`` (random weights, scratch's own recipe).
"""

from __future__ import annotations

import time
from pathlib import Path

from s3d.demo.report import RunResult
from s3d.demo.settings import ARCHITECTURE, FinetuneRecipe
from s3d.runtime.metrics import read_metrics


def finetune_kwargs(recipe: FinetuneRecipe, steps: int) -> dict[str, object]:
    """The :func:`s3d.finetune.run` arguments of ``recipe`` for a run of ``steps`` steps.

    Example:
        >>> finetune_kwargs(FinetuneRecipe("best", 1e-2, 0.1), 100)
        {'schedule': 'best', 'peak_lr': 0.01, 'warmup_steps': 10}
    """
    return {"schedule": recipe.schedule, "peak_lr": recipe.peak_lr,
            "warmup_steps": max(1, round(recipe.warmup_fraction * steps))}


def finetune_and_score(
    dataset: Path,
    run_dir: Path,
    *,
    init: str,
    weights: str | None,
    recipe: FinetuneRecipe,
    n_train: int,
    seed: int,
    steps: int,
    patch_size: tuple[int, int, int],
    batch_size: int,
    spacing_mm: float,
    device: str,
    architecture: str = ARCHITECTURE,
    val_every: int | None = None,
    progress: bool = False,
) -> RunResult:
    """Fine-tune one arm on ``n_train`` cases of ``dataset``, predict its ``imagesTs``, score against ``labelsTs``.

    Args:
        dataset: nnU-Net raw dataset folder (labelsTs holds the held-out labels: test or validation cases).
        run_dir: the run folder (replaced runs must be removed by the caller).
        init: arm name for the result: "s3d", "control" or "scratch".
        weights: pre-trained weights for :func:`s3d.load_pretrained` (``None``: random weights; for
            ``init="control"`` the weights' architecture, which the random network gets).
        recipe: schedule, peak lr and warm-ups.
        n_train: labelled training cases (the first N of the seed's split of the training pool).
        seed: split, initialisation of new weights, patches and augmentation.
        steps: optimiser steps.
        patch_size: training patch (voxels).
        batch_size: patches per step.
        spacing_mm: the data's (isotropic) spacing, mm; also the NSD tolerance (one voxel).
        device: "cpu" or "cuda".
        architecture: preset of a from-scratch network.
        val_every: steps between validations on the run's held-out training-pool cases (``None``: at the end).
        progress: progress bars.

    Returns:
        A :class:`~s3d.demo.report.RunResult` with Dice and NSD (mean, per case, per class, per case and class).

    Example:
        >>> finetune_and_score(ds, Path("runs/a"), init="scratch", weights=None,  # doctest: +SKIP
        ...                    recipe=FinetuneRecipe("scratch", 1e-2), n_train=5, seed=0, steps=150,
        ...                    patch_size=(32, 32, 32), batch_size=2, spacing_mm=3.5, device="cpu")
    """
    from s3d.finetune import run as finetune
    from s3d.infer import predict_folder
    from s3d.metrics import evaluate_folder

    t0 = time.perf_counter()
    model = None
    if init == "control":  # the s3d arm's network (same seeded build, same fresh decoder), random encoder
        from s3d.hub import load_state

        model = control_model(dataset, load_state(weights)[1] if weights is not None else architecture, seed)
    finetune(dataset, run_dir, model=model, pretrained=None if init == "control" else weights,
             **finetune_kwargs(recipe, steps), steps=steps,
             config=getattr(architecture, "name", architecture), batch_size=batch_size, patch_size=patch_size,
             target_spacing_mm=(spacing_mm,) * 3, n_train=n_train, val_fraction=0.2,
             val_every=val_every or steps, checkpoint_every=steps, num_val_cases=2, final_validation=False,
             seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    predict_folder(dataset / "imagesTs", run_dir / "pred", run_dir / "model", device=device,
                   mirror=False, progress=False)  # mirroring would cost 8x the demo's budget
    res = evaluate_folder(run_dir / "pred", dataset / "labelsTs", dataset / "dataset.json", tau_mm=spacing_mm,
                          progress=False)
    if res.errors:
        raise RuntimeError(f"evaluation of {run_dir / 'pred'} failed for {res.errors}")
    loss, val = list(read_metrics(run_dir, "loss").items()), list(read_metrics(run_dir, "val_dice").items())
    per_class = {name: float(m["dice"]) for name, m in res.summary["mean"].items()}
    per_case_class = {c: {k: float(v["dice"]) for k, v in classes.items()} for c, classes in res.per_case.items()}
    fg = res.summary["foreground_mean"]
    return RunResult(n_train, init, float(fg["dice"]), float(fg["nsd"]), res.case_means("dice"), steps, seconds,
                     str(run_dir), val, loss, per_class, seed, per_case_class,
                     "random init" if init != "s3d" else str(weights), recipe.label())


def control_model(dataset: Path, architecture: object, seed: int) -> object:
    """The control arm's network: what the pre-trained arm builds for ``seed``, before its encoder is loaded.

    :func:`s3d.finetune.prepare_model` builds the network under ``torch.manual_seed(seed)`` and then
    overwrites the encoder with the weights; this is the same seeded build without the overwrite, so the
    control's decoder and head equal the pre-trained arm's, and its encoder is random (He init).

    Example:
        >>> control_model(Path("Dataset900_DemoTissue"), "tiny", 0).config.name  # doctest: +SKIP
        'tiny'
    """
    import torch

    from s3d.data.nnunet import read_dataset_json
    from s3d.nn import build_resenc_unet

    ds = read_dataset_json(dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_resenc_unet(architecture, in_channels=ds.num_channels, num_classes=ds.num_classes,
                                 deep_supervision=False)
