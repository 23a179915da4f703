"""Primus checkpoints: reading nnssl's through their adaptation plan, writing nnssl's and nnU-Net's, fitting the patch.

nnssl's Primus pre-training checkpoints (``checkpoint_final.pth``) hold ``network_weights`` with DNA's
Primus keys under the prefixes of their ``nnssl_adaptation_plan`` (``key_to_stem``,
``key_to_encoder``), plus what only the pre-training used (MAE's decoder EVA and learnt mask token,
contrastive projection heads); the plan names the architecture (``"PrimusM"``), the pre-training patch
(``pretrain_plan.configurations.*.patch_size``, which sizes the absolute position embedding) and the
recommended fine-tuning patch. nnU-Net's pretrained Primus trainer loads the patch embedding and the
transformer from them, interpolates the position embedding to its patch and starts the decoder afresh
when the classes differ; :func:`read_primus` does the same and says so in the report.

The export side writes what nnU-Net reads: DNA's Primus keys as they are (Primus registers no alias
copies, unlike the ResEnc U-Net) and, for nnssl, an adaptation plan naming the preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from s3d.nn.primus.config import DNA_CLASS_NAMES, PRIMUS_CONFIGS, PrimusConfig
from s3d.nn.primus.convert import ENCODER, STEM, infer_primus_config, map_foreign_keys

_SHAPE_ONLY = {"in_channels": 1, "num_classes": 1, "input_shape": 8, "drop_path_rate": 0.0,
               "proj_drop_rate": 0.0, "attn_drop_rate": 0.0, "name": ""}


def is_primus(state: Mapping[str, torch.Tensor], plan: Mapping[str, Any] | None = None) -> bool:
    """True when a checkpoint holds a Primus: its plan names one, or (no plan) it has EVA transformer keys.

    Example:
        >>> is_primus({"eva.pos_embed": torch.zeros(1, 8, 48)})
        True
    """
    arch = str(((plan or {}).get("architecture_plans") or {}).get("arch_class_name") or "")
    if arch:
        return arch.startswith("Primus")
    return any(k.startswith("eva.blocks.") or ".eva.blocks." in k for k in state)


def pretrain_patch_size(plan: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """The pre-training patch (voxels) an nnssl plan records, as nnU-Net reads it; ``None`` when absent.

    ``pretrain_patch_size`` at the top of the plan wins (nnU-Net honours it); else the patch size of the
    first configuration of ``pretrain_plan``.
    """
    if not plan:
        return None
    if plan.get("pretrain_patch_size"):
        return tuple(int(s) for s in plan["pretrain_patch_size"])
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    for conf in configs.values():
        if isinstance(conf, Mapping) and conf.get("patch_size"):
            return tuple(int(s) for s in conf["patch_size"])
    return None


def plan_from_nnunet_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """A minimal plan for an nnU-Net training checkpoint (no nnssl plan): the patch its ``init_args`` record.

    nnU-Net's ``checkpoint_final.pth`` keeps the plans it trained with under ``init_args``; the configuration's
    ``patch_size`` sizes a Primus's position embedding. ``None`` when the checkpoint records none.

    Example:
        >>> plan_from_nnunet_checkpoint({"init_args": {"configuration": "3d_fullres", "plans":
        ...     {"configurations": {"3d_fullres": {"patch_size": [192, 160, 64]}}}}})["pretrain_plan"]
        {'configurations': {'3d_fullres': {'patch_size': [192, 160, 64]}}}
    """
    init = ckpt.get("init_args")
    if not isinstance(init, Mapping):
        return None
    plans, name = init.get("plans"), init.get("configuration")
    conf = ((plans or {}).get("configurations") or {}).get(name) if isinstance(plans, Mapping) else None
    if not isinstance(conf, Mapping) or not conf.get("patch_size"):
        return None
    patch = [int(s) for s in conf["patch_size"]]
    return {"pretrain_plan": {"configurations": {name: {"patch_size": patch}}},
            "recommended_downstream_patchsize": patch}


@dataclass
class PrimusRead:
    """A Primus checkpoint mapped onto s3d's keys (what :func:`read_primus` returns).

    Attributes:
        state: s3d's keys; ``mask_token`` is zeros (the segmentation network's, as in DNA's Primus).
        config: the checkpoint's architecture, ``input_shape`` = its pre-training patch.
        dropped: checkpoint keys set aside (pre-training only).
        recommended_input_shape: nnssl's ``recommended_downstream_patchsize``, if any.
        notes: remarks for the load report.
    """

    state: dict[str, torch.Tensor]
    config: PrimusConfig
    dropped: list[str] = field(default_factory=list)
    recommended_input_shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)


def read_primus(
    raw: Mapping[str, torch.Tensor], plan: Mapping[str, Any] | None, fallback: PrimusConfig | None = None
) -> PrimusRead:
    """Map an nnssl (or nnU-Net, or DNA) Primus state dict onto s3d's keys and infer its architecture.

    Args:
        raw: the checkpoint's network weights.
        plan: its ``nnssl_adaptation_plan`` (or ``adaptation_plan.json``), ``None`` without one (then
            the DNA prefixes ``down_projection``/``eva`` are assumed).
        fallback: the architecture to use where the tensors do not tell (a registry entry's).

    Raises:
        ValueError: the architecture cannot be inferred (the message names the missing key or value).

    Example:
        >>> read = read_primus(ckpt["network_weights"], ckpt["nnssl_adaptation_plan"])
        >>> read.config.embed_dim, read.dropped[:1]
        (864, ['decoder.blocks.0.attn.k_proj.weight'])
    """
    plan = plan or {}
    stem_key = str(plan.get("key_to_stem") or STEM)
    encoder_key = str(plan.get("key_to_encoder") or ENCODER)
    state, dropped = map_foreign_keys(raw, stem_key, encoder_key)
    notes = []
    if (stem_key, encoder_key) != (STEM, ENCODER):
        notes.append(f"checkpoint keys {stem_key}.* and {encoder_key}.* mapped onto {STEM}.* and {ENCODER}.*")
    arch_plans = plan.get("architecture_plans") or {}
    arch = arch_plans.get("arch_class_name")
    kwargs = arch_plans.get("arch_kwargs") or {}
    defaults: dict[str, Any] = {}
    heads = kwargs.get("encoder_eva_numheads", kwargs.get("eva_numheads"))
    if heads is None and fallback is not None and arch not in DNA_CLASS_NAMES:
        heads = fallback.eva_numheads
    if heads is not None:
        defaults["eva_numheads"] = int(heads)
    if not any(k.startswith("up_projection.") for k in state):  # encoder only: classes from the entry or the default
        defaults["num_classes"] = (fallback or PrimusConfig()).num_classes
    patch = pretrain_patch_size(plan) or (fallback.input_shape if fallback is not None else None)
    config = infer_primus_config(state, architecture=arch, patch_size=patch, **defaults)
    e = config.embed_dim
    if "mask_token" in dropped and not bool(raw["mask_token"].any()):
        dropped.remove("mask_token")  # a segmentation Primus's own (zero) buffer, e.g. from nnU-Net: nothing lost
    if "mask_token" in dropped:
        notes.append("the checkpoint's mask_token (learnt by the token-masking pre-training) is dropped; a "
                     "segmentation Primus keeps zeros there, as DNA's Primus and nnU-Net do")
    state["mask_token"] = torch.zeros(1, 1, e, dtype=state["down_projection.proj.weight"].dtype)
    recommended = plan.get("recommended_downstream_patchsize")
    return PrimusRead(state=state, config=config, dropped=dropped, notes=notes,
                      recommended_input_shape=tuple(int(s) for s in recommended) if recommended else None)


def preset_name(config: PrimusConfig) -> str | None:
    """DNA's class name (``"PrimusM"``) when ``config`` is that preset's shape (any channels, classes, patch)."""
    shape = config.replace(**_SHAPE_ONLY)
    for dna_name, preset in DNA_CLASS_NAMES.items():
        if shape == PRIMUS_CONFIGS[preset].replace(**_SHAPE_ONLY):
            return dna_name
    return None


def primus_adaptation_plan(config: PrimusConfig) -> dict[str, Any]:
    """An ``nnssl_adaptation_plan`` for a Primus, as nnssl's Primus trainers write it and nnU-Net reads it.

    Presets are named as nnssl names them (``"PrimusM"``, no keyword arguments); other shapes are
    spelled out with the keyword names nnU-Net's ``PretrainedTrainer_Primusx`` reads
    (``embed_dim``, ``patch_embed_size``, ``encoder_eva_depth``, ``encoder_eva_numheads``,
    ``init_values``, ``scale_attn_inner``). ``pretrain_plan`` records only the patch (``patch_size``,
    what sizes the position embedding; spacing unknown to s3d, ``null``).

    Example:
        >>> arch = primus_adaptation_plan(build_primus("primus_m").config)["architecture_plans"]
        >>> arch["arch_class_name"]
        'PrimusM'
    """
    name = preset_name(config)
    if name is not None:
        arch = {"arch_class_name": name, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    else:
        arch = {
            "arch_class_name": "PrimusX",
            "arch_kwargs": {
                "embed_dim": config.embed_dim,
                "patch_embed_size": list(config.patch_embed_size),
                "encoder_eva_depth": config.eva_depth,
                "encoder_eva_numheads": config.eva_numheads,
                "init_values": config.init_values,
                "scale_attn_inner": config.scale_attn_inner,
            },
            "arch_kwargs_requiring_import": [],
        }
    patch = list(config.input_shape)
    return {
        "architecture_plans": arch,
        "pretrain_plan": {"configurations": {"s3d": {"patch_size": patch, "spacing": None}}},
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": ENCODER,
        "key_to_stem": STEM,
        "keys_to_in_proj": [f"{STEM}.proj"],
        "key_to_lpe": f"{ENCODER}.pos_embed",
        "pretrain_num_input_channels": config.in_channels,
    }


def primus_network_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DNA's Primus ``state_dict()`` for s3d's state: the same keys (CPU, detached copies; tensors on the meta
    device, used for shape-only checks, pass through as they are).

    Example:
        >>> sorted(primus_network_weights(model.state_dict()))[0]
        'down_projection.proj.bias'
    """
    return {k: v.detach() if v.is_meta else v.detach().to("cpu", copy=True) for k, v in state.items()}


def fit_input_shape(
    state: dict[str, torch.Tensor], config: PrimusConfig, input_shape: tuple[int, int, int]
) -> tuple[PrimusConfig, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """Fit a Primus state dict to another training patch: interpolate ``eva.pos_embed`` in place.

    Args:
        state: s3d's keys (modified in place when the grid changes).
        config: the checkpoint's architecture (its ``input_shape`` sizes the position embedding).
        input_shape: the new patch (voxels), divisible by ``config.patch_embed_size``.

    Returns:
        ``(new_config, (old_grid, new_grid))``, or ``(config, None)`` when the grid is unchanged.

    Example:
        >>> cfg, grids = fit_input_shape(state, cfg, (128, 128, 96))
    """
    from s3d.nn.primus.convert import resize_pos_embed

    new = config.replace(input_shape=input_shape)
    if new.grid == config.grid:
        return new, None
    if "eva.pos_embed" in state:
        state["eva.pos_embed"] = resize_pos_embed(state["eva.pos_embed"], config.grid, new.grid)
    return new, (config.grid, new.grid)
