"""The s3d format on disk: ``model.safetensors`` + ``config.json`` + a model card ``README.md``.

:func:`config_json` is what :func:`~s3d.hub.save_pretrained` writes into ``config.json`` and
:func:`read_config` reads it back strictly: bad JSON, an unknown key or a value of the wrong type is
a :class:`~s3d.hub.CheckpointError` that names the file and the key. :func:`read_safetensors` reads
the weights with errors that name the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from s3d._version import __version__
from s3d.hub.nnssl import CheckpointError
from s3d.nn.config import ResEncUNetConfig
from s3d.nn.family import MODEL_TYPES, ModelConfig, model_type
from s3d.nn.primus import PrimusConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

#: The keys of config.json: key -> (accepted JSON types, what the value must be).
CONFIG_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "library": ((str,), 'the string "s3d"'),
    "format": ((str,), "a string"),
    "format_version": ((int,), "an int"),
    "model_type": ((str,), f"one of {sorted(MODEL_TYPES)}"),
    "s3d_version": ((str,), "a string"),
    "architecture": ((dict,), "an object of ResEncUNetConfig or PrimusConfig fields"),
    "recipe": ((dict, type(None)), "an object or null"),
}
_FIX = f"Fix the file, or write it again with s3d.save_pretrained (format {FORMAT_VERSION})."


def config_json(config: ModelConfig, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a saved model: its family (``model_type``), the architecture, the s3d version
    and the optional recipe.

    Example:
        >>> config_json(model.config)["architecture"]["features_per_stage"][:2]
        [32, 64]
    """
    return {
        "library": "s3d",
        "format": "s3d",
        "format_version": FORMAT_VERSION,
        "model_type": model_type(config),
        "s3d_version": __version__,
        "architecture": config.to_dict(),
        "recipe": recipe,
    }


def is_s3d_config(obj: Any) -> bool:
    """True for a JSON object written by s3d (``"library": "s3d"``), as opposed to e.g. nnssl's."""
    return isinstance(obj, dict) and obj.get("library") == "s3d"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_problem(value: Any, annotation: str) -> str:
    """What a config field annotated ``annotation`` needs, or "" when ``value`` fits."""
    if annotation.endswith("| None"):
        if value is None:
            return ""
        annotation = annotation.removesuffix("| None").strip()
    if annotation.startswith("tuple["):
        nested = "Any" in annotation  # strides, kernel_sizes: an int or [d, h, w] per stage
        ok = isinstance(value, list) and all(
            _is_int(v) or (nested and isinstance(v, list) and all(map(_is_int, v))) for v in value
        )
        return "" if ok else ("a list of ints or [d, h, w] lists" if nested else "a list of ints")
    checks = {
        "int": (_is_int, "an int"),
        "float": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "str": (lambda v: isinstance(v, str), "a string"),
    }
    check, what = checks.get(annotation, (lambda v: True, ""))
    return "" if check(value) else what


def parse_config(obj: Any, path: str | os.PathLike[str]) -> ModelConfig:
    """Check a loaded ``config.json`` key by key and build its architecture; errors name ``path`` and the key.

    ``model_type`` picks the family (``"ResEncUNet"``, the default for files without it, or ``"Primus"``).

    Raises:
        CheckpointError: not an s3d config, an unknown key, a missing ``architecture``, a value of
            the wrong type, or an architecture the config rejects.

    Example:
        >>> cfg = parse_config(json.loads(Path("m/config.json").read_text()), "m/config.json")
    """
    if not is_s3d_config(obj):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f'{path}: not an s3d config (expected a JSON object with "library": "s3d" and an "architecture"; '
            f"found {found}). Remove it to infer the architecture from the weights, or save the model again "
            "with s3d.save_pretrained."
        )
    for key, value in obj.items():
        if key not in CONFIG_KEYS:
            raise CheckpointError(
                f"{path}: unknown key {key!r} (known: {sorted(CONFIG_KEYS)}). Remove it, or upgrade s3d if a "
                "newer version wrote this file."
            )
        types, what = CONFIG_KEYS[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise CheckpointError(f"{path}: key {key!r} must be {what}, got {value!r}. {_FIX}")
    if obj.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: key 'format_version' is {obj['format_version']}, newer than this s3d reads "
            f"({FORMAT_VERSION}); upgrade s3d."
        )
    kind = obj.get("model_type", "ResEncUNet")
    cls = MODEL_TYPES.get(kind)
    if cls is None:
        raise CheckpointError(f"{path}: key 'model_type' is {kind!r}; this s3d knows {sorted(MODEL_TYPES)}. "
                              "Upgrade s3d if a newer version wrote this file.")
    if "architecture" not in obj:
        raise CheckpointError(f"{path}: missing key 'architecture' (the network's {cls.__name__}). {_FIX}")
    arch = obj["architecture"]
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, value in arch.items():
        if name not in fields:
            raise CheckpointError(
                f"{path}: unknown key 'architecture.{name}' ({cls.__name__} fields: {sorted(fields)}). {_FIX}"
            )
        what = _field_problem(value, fields[name])
        if what:
            raise CheckpointError(f"{path}: key 'architecture.{name}' must be {what}, got {value!r}. {_FIX}")
    try:
        return cls.from_dict(arch)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: key 'architecture' is not a valid {cls.__name__} ({err}). {_FIX}") from None


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read an s3d ``config.json`` strictly (see :func:`parse_config`).

    Example:
        >>> read_config("out/tiny/config.json").name
        'tiny'
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON config ({err}). {_FIX}") from None
    return parse_config(obj, path)


