"""Save, load and publish weights of either family: ``save_pretrained``, ``load_pretrained``, ``push_to_hub``.

Our format (:mod:`s3d.hub.s3d_format`) is a directory with ``model.safetensors`` (one tensor per
weight, canonical keys), ``config.json`` (the family, the architecture config, the s3d version, the
optional recipe) and a model card ``README.md``. ``load_pretrained`` also reads nnssl/nnU-Net ``.pth``
checkpoints of a ResEnc U-Net or a Primus, local or on the Hub (:mod:`s3d.hub.sources` finds them).
"""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from s3d._fs import atomic_path, write_json_atomic, write_text_atomic
from s3d._version import __version__
from s3d.hub.adapt import LoadReport, StemMode, adapt_state_dict
from s3d.hub.download import HubFileError, commit_from_cache_path, hub_download, sha256_file
from s3d.hub.nnssl import CheckpointError, canonicalize, infer_config, network_weights, read_checkpoint
from s3d.hub.primus import fit_input_shape, is_primus, plan_from_nnunet_checkpoint, read_primus
from s3d.hub.s3d_format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    check_weights_fit_config,
    config_json,
    model_card,
    nonfinite_tensors,
    read_safetensors,
)
from s3d.hub.sources import NNSSL_NAME, Source, resolve
from s3d.nn.family import Model, ModelConfig, build_from_config, config_of
from s3d.nn.primus import PrimusConfig

# The file names, FORMAT_VERSION and model_card stay importable from here, where they were defined before.
__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "NNSSL_NAME",
    "WEIGHTS_NAME",
    "load_pretrained",
    "load_state",
    "model_card",
    "push_to_hub",
    "save_pretrained",
    "verify_file",
]


