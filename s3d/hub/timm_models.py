"""Optional timm integration: ``timm.create_model("resenc_unet_l.s3d_b", pretrained=True)``.

Uses timm's public registration API only (``register_model`` and ``generate_default_cfgs``); timm is
not patched. Registration is explicit, so ``import s3d`` never imports timm:

    >>> from s3d.hub.timm_models import register_timm_models
    >>> register_timm_models()
    >>> net = timm.create_model("resenc_unet_l.s3d_b", pretrained=True, in_chans=2, num_classes=4)

The weights are loaded by :func:`s3d.load_pretrained` (stem replication, new heads, strict
loading, sha256 pinning), not by timm's classifier-oriented loader. timm's other features
(``features_only``, ``reset_classifier``, pretrained-cfg transforms) do not apply to a 3D U-Net.
"""

from __future__ import annotations

from typing import Any

from s3d.hub.registry import list_models

#: timm architecture name -> s3d preset.
ARCHITECTURES = {"resenc_unet_l": "resenc_l"}
_PREFIX = "resenc_l.openmind_"


def timm_tags() -> dict[str, str]:
    """Map timm pretrained tags (``"s3d_b"``, ``"openmind_vf"``, ...) to registry names."""
    tags: dict[str, str] = {}
    for entry in list_models():
        if entry.architecture != "resenc_l" or not entry.name.startswith("resenc_l."):
            continue
        tags[entry.name[len("resenc_l.") :]] = entry.name
        for alias in entry.aliases:
            if "/" not in alias:
                tags[alias.replace("-", "_").lower()] = entry.name
    return tags


def _tag_of(pretrained_cfg: Any) -> str | None:
    if pretrained_cfg is None:
        return None
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    tag = getattr(pretrained_cfg, "tag", None)
    if tag is None and isinstance(pretrained_cfg, dict):
        tag = pretrained_cfg.get("tag")
    return tag


def resenc_unet_l(
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    in_chans: int = 1,
    num_classes: int | None = None,
    **kwargs: Any,
):
    """ResEnc U-Net L for timm; ``pretrained=True`` loads the tagged weights (default tag ``s3d_b``)."""
    from s3d.hub.pretrained import load_pretrained
    from s3d.nn.resenc_unet import build_resenc_unet

    kwargs.pop("pretrained_cfg_overlay", None)
    cache_dir = kwargs.pop("cache_dir", None)
    if not pretrained:
        return build_resenc_unet("resenc_l", in_channels=in_chans, num_classes=num_classes, **kwargs)
    if kwargs:
        raise TypeError(f"resenc_unet_l(pretrained=True): unsupported arguments {sorted(kwargs)}")
    tag = _tag_of(pretrained_cfg) or "s3d_b"
    tags = timm_tags()
    if tag not in tags:
        raise ValueError(f"unknown pretrained tag {tag!r} for resenc_unet_l; available: {sorted(tags)}")
    return load_pretrained(tags[tag], in_channels=in_chans, num_classes=num_classes, cache_dir=cache_dir)


default_cfgs: dict[str, Any] = {}  # filled by register_timm_models(); timm reads it by this name


def register_timm_models() -> list[str]:
    """Register ``resenc_unet_l`` and its pretrained tags with timm (idempotent); returns the model names.

    Example:
        >>> register_timm_models()[:1]
        ['resenc_unet_l.s3d_b']
    """
    from s3d._timm import quiet_timm_import

    with quiet_timm_import():
        import timm.models
        from timm.models import generate_default_cfgs, register_model

    entries = {e.name: e for e in list_models()}
    tags = timm_tags()
    order = sorted(tags, key=lambda t: (t != "s3d_b", t))  # the first tag is timm's default
    cfgs = {}
    for tag in order:
        entry = entries[tags[tag]]
        cfgs[f"resenc_unet_l.{tag}"] = {
            "hf_hub_id": entry.repo_id,
            "hf_hub_filename": entry.filename,
            "license": entry.license.lower(),
            "input_size": (1, 160, 160, 160),
            "num_classes": 0,
            "first_conv": entry.keys.stem_module.rstrip("."),
            "classifier": entry.keys.head_prefix.rstrip("."),
            "notes": (entry.provenance,),
        }
    if not timm.models.is_model("resenc_unet_l"):
        default_cfgs.update(generate_default_cfgs(cfgs))
        register_model(resenc_unet_l)
    return list(cfgs)
