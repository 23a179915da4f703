"""nnssl / nnU-Net checkpoints: safe reading, DNA alias resolution, config inference, export.

nnssl (the authors' pre-training framework) saves ``checkpoint_final.pth``: a dict with
``network_weights`` (the raw ``state_dict()`` of dynamic-network-architectures'
``ResidualEncoderUNet``), optimiser state and usually an ``nnssl_adaptation_plan``. DNA registers
every conv-norm-act twice (``...conv.weight`` and ``...all_modules.0.weight``, ``...norm.*`` and
``...all_modules.N.*``) and the decoder holds the encoder (``decoder.encoder.*``), so its state dict
has every encoder tensor up to four times. s3d keeps one tensor per weight (the *canonical* keys).

Checkpoints from nnssl's sparse (SparK-style) MAE trainer replace the modules inside ``all_modules``
and leave the ``conv``/``norm`` attributes stale: there the ``all_modules`` copies are the trained
ones. :func:`canonicalize` detects this (a ``spark_weights`` entry, or alias copies that differ) and
prefers the ``all_modules`` copies, reporting what it did.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from s3d._triple import to_3tuple
from s3d.nn.blocks import ACTIVATIONS, NORM_LAYERS, nonlin_kwargs, norm_kwargs
from s3d.nn.config import ResEncUNetConfig, get_config

#: Keys of the nnssl checkpoint dict that may hold the network weights, in order of preference.
WEIGHT_KEYS = ("network_weights", "state_dict", "model")

_ALIAS_RE = re.compile(r"\.all_modules\.(\d+)\.")
_CONV_RE = re.compile(r"^(.*)\.conv\.(weight|bias)$")
_NORM_RE = re.compile(r"^(.*)\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


class CheckpointError(ValueError):
    """A checkpoint file or dict that cannot be read or mapped onto the ResEnc U-Net."""


# ---- reading -------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.pth``/``.pt`` file with ``torch.load(weights_only=True)`` (never full pickle).

    Args:
        path: nnssl ``checkpoint_final.pth``, an nnU-Net checkpoint, or a bare state dict file.

    Returns:
        The loaded dict (tensors on CPU).

    Raises:
        CheckpointError: the file is missing, not a torch file, needs arbitrary pickle (custom
            classes), or does not hold a dict.

    Example:
        >>> ckpt = read_checkpoint("checkpoint_final.pth")
        >>> sorted(ckpt)[:2]
        ['current_epoch', 'grad_scaler_state']
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(9)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (legacy: a pickle)
        hint = "it looks like safetensors: name it .safetensors" if head[8:9] == b"{" else "is it the right file?"
        raise CheckpointError(f"{path}: not a torch checkpoint (no zip or pickle header; {hint})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
        raise CheckpointError(
            f"{path}: refusing to load - the file needs full pickle (arbitrary code execution), which s3d "
            f"never uses for checkpoints. Re-save it in a trusted environment with tensors, dicts, lists and "
            f"numbers only (e.g. torch.save({{'network_weights': net.state_dict()}}, ...)). Detail: {err}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a corrupt file fails anywhere in torch's reader (KeyError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict in the checkpoint, found {type(obj).__name__}")
    return obj


def network_weights(ckpt: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The network state dict inside an nnssl/nnU-Net checkpoint dict, or ``ckpt`` itself if it is one.

    Example:
        >>> sd = network_weights({"network_weights": {"a": torch.zeros(1)}})
    """
    for key in WEIGHT_KEYS:
        if key in ckpt and isinstance(ckpt[key], Mapping):
            state = ckpt[key]
            break
    else:
        state = ckpt
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{source}: no tensors found; expected a state dict or a dict with one of {list(WEIGHT_KEYS)}, "
            f"found keys {sorted(map(str, ckpt))[:10]}"
        )
    other = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if other:
        raise CheckpointError(f"{source}: non-tensor entries in the network weights: {other[:5]}")
    return dict(tensors)