# ---- saving ----------------------------------------------------------------------------------
def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-shared copies of the state dict (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def save_pretrained(
    model: Model,
    save_directory: str | os.PathLike[str],
    *,
    recipe: dict[str, Any] | None = None,
    license: str | None = None,
    provenance: str | None = None,
    model_card_text: str | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a model card ``README.md`` (each atomically).

    ``config.json`` holds everything :func:`load_pretrained` needs to rebuild the network
    (``architecture`` = ``model.config.to_dict()``), the s3d version and the optional recipe.

    Args:
        model: a :class:`~s3d.nn.ResEncUNet` or :class:`~s3d.nn.Primus`.
        save_directory: created if missing; existing files of the same names are replaced.
        recipe: JSON-able description of how the weights were trained (stored in config.json).
        license: licence id for the model card metadata (e.g. ``"cc-by-4.0"``).
        provenance: one paragraph for the model card (data, recipe, steps).
        model_card_text: a complete README.md to write instead of the generated one.

    Returns:
        The directory.

    Example:
        >>> save_pretrained(s3d.build_resenc_unet("tiny"), "out/tiny")
        PosixPath('out/tiny')
    """
    from safetensors.torch import save_file

    cfg = config_of(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = _plain_state(model)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "library": "s3d", "s3d_version": __version__})
    write_json_atomic(out / CONFIG_NAME, config_json(cfg, recipe))
    n_params = sum(p.numel() for p in model.parameters())
    card = model_card_text or model_card(
        cfg, recipe, license=license, provenance=provenance, n_params=n_params
    )
    write_text_atomic(out / CARD_NAME, card)
    return out


def push_to_hub(
    model: Model,
    repo_id: str,
    *,
    recipe: dict[str, Any] | None = None,
    license: str | None = None,
    provenance: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload weights with s3d",
    endpoint: str | None = None,
) -> str:
    """Save the model with :func:`save_pretrained` to a temporary folder and upload it to a Hub repo.

    The repository is created if needed (``private`` applies then). Uses huggingface_hub's
    ``HfApi.create_repo`` and ``HfApi.upload_folder``; authentication as in huggingface_hub
    (``token`` or ``hf auth login``).

    Returns:
        The URL of the commit.

    Example:
        >>> push_to_hub(model, "my-org/resenc-l-brats", license="cc-by-4.0")
    """
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="s3d-push-") as tmp:
        save_pretrained(model, tmp, recipe=recipe, license=license, provenance=provenance)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
        )
    return str(getattr(info, "commit_url", info))


# ---- loading -----------------------------------------------------------------------------------
def _adaptation_plan(src: Source, ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The nnssl adaptation plan: in the checkpoint, else ``adaptation_plan.json`` next to it or in its Hub repo."""
    plan = ckpt.get("nnssl_adaptation_plan")
    if isinstance(plan, dict):
        return plan
    path: Path | None = src.weights.parent / "adaptation_plan.json"
    if not path.is_file() and src.repo_id is not None:
        try:
            path = hub_download(src.repo_id, "adaptation_plan.json", revision=src.revision, cache_dir=src.cache_dir)
        except HubFileError:
            path = None
    if path is None or not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the adaptation plan ({err})") from None
    return plan if isinstance(plan, dict) else None


def _read_primus(src: Source, raw: dict[str, torch.Tensor], plan: dict[str, Any] | None,
                 report: LoadReport) -> tuple[dict[str, torch.Tensor], PrimusConfig, LoadReport]:
    fallback = src.entry.config if src.entry is not None else None
    try:
        read = read_primus(raw, plan, fallback if isinstance(fallback, PrimusConfig) else None)
    except ValueError as err:
        raise CheckpointError(f"{src.weights}: {err}") from None
    report.dropped_keys = read.dropped
    report.recommended_input_shape = read.recommended_input_shape
    report.notes.extend(read.notes)
    return read.state, read.config, report


def _read_state(src: Source) -> tuple[dict[str, torch.Tensor], ModelConfig, LoadReport]:
    report = LoadReport(
        source=str(src.weights), format=src.format, repo_id=src.repo_id, revision=src.revision, sha256=src.sha256
    )
    if src.repo_id is not None:
        report.commit = commit_from_cache_path(src.weights)
        if src.entry is not None and not src.entry.pinned:
            report.notes.append(f"registry entry {src.entry.name!r} is not pinned (branch {src.entry.revision!r})")
    if src.format == "s3d":
        state = read_safetensors(src.weights)
        if any(".all_modules." in k or k.startswith("decoder.encoder.") for k in state):
            state, info = canonicalize(state)
            report.alias_preferred, report.stale_alias_keys = info.preferred, info.stale_keys
        if src.config is not None:
            check_weights_fit_config(state, src.config, src.config_file or CONFIG_NAME, src.weights)
            _check_finite(state, src.weights)
            return state, src.config, report
        report.notes.append(f"no {CONFIG_NAME} next to the weights: architecture inferred from tensor shapes")
        if is_primus(state):
            return _read_primus(src, state, None, report)
    else:
        ckpt = read_checkpoint(src.weights)
        raw = network_weights(ckpt, str(src.weights))
        plan = _adaptation_plan(src, ckpt) or plan_from_nnunet_checkpoint(ckpt)
        if is_primus(raw, plan):
            return _read_primus(src, raw, plan, report)
        state, info = canonicalize(raw, sparse_trainer="spark_weights" in ckpt)
        report.alias_preferred, report.stale_alias_keys = info.preferred, info.stale_keys
        if info.reason:
            report.notes.append(f"used DNA all_modules copies: {info.reason}")
    _check_finite(state, src.weights)
    try:
        cfg = infer_config(state)
    except CheckpointError as err:
        if src.entry is None:
            raise CheckpointError(
                f"{src.weights}: {err}; expected a ResEnc U-Net or Primus state dict with s3d/DNA key names"
                + ("" if src.format == "nnssl" else f" (or a {CONFIG_NAME} next to the weights)")
            ) from None
        cfg = src.entry.config
        report.notes.append(f"architecture from the registry entry ({err})")
    return state, cfg, report


def _check_finite(state: dict[str, torch.Tensor], weights: Any) -> None:
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{weights}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]!r}); these weights "
                              "come from a run that diverged and cannot be used")


