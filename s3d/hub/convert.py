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
from s3d.hub.sources import NNSSL_NAME, local_path
from s3d.nn.family import ModelConfig
from s3d.nn.primus import PrimusConfig

Target = Literal["s3d", "nnssl", "nnunet"]
TARGETS: tuple[str, ...] = ("s3d", "nnssl", "nnunet")
NNUNET_NAME = "pretrained_weights.pth"


def _torch_save_atomic(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _targets(to: str, out: Path) -> list[Path]:
    """The files a conversion to ``to`` writes for ``out``."""
    if to == "s3d":
        return [out / n for n in ("model.safetensors", "config.json", "README.md")]
    if to == "nnssl":
        path = out if out.suffix in (".pth", ".pt") else out / NNSSL_NAME
        return [path, path.parent / "adaptation_plan.json"]
    return [out if out.suffix in (".pth", ".pt") else out / NNUNET_NAME]


def _check_out(source: str | os.PathLike[str], out: Path, targets: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is read, an output that overlaps the source or would replace earlier files."""
    from s3d._paths import check_apart, output_folder

    output_folder(targets[0].parent, "output folder (-o/--out)")
    local = local_path(source)
    if local is not None:
        check_apart(out, "output (-o/--out)", [(local, "source")])
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists (an earlier conversion, or another model): pass --overwrite "
                              "(overwrite=True) to replace it, or choose another -o/--out")
    for t in existing:
        if t.is_dir():
            raise FileExistsError(f"{t}: a folder where the converted file should be written; remove it or choose "
                                  "another -o/--out")


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
    overwrite: bool = False,
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
        out: output directory or file; it may not be, lie inside or hold a local ``source``.
        overwrite: replace files of an earlier conversion there (without it they are an error, and
            nothing is read or written).

    Raises:
        FileExistsError: ``out`` already holds the files this conversion writes and ``overwrite`` is off,
            or a file is where the output folder should be.
        s3d._paths.UsageError: ``out`` overlaps a local ``source``.

    Returns:
        ``(written_paths, load_report)``.

    Example:
        >>> convert("checkpoint_final.pth", "s3d", "converted/")
    """
    if to not in TARGETS:
        raise ValueError(f"to: expected one of {TARGETS}, got {to!r}")
    targets = _targets(to, Path(out))
    _check_out(source, Path(out), targets, overwrite)
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