# ---- aliases -------------------------------------------------------------------------------------
def canonical_key(key: str) -> tuple[str, int]:
    """Map a DNA key to s3d's canonical key and a preference rank (lower = preferred when fresh).

    ``all_modules.0`` is the conv, any later ``all_modules.N`` with tensors is the norm (dropout and
    activation hold none); ``decoder.encoder.*`` is ``encoder.*``.

    Example:
        >>> canonical_key("decoder.encoder.stem.convs.0.all_modules.1.weight")
        ('encoder.stem.convs.0.norm.weight', 3)
    """
    rank = 0
    if key.startswith("decoder.encoder."):
        key = key[len("decoder.") :]
        rank += 2
    match = _ALIAS_RE.search(key)
    if match:
        name = "conv" if match.group(1) == "0" else "norm"
        key = key[: match.start()] + f".{name}." + key[match.end() :]
        rank += 1
    return key, rank


@dataclass
class AliasInfo:
    """What :func:`canonicalize` found about alias copies.

    Attributes:
        had_aliases: the source held DNA alias keys (``all_modules`` or ``decoder.encoder``).
        preferred: ``"all_modules"`` when those copies were taken over ``conv``/``norm``,
            else ``"canonical"``.
        stale_keys: canonical keys whose alias copies held different values.
        reason: why ``all_modules`` copies were preferred (empty when they were not).
    """

    had_aliases: bool = False
    preferred: str = "canonical"
    stale_keys: list[str] = field(default_factory=list)
    reason: str = ""


def canonicalize(
    state: Mapping[str, torch.Tensor], sparse_trainer: bool = False
) -> tuple[dict[str, torch.Tensor], AliasInfo]:
    """Collapse DNA alias keys onto canonical keys, preferring the trained copy.

    Args:
        state: a DNA state dict (any mix of canonical and alias keys) or an s3d one.
        sparse_trainer: the checkpoint came from nnssl's sparse trainer (it has ``spark_weights``):
            prefer ``all_modules`` copies even when copies agree.

    Returns:
        ``(canonical_state, info)``. When alias copies differ (stale copies), the ``all_modules``
        copy wins and the keys are listed in ``info.stale_keys``.

    Example:
        >>> sd, info = canonicalize(dna_model.state_dict())
        >>> info.had_aliases, len(sd)
        (True, 264)
    """
    groups: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
    had_aliases = False
    for key, value in state.items():
        canon, rank = canonical_key(key)
        had_aliases |= rank > 0
        groups.setdefault(canon, []).append((key, rank, value))
    stale = []
    for canon, copies in groups.items():
        first = copies[0][2]
        if any(c[2].shape != first.shape or not torch.equal(c[2], first) for c in copies[1:]):
            stale.append(canon)
    info = AliasInfo(had_aliases=had_aliases, stale_keys=sorted(stale))
    prefer_all_modules = sparse_trainer or bool(stale)
    if prefer_all_modules:
        info.preferred = "all_modules"
        info.reason = (
            "checkpoint holds 'spark_weights' (nnssl sparse trainer)"
            if sparse_trainer
            else f"{len(stale)} tensor(s) differ between alias copies"
        )

    def order(item: tuple[str, int, torch.Tensor]) -> tuple[int, int]:
        key, rank, _ = item
        is_all_modules = ".all_modules." in key
        in_decoder_copy = key.startswith("decoder.encoder.")
        if prefer_all_modules:
            return (0 if is_all_modules else 1, int(in_decoder_copy))
        return (rank, 0)

    out = {canon: min(copies, key=order)[2] for canon, copies in groups.items()}
    return out, info


