"""What a finished pre-training run leaves: the backbone as s3d weights and as an nnssl checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from s3d._fs import atomic_folder, write_json_atomic
from s3d.pretrain.recipes import PretrainRecipe
from s3d.runtime.method import PretrainMethod


def backbone_model(method: PretrainMethod) -> nn.Module:
    """A fresh copy of the method's backbone (CPU, as built) holding the pre-trained weights.

    Example:
        >>> from s3d.pretrain import build_backbone, build_method
        >>> backbone_model(build_method("mae", build_backbone("tiny"), block_size=16)).config.name
        'tiny'
    """
    from s3d.nn.family import build_from_config, config_of

    model = build_from_config(config_of(method.backbone))
    model.load_state_dict(method.export_backbone())
    return model


def export_backbone(method: PretrainMethod, recipe: PretrainRecipe, out: Path, data: str, n_train: int
                    ) -> dict[str, Path]:
    """Write ``out/backbone`` (:func:`s3d.hub.save_pretrained`: safetensors, config, model card with the
    recipe) and ``out/nnssl`` (``checkpoint_final.pth`` + ``adaptation_plan.json`` for nnssl's fine-tuning).

    Args:
        method: the trained method (its ``export_backbone()`` and ``backbone.config``).
        recipe: the run's recipe (provenance, the patch size of the adaptation plan, nnssl's epoch count).
        out: the run folder.
        data: the prepared data folder (named in the model card).
        n_train: training images (named in the model card).

    Returns:
        ``{"backbone": out/backbone, "nnssl": out/nnssl/checkpoint_final.pth}``.
    """
    from s3d.hub import nnssl_checkpoint, save_pretrained
    from s3d.hub.convert import checkpoint_for
    from s3d.hub.nnssl import adaptation_plan
    from s3d.nn.primus import PrimusConfig

    backbone = backbone_model(method)
    provenance = (f"Pre-trained with s3d recipe {recipe.name!r} ({recipe.method}) for {recipe.steps} steps at "
                  f"batch {recipe.batch_size} on {n_train} images of {data}.")
    hub_dir, nn_dir = out / "backbone", out / "nnssl"
    with atomic_folder(hub_dir) as tmp:  # each folder as a whole: its files always belong together
        save_pretrained(backbone, tmp, recipe=recipe.to_dict(), provenance=provenance)
    if isinstance(backbone.config, PrimusConfig):  # the plan's patch is the backbone's input_shape
        ckpt, plan = checkpoint_for(backbone.state_dict(), backbone.config, "nnssl")
        ckpt.update({"trainer_name": "s3d.pretrain", "nnssl_adaptation_plan": plan})
    else:
        ckpt = nnssl_checkpoint(backbone.state_dict(), backbone.config, trainer_name="s3d.pretrain")
        ckpt["nnssl_adaptation_plan"] = adaptation_plan(backbone.config, recipe.patch_size)
    ckpt["current_epoch"] = recipe.steps // 250  # nnssl counts epochs of 250 steps
    with atomic_folder(nn_dir) as tmp:
        torch.save(ckpt, tmp / "checkpoint_final.pth")
        write_json_atomic(tmp / "adaptation_plan.json", ckpt["nnssl_adaptation_plan"])
    return {"backbone": hub_dir, "nnssl": nn_dir / "checkpoint_final.pth"}