def check_weights_fit_config(state: dict[str, torch.Tensor], config: ModelConfig,
                             config_path: str | os.PathLike[str], weights_path: str | os.PathLike[str]) -> None:
    """Refuse weights that are not the network ``config.json`` describes (a folder checked as a whole).

    The weights must hold exactly the tensors of the network ``config.json`` describes (its encoder
    alone is accepted: a backbone), each of the same shape: a config that says 4 classes next to a
    3-class head, 2 input channels next to a 1-channel stem, or another depth, is an error (loading
    would otherwise build a fresh head or stem and predict with random weights).

    Raises:
        CheckpointError: naming both files, the key and the two shapes (for the stem and the head: the
            channels or classes each file says).

    Example:
        >>> check_weights_fit_config(read_safetensors("m/model.safetensors"), read_config("m/config.json"),
        ...                          "m/config.json", "m/model.safetensors")
    """
    from s3d.nn.family import build_from_config

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_from_config(config).state_dict().items()}
    extra = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    encoder_only = all(k.startswith("encoder.") for k in state)  # a backbone saved without its decoder
    if extra or (missing and not encoder_only):
        what = (f"{len(extra)} tensor(s) of the weights are not in the network it describes (first: {extra[0]!r})"
                if extra else f"{len(missing)} tensor(s) of that network are missing from the weights (first: "
                f"{missing[0]!r})")
        raise CheckpointError(f"{config_path} does not describe {weights_path}: {what}. The two files do not belong "
                              "together; copy both from the same model, or save it again with s3d.save_pretrained")
    bad = [(k, expected[k], tuple(v.shape)) for k, v in state.items()
           if k in expected and tuple(v.shape) != expected[k]]
    if not bad:
        return
    bad.sort(key=lambda b: not b[0].endswith(".weight"))  # a conv weight says more than its bias
    key, want, got = bad[0]
    what = f"tensor {key!r} is {got} in the weights but {want} in the network config.json describes"
    resenc = isinstance(config, ResEncUNetConfig)  # the head and stem keys below are the ResEnc U-Net's
    if resenc and key.startswith("decoder.seg_layers.") and len(got) >= 1 and got[0] != want[0]:
        what = f"config.json says num_classes {config.num_classes}, but the weights' head {key!r} has {got[0]} outputs"
    elif resenc and key == "encoder.stem.convs.0.conv.weight" and len(got) >= 2 and got[1] != want[1]:
        what = f"config.json says in_channels {config.in_channels}, but the weights' stem {key!r} takes {got[1]}"
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    raise CheckpointError(f"{config_path} does not describe {weights_path}: {what}{more}. The two files do not "
                          "belong together; copy both from the same model, or save it again with s3d.save_pretrained")


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors of ``state`` holding NaN or inf.

    Example:
        >>> nonfinite_tensors({"w": torch.tensor([1.0, float("nan")])})
        ['w']
    """
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a truncated or foreign file is a ``CheckpointError`` naming it.

    Example:
        >>> state = read_safetensors("out/tiny/model.safetensors")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated (download or copy it again)"
        ) from None


def _architecture_rows(config: ModelConfig) -> list[str]:
    if isinstance(config, PrimusConfig):
        return [
            f"| token width, depth, heads | {config.embed_dim}, {config.eva_depth}, {config.eva_numheads} |",
            f"| token size (voxels) | {list(config.patch_embed_size)} |",
            f"| training patch (voxels) | {list(config.input_shape)} |",
        ]
    return [
        f"| features per stage | {list(config.features_per_stage)} |",
        f"| blocks per stage | {list(config.n_blocks_per_stage)} |",
        f"| strides | {[list(s) for s in config.strides]} |",
    ]


def model_card(
    config: ModelConfig,
    recipe: dict[str, Any] | None = None,
    *,
    license: str | None = None,
    provenance: str | None = None,
    n_params: int | None = None,
) -> str:
    """A model card (Markdown with YAML metadata) for a saved ResEnc U-Net or Primus.

    Example:
        >>> print(model_card(model.config)[:3])
        ---
    """
    primus = isinstance(config, PrimusConfig)
    meta = ["---", "library_name: s3d", "tags:", "- medical", "- 3d", "- image-segmentation",
            "- primus" if primus else "- resenc-unet"]
    if license:
        meta.append(f"license: {license.lower()}")
    meta.append("---")
    lines = [
        *meta,
        "",
        f"# {'Primus' if primus else 'ResEnc U-Net'} ({config.name})",
        "",
        provenance or "Weights saved with s3d; add where they come from (data, recipe, steps) here.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        *_architecture_rows(config),
        f"| input channels | {config.in_channels} |",
        f"| classes | {config.num_classes} |",
    ]
    if n_params is not None:
        lines.append(f"| parameters | {n_params:,} |")
    if recipe:
        lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, default=str), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import s3d",
        f'model = s3d.load_pretrained("<this repo or directory>")  # {config.in_channels} input channel(s), '
        f"{config.num_classes} classes",
        'model = s3d.load_pretrained("<this repo or directory>", in_channels=2, num_classes=4)  # adapted',
        "```",
        "",
        f"Saved with s3d {__version__} (format {FORMAT_VERSION}).",
        "",
    ]
    return "\n".join(lines)