def to_dna_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add DNA's alias keys to a canonical state dict, as DNA's ``state_dict()`` lists them.

    Every conv-norm-act gets ``all_modules.0`` (conv) and ``all_modules.1`` (norm) copies and every
    encoder tensor a ``decoder.encoder.*`` copy. The copies are separate tensors (clones) so the
    result can be written with safetensors too.

    Example:
        >>> dna_sd = to_dna_state_dict(model.state_dict())
        >>> len(dna_sd)  # resenc_l
        956
    """
    flat: dict[str, torch.Tensor] = {}
    pending_module: str | None = None
    pending: list[tuple[str, torch.Tensor]] = []
    for key, value in state.items():
        if ".all_modules." in key or key.startswith("decoder.encoder."):
            raise CheckpointError(f"to_dna_state_dict: expected canonical keys, got alias key {key!r}")
        conv, norm = _CONV_RE.match(key), _NORM_RE.match(key)
        module = (conv or norm).group(1) if (conv or norm) else None
        if module != pending_module:  # DNA lists a module's aliases right after its conv and norm
            flat.update(pending)
            pending, pending_module = [], module
        flat[key] = value
        if conv:
            pending.append((f"{module}.all_modules.0.{conv.group(2)}", value.clone()))
        elif norm:
            pending.append((f"{module}.all_modules.1.{norm.group(2)}", value.clone()))
    flat.update(pending)
    encoder = {k: v for k, v in flat.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in flat.items() if not k.startswith("encoder.")}
    out = dict(encoder)
    out.update({f"decoder.{k}": v.clone() for k, v in encoder.items()})
    # DNA registers the decoder's stages before transpconvs and seg_layers.
    for group in ("decoder.stages.", "decoder.transpconvs.", "decoder.seg_layers."):
        out.update({k: v for k, v in decoder.items() if k.startswith(group)})
    out.update({k: v for k, v in decoder.items() if k not in out})
    return out


# ---- architecture inference -------------------------------------------------------------------
def infer_config(state: Mapping[str, torch.Tensor], **defaults: Any) -> ResEncUNetConfig:
    """Infer the ResEnc U-Net config from the shapes in a canonical state dict.

    Channels, blocks per stage, kernel sizes, decoder convs, in/out channels, conv bias, norm type
    and affine-ness come from the tensors; strides of stages 1.. come from the transposed-conv
    kernels (kernel = stride). Not stored in a state dict and taken from ``defaults`` (else the
    nnU-Net values): the first stage's stride (1), norm eps (1e-5), activation (LeakyReLU 0.01).

    Example:
        >>> cfg = infer_config(canonicalize(ckpt["network_weights"])[0])
        >>> cfg.features_per_stage
        (32, 64, 128, 256, 320, 320)
    """

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"cannot infer the architecture: key {key!r} not in the state dict")
        return state[key]

    stem = get("encoder.stem.convs.0.conv.weight")
    n_stages = 0
    while f"encoder.stages.{n_stages}.blocks.0.conv1.conv.weight" in state:
        n_stages += 1
    if n_stages < 2:
        raise CheckpointError(f"cannot infer the architecture: found {n_stages} encoder stage(s), need >= 2")
    feats, blocks, kernels = [], [], []
    for s in range(n_stages):
        w = get(f"encoder.stages.{s}.blocks.0.conv1.conv.weight")
        feats.append(int(w.shape[0]))
        kernels.append(tuple(int(k) for k in w.shape[2:]))
        n = 0
        while f"encoder.stages.{s}.blocks.{n}.conv1.conv.weight" in state:
            n += 1
        blocks.append(n)
    strides: list[Any] = [defaults.pop("first_stride", 1)]
    for s in range(1, n_stages):
        t = get(f"decoder.transpconvs.{n_stages - 1 - s}.weight")
        strides.append(tuple(int(k) for k in t.shape[2:]))
    dec_convs = []
    for i in range(n_stages - 1):
        n = 0
        while f"decoder.stages.{i}.convs.{n}.conv.weight" in state:
            n += 1
        dec_convs.append(n)
    seg = get(f"decoder.seg_layers.{n_stages - 2}.weight")
    cfg = dict(
        features_per_stage=tuple(feats),
        strides=tuple(strides),
        n_blocks_per_stage=tuple(blocks),
        kernel_sizes=tuple(kernels),
        n_conv_per_stage_decoder=tuple(dec_convs),
        in_channels=int(stem.shape[1]),
        num_classes=int(seg.shape[0]),
        stem_channels=None if int(stem.shape[0]) == feats[0] else int(stem.shape[0]),
        conv_bias="encoder.stem.convs.0.conv.bias" in state,
        norm="batch" if "encoder.stem.convs.0.norm.running_mean" in state else "instance",
        norm_affine="encoder.stem.convs.0.norm.weight" in state,
        name="inferred",
    )
    cfg.update(defaults)
    return ResEncUNetConfig(**cfg)


# ---- export --------------------------------------------------------------------------------------
def adaptation_plan(
    config: ResEncUNetConfig, patch_size: int | Sequence[int] = (160, 160, 160)
) -> dict[str, Any]:
    """An ``nnssl_adaptation_plan`` describing ``config`` for nnssl's nnU-Net fine-tuning fork.

    Field names follow nnssl's ``AdaptationPlan`` (architecture plans with DNA's class name and
    keyword arguments, the stem and encoder keys, pre-training input channels). The ResEnc-L preset
    is named ``"ResEncL"`` without keyword arguments, as in the published OpenMind plans.

    Args:
        config: the network's architecture.
        patch_size: recommended downstream patch size (voxels), an int (cube) or 3 ints.

    Example:
        >>> plan = adaptation_plan(model.config)
        >>> plan["key_to_stem"]
        'encoder.stem'
    """
    arch_kwargs = {
        "n_stages": config.n_stages,
        "features_per_stage": list(config.features_per_stage),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in config.kernel_sizes],
        "strides": [list(s) for s in config.strides],
        "n_blocks_per_stage": list(config.n_blocks_per_stage),
        "n_conv_per_stage_decoder": list(config.n_conv_per_stage_decoder),
        "conv_bias": config.conv_bias,
        "norm_op": NORM_LAYERS[config.norm].import_path,
        "norm_op_kwargs": norm_kwargs(config),
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": ACTIVATIONS[config.nonlin].import_path,
        "nonlin_kwargs": nonlin_kwargs(config),
    }
    shape_only = {"in_channels": 1, "num_classes": 1, "deep_supervision": False, "name": ""}
    is_preset = config.replace(**shape_only) == get_config("resenc_l").replace(**shape_only)
    # The published OpenMind plans name the preset "ResEncL" without kwargs; anything else is spelled out.
    architecture = (
        {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None}
        if is_preset
        else {
            "arch_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": arch_kwargs,
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
    )
    return {
        "architecture_plans": architecture,
        "pretrain_plan": None,
        "recommended_downstream_patchsize": list(to_3tuple(patch_size, "patch_size")),
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
        "pretrain_num_input_channels": config.in_channels,
    }


def nnssl_checkpoint(
    state: Mapping[str, torch.Tensor], config: ResEncUNetConfig, trainer_name: str = "s3d"
) -> dict[str, Any]:
    """An nnssl-style checkpoint dict (loadable with ``torch.load(weights_only=True)``).

    Example:
        >>> torch.save(nnssl_checkpoint(model.state_dict(), model.config), "checkpoint_final.pth")
    """
    return {
        "network_weights": to_dna_state_dict({k: v.detach().cpu() for k, v in state.items()}),
        "nnssl_adaptation_plan": adaptation_plan(config),
        "trainer_name": trainer_name,
        "current_epoch": 0,
        "init_args": {},
    }


def nnunet_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What nnU-Net's ``-pretrained_weights`` reads: a dict with ``network_weights`` (DNA keys).

    nnU-Net's ``load_pretrained_weights`` drops the segmentation heads and checks every other key
    against its own network, so all alias keys are included.

    Example:
        >>> torch.save(nnunet_checkpoint(model.state_dict()), "pretrained.pth")
    """
    return {"network_weights": to_dna_state_dict({k: v.detach().cpu() for k, v in state.items()})}
