"""Convert between s3d (safetensors + config.json), nnssl (``checkpoint_final.pth``) and nnU-Net formats.

Either family: a ResEnc U-Net is written with DNA's alias keys (:mod:`s3d.hub.nnssl`), a Primus with
DNA's Primus keys as they are and a Primus adaptation plan (:mod:`s3d.hub.primus`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from s3d._fs import atomic_path, write_json_atomic
from s3d.hub.adapt import LoadReport
from s3d.hub.nnssl import adaptation_plan, nnssl_checkpoint, nnunet_checkpoint
from s3d.hub.pretrained import load_pretrained, save_pretrained
from s3d.hub.primus import primus_adaptation_plan, primus_network_weights
from s3d.hub.sources import NNSSL_NAME
from s3d.nn.family import ModelConfig
from s3d.nn.primus import PrimusConfig

Target = Literal["s3d", "nnssl", "nnunet"]
TARGETS: tuple[str, ...] = ("s3d", "nnssl", "nnunet")
NNUNET_NAME = "pretrained_weights.pth"


def _torch_save_atomic(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_for(state: dict[str, torch.Tensor], config: ModelConfig, to: str
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint dict, adaptation plan) of ``to`` = "nnssl" or "nnunet" for a state dict of either family.

    Example:
        >>> ckpt, plan = checkpoint_for(model.state_dict(), model.config, "nnssl")
    """
    if isinstance(config, PrimusConfig):
        plan = primus_adaptation_plan(config)
        weights = {"network_weights": primus_network_weights(state)}
        if to == "nnssl":
            weights.update({"nnssl_adaptation_plan": plan, "trainer_name": "s3d", "current_epoch": 0, "init_args": {}})
        return weights, plan
    plan = adaptation_plan(config)
    return (nnssl_checkpoint(state, config) if to == "nnssl" else nnunet_checkpoint(state)), plan


def convert(
    source: str | os.PathLike[str],
    to: Target,
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
    strict: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[Path], LoadReport]:
    """Read any checkpoint :func:`s3d.load_pretrained` accepts and write it in another format.

    The network is rebuilt and loaded strictly (input channels, classes and, for Primus, the patch as in
    the source), so a conversion never silently drops or invents a tensor: what a Primus pre-training
    checkpoint holds beyond the segmentation network (MAE's decoder EVA and mask token, projection
    heads) is dropped and listed in the report (``dropped_keys``).

    Args:
        source: registry name, Hub repo, directory, ``.safetensors`` or ``.pth`` (either family).
        to: ``"s3d"`` (directory: model.safetensors, config.json, README.md); ``"nnssl"`` (directory
            with ``checkpoint_final.pth`` holding ``network_weights`` with DNA's keys (every alias key for
            a ResEnc U-Net) and ``nnssl_adaptation_plan``, plus ``adaptation_plan.json``; or a ``.pth``
            path); ``"nnunet"`` (a ``.pth`` with ``network_weights``, what nnU-Net's
            ``-pretrained_weights`` loads; a directory gets ``pretrained_weights.pth``).
        out: output directory or file.

    Returns:
        ``(written_paths, load_report)``.

    Example:
        >>> convert("checkpoint_final.pth", "s3d", "converted/")
    """
    if to not in TARGETS:
        raise ValueError(f"to: expected one of {TARGETS}, got {to!r}")
    model, report = load_pretrained(
        source,
        in_channels=None,
        num_classes=None,
        revision=revision,
        strict=strict,
        cache_dir=cache_dir,
        input_shape="checkpoint",
        output_loading_info=True,
    )
    out = Path(out)
    if to == "s3d":
        directory = save_pretrained(model, out, provenance=f"Converted with s3d from {source}.")
        return [directory / n for n in ("model.safetensors", "config.json", "README.md")], report
    ckpt, plan = checkpoint_for(model.state_dict(), model.config, to)
    if to == "nnssl":
        path = out if out.suffix in (".pth", ".pt") else out / NNSSL_NAME
        _torch_save_atomic(ckpt, path)
        plan_path = path.parent / "adaptation_plan.json"
        write_json_atomic(plan_path, plan)
        return [path, plan_path], report
    path = out if out.suffix in (".pth", ".pt") else out / NNUNET_NAME
    _torch_save_atomic(ckpt, path)
    return [path], report