def load_state(
    source: str | os.PathLike[str], *, revision: str | None = None, cache_dir: str | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig, LoadReport]:
    """Read a checkpoint into a canonical state dict and its architecture config (no model built).

    Primus checkpoints come back with s3d's keys, the pre-training-only tensors set aside
    (``report.dropped_keys``) and ``config.input_shape`` = the pre-training patch.

    Returns:
        ``(state, config, report)`` where ``report`` already names the source and alias handling.

    Example:
        >>> state, cfg, report = load_state("checkpoint_final.pth")
    """
    return _read_state(resolve(source, revision, cache_dir))


#: set by :func:`load_pretrained_for_finetuning`: ``input_shape`` is then ignored for a ResEnc U-Net
_FOR_FINETUNING: ContextVar[bool] = ContextVar("s3d_load_for_finetuning", default=False)


def load_pretrained(
    name_or_repo_or_path: str | os.PathLike[str],
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    revision: str | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    stem: StemMode = "replicate",
    decoder: bool = True,
    input_shape: int | tuple[int, int, int] | str | None = None,
    output_loading_info: bool = False,
) -> Model | tuple[Model, LoadReport]:
    """Build a ResEnc U-Net or a Primus from pretrained weights, adapted to the channels and classes asked for.

    The family comes from the checkpoint (``config.json``'s ``model_type``, an nnssl plan's
    architecture, or the tensor names). The stem, encoder and head keys that are adapted come from the
    registry entry (:attr:`~s3d.hub.ModelEntry.keys`); directories, files and unregistered Hub repos
    use their family's (:data:`~s3d.hub.adapt.RESENC_UNET_KEYS`, :data:`~s3d.hub.adapt.PRIMUS_KEYS`).

    Primus pre-training checkpoints (nnssl) hold tensors a segmentation network has no place for
    (MAE's decoder EVA and learnt mask token, contrastive projection heads): they are dropped and
    listed in ``report.dropped_keys``. Primus's position embedding is interpolated to ``input_shape``.

    Args:
        name_or_repo_or_path: a registry name or alias (``"s3d-b"``, see :func:`s3d.list_models`),
            a Hub repo ``"org/name"`` or ``"hf://org/name@revision"``, a local directory saved with
            :func:`save_pretrained`, a ``.safetensors`` file, or an nnssl/nnU-Net ``.pth`` checkpoint.
        in_channels: input channels (image modalities) of the returned model; ``None`` (default)
            keeps the checkpoint's. When it differs from the checkpoint, the stem is adapted
            (``stem``) and the report says so.
        num_classes: output classes; ``None`` keeps the checkpoint's. When it differs, every
            segmentation head (ResEnc: ``decoder.seg_layers.*``; Primus: the whole patch decoder
            ``up_projection``, whose widths follow from the classes) is freshly initialised.
        revision: Hub branch, tag or commit (overrides the registry's pin).
        strict: missing, unexpected or reshaped tensors (other than the adapted ones) are an error
            naming the keys; ``False`` keeps fresh weights for them and lists them in the report.
        device: where the returned model lives.
        cache_dir: Hub cache directory (default: huggingface_hub's).
        stem: ``"replicate"``: the stem conv weight summed over the checkpoint's channels and
            divided by ``in_channels`` for each channel (a replicated input gives the original
            first-layer output); ``"random"``: a fresh He-initialised stem conv.
        decoder: ``False`` loads the encoder only and leaves the whole decoder freshly initialised.
        input_shape: Primus only: the training patch of the returned model (voxels, an int or
            (D, H, W), divisible by its token size). ``None``: the checkpoint's recommended fine-tuning
            patch (nnssl plans: ``recommended_downstream_patchsize``, what nnU-Net fine-tunes with), else
            its own; ``"checkpoint"``: its own pre-training patch. When the token grid differs from the
            checkpoint's, the absolute position embedding is interpolated trilinearly (as nnU-Net's
            pretrained Primus trainer does) and ``report.pos_embed_grid`` says so.
        output_loading_info: also return the :class:`~s3d.hub.LoadReport`.

    Returns:
        The model in eval mode, or ``(model, report)`` with ``output_loading_info=True``.

    Raises:
        s3d.hub.StrictLoadError: strict load with missing/unexpected/reshaped tensors.
        s3d.hub.CheckpointError: unreadable or truncated file, pickle-only checkpoint, unknown
            layout, or a ``config.json`` with bad JSON, an unknown key or a wrong type (the message
            names the file and the key).
        FileNotFoundError: a local path that does not exist, or a directory without weights.
        s3d.hub.ChecksumError: a pinned download has the wrong sha256 (the file is removed).
        s3d.hub.HubFileError: the repo or file does not exist or cannot be fetched.

    Example:
        >>> model, report = load_pretrained("s3d-b", in_channels=2, num_classes=4, output_loading_info=True)
        >>> report.stem, report.new_head
        ('replicated', True)
    """
    src = resolve(name_or_repo_or_path, revision, None if cache_dir is None else str(cache_dir))
    state, cfg, report = _read_state(src)
    keys = src.keys_for(cfg)
    if decoder and all(k.startswith(keys.encoder_prefix) for k in state):
        decoder = False
        report.notes.append("checkpoint holds no decoder weights (encoder only): decoder freshly initialised")
    if isinstance(cfg, PrimusConfig):
        target = input_shape if input_shape is not None else report.recommended_input_shape
        if target is not None and target != "checkpoint":
            try:
                cfg, report.pos_embed_grid = fit_input_shape(state, cfg, cfg.replace(input_shape=target).input_shape)
            except ValueError as err:
                raise ValueError(f"input_shape: {err}") from None
    elif input_shape not in (None, "checkpoint") and not _FOR_FINETUNING.get():
        raise ValueError(f"input_shape applies to Primus only; {src.weights} holds a ResEnc U-Net, which takes any "
                         "size divisible by its total stride")
    overrides: dict[str, Any] = {}
    if in_channels is not None:
        overrides["in_channels"] = int(in_channels)
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    model = build_from_config(cfg, **overrides)
    full, report = adapt_state_dict(
        state, model.state_dict(), stem=stem, decoder=decoder, strict=strict, report=report, keys=keys
    )
    if report.pos_embed_grid is not None and "eva.pos_embed" in state and "eva.pos_embed" not in report.adapted_keys:
        report.adapted_keys.append("eva.pos_embed")
    model.load_state_dict(full, strict=True)
    model.to(device).eval()
    return (model, report) if output_loading_info else model


def load_pretrained_for_finetuning(
    name_or_repo_or_path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int] | None = None,
    **kwargs: Any,
) -> tuple[Model, LoadReport]:
    """:func:`load_pretrained` for fine-tuning either family: ``input_shape`` (the training patch, voxels) sets a
    Primus's patch and is ignored for a ResEnc U-Net (which takes any multiple of its stride).

    Returns:
        ``(model, report)``.

    Example:
        >>> model, report = load_pretrained_for_finetuning("primus-m-mae", num_classes=3, input_shape=(96,) * 3)
    """
    token = _FOR_FINETUNING.set(True)
    try:
        out = load_pretrained(name_or_repo_or_path, input_shape=input_shape, output_loading_info=True, **kwargs)
    finally:
        _FOR_FINETUNING.reset(token)
    assert isinstance(out, tuple)
    return out



def verify_file(path: str | os.PathLike[str], sha256: str) -> bool:
    """True if ``path`` has the given sha256 (hex)."""
    return sha256_file(path) == sha256.lower()
