"""Foreign Primus checkpoints onto s3d's keys: prefixes, dropped pre-training heads, position embeddings.

nnssl saves Primus pre-training networks whose segmentation-relevant parts sit under the prefixes its
adaptation plan names (``key_to_stem``, ``key_to_encoder``): ``down_projection``/``eva`` for MAE,
SimMIM, Models Genesis and VolumeFusion, ``encoder.down_projection``/``encoder.eva`` for the
contrastive wrappers (SimCLR, VoCo, SwinUNETR). Around them are tensors a segmentation network does
not have: MAE's decoder EVA (``decoder.*``), its learnt ``mask_token``, projection heads.
:func:`map_foreign_keys` renames the first and sets the others aside; :func:`infer_primus_config` reads
the architecture off the tensor shapes; :func:`resize_pos_embed` fits the absolute position embedding
to another patch, as nnU-Net's pretrained Primus trainer does (trilinear, ``align_corners=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from s3d.nn.primus.config import DNA_CLASS_NAMES, MLP_RATIO, PRIMUS_CONFIGS, PrimusConfig

STEM, ENCODER, DECODER = "down_projection", "eva", "up_projection"


def map_foreign_keys(
    state: Mapping[str, torch.Tensor], key_to_stem: str = STEM, key_to_encoder: str = ENCODER
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Primus pre-training state dict to s3d's keys; return what a segmentation Primus has no place for.

    Args:
        state: the checkpoint's network weights.
        key_to_stem: prefix of the patch embedding in ``state`` (nnssl plan ``key_to_stem``).
        key_to_encoder: prefix of the EVA transformer (nnssl plan ``key_to_encoder``).

    Returns:
        ``(mapped, dropped)``: ``mapped`` holds ``down_projection.*``, ``eva.*`` and, when the
        checkpoint has one next to the stem, ``up_projection.*``; ``dropped`` lists every other key
        (decoder EVA, ``mask_token``, projection heads), sorted.

    Example:
        >>> mapped, dropped = map_foreign_keys({"encoder.eva.norm.bias": b, "projector.w": w},
        ...                                    "encoder.down_projection", "encoder.eva")
        >>> list(mapped), dropped
        (['eva.norm.bias'], ['projector.w'])
    """
    parent = key_to_stem.rpartition(".")[0]
    decoder = f"{parent}.{DECODER}" if parent else DECODER
    prefixes = ((key_to_stem + ".", STEM + "."), (key_to_encoder + ".", ENCODER + "."), (decoder + ".", DECODER + "."))
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
                break
        else:
            dropped.append(key)
    return mapped, sorted(dropped)


def describe_dropped(dropped: Sequence[str]) -> str:
    """One phrase for the load report: the groups of dropped pre-training tensors.

    Example:
        >>> describe_dropped(["decoder.norm.bias", "decoder.norm.weight", "mask_token"])
        'decoder.* (2 tensors), mask_token (1 tensor)'
    """
    groups: dict[str, int] = {}
    for key in dropped:
        head = key.split(".")[0]
        name = head if head == key else f"{head}.*"
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(f"{g} ({n} tensor{'s' if n != 1 else ''})" for g, n in groups.items())


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """Resample an absolute position embedding (1, N, E) from one token grid to another.

    The N = d*h*w entries (grid order, W fastest) are a (E, d, h, w) field; it is resampled
    trilinearly with ``align_corners=False`` (pixel centres at (i + 0.5) * old / new - 0.5, clamped
    at the borders), as nnU-Net's pretrained Primus trainer resizes it.

    Args:
        pos_embed: (1, N, E) with N = prod(old_grid).
        old_grid: tokens per axis of the checkpoint's patch.
        new_grid: tokens per axis of the new patch.

    Returns:
        (1, prod(new_grid), E), same dtype as ``pos_embed``.

    Example:
        >>> resize_pos_embed(torch.zeros(1, 8000, 864), (20, 20, 20), (16, 16, 12)).shape
        torch.Size([1, 3072, 864])
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != math.prod(old_grid):
        raise ValueError(f"pos_embed: expected (1, {math.prod(old_grid)}, E) for grid {old_grid}, "
                         f"got {tuple(pos_embed.shape)}")
    if old_grid == new_grid:
        return pos_embed
    field = pos_embed[0].transpose(0, 1).reshape(1, -1, *old_grid)
    resized = F.interpolate(field, size=new_grid, mode="trilinear", align_corners=False)
    return resized.reshape(1, pos_embed.shape[2], -1).transpose(1, 2).contiguous()


def _grid_of(n_tokens: int, patch: Sequence[int], patch_size: Sequence[int] | None) -> tuple[int, int, int]:
    if patch_size is not None:
        grid = tuple(int(s) // int(p) for s, p in zip(patch_size, patch))
        if math.prod(grid) != n_tokens or any(int(s) % int(p) for s, p in zip(patch_size, patch)):
            raise ValueError(f"the pre-training patch {tuple(patch_size)} with tokens of {tuple(patch)} voxels gives "
                             f"{math.prod(grid)} tokens, but the position embedding has {n_tokens}")
        return grid[0], grid[1], grid[2]
    side = round(n_tokens ** (1 / 3))
    if side**3 != n_tokens:
        raise ValueError(f"the position embedding has {n_tokens} tokens, not a cube; the pre-training patch size "
                         "is needed (nnssl plans: pretrain_plan.configurations.*.patch_size)")
    return side, side, side


def infer_primus_config(
    state: Mapping[str, torch.Tensor],
    *,
    architecture: str | None = None,
    patch_size: Sequence[int] | None = None,
    **defaults: object,
) -> PrimusConfig:
    """Read a Primus architecture off the shapes of a (mapped) state dict.

    From the tensors: token width, input channels and token size (``down_projection.proj.weight``),
    depth, MLP width, layer scale and attention-inner norm (present or not), the position embedding's
    length, and the classes (the decoder's last conv, when there is a decoder). Not stored in a state
    dict: the number of heads (from ``architecture``, e.g. nnssl's ``"PrimusM"``, else the preset of the
    same width and depth), the pre-training patch when the token count is not a cube
    (``patch_size``), the rotary embedding (assumed on, as in every published Primus), the layer
    scale's initial value (0.1) and the drop rates (0).

    Args:
        state: keys as s3d's (see :func:`map_foreign_keys`).
        architecture: DNA/nnssl class name (``"PrimusM"``) or s3d preset (``"primus_m"``).
        patch_size: the pre-training patch in voxels (D, H, W).
        **defaults: :class:`PrimusConfig` fields to set (e.g. ``num_classes`` when there is no decoder).

    Raises:
        ValueError: a key it needs is missing, or the heads or grid cannot be determined (the message says
            what to pass).

    Example:
        >>> cfg = infer_primus_config(mapped, architecture="PrimusM", patch_size=(160, 160, 160))
    """
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"cannot infer the Primus architecture: key {key!r} not in the state dict")
        return state[key]

    stem = need("down_projection.proj.weight")
    embed_dim, in_channels, patch = int(stem.shape[0]), int(stem.shape[1]), tuple(int(p) for p in stem.shape[2:])
    depth = 0
    while f"eva.blocks.{depth}.norm1.weight" in state:
        depth += 1
    if depth == 0:
        raise ValueError("cannot infer the Primus architecture: no transformer blocks (eva.blocks.0.*) in the state "
                         "dict")
    hidden = int(need("eva.blocks.0.mlp.fc2.weight").shape[1])
    mlp_ratio = MLP_RATIO if int(embed_dim * MLP_RATIO) == hidden else (hidden + 0.5) / embed_dim
    preset = DNA_CLASS_NAMES.get(architecture or "", architecture)
    if preset in PRIMUS_CONFIGS:
        heads = PRIMUS_CONFIGS[preset].eva_numheads
        name = preset
    else:
        matches = [c for c in PRIMUS_CONFIGS.values() if (c.embed_dim, c.eva_depth) == (embed_dim, depth)]
        if not matches:
            raise ValueError(f"cannot infer the number of attention heads of a Primus of width {embed_dim} and depth "
                             f"{depth} (not a preset); pass eva_numheads")
        heads, name = matches[0].eva_numheads, matches[0].name
    pos = state.get("eva.pos_embed")
    n_tokens = int(pos.shape[1]) if pos is not None else None
    if n_tokens is not None:
        grid = _grid_of(n_tokens, patch, patch_size)
        input_shape = tuple(g * p for g, p in zip(grid, patch))
    else:
        input_shape = tuple(patch_size) if patch_size is not None else PRIMUS_CONFIGS["primus_m"].input_shape
    last = sorted((k for k in state if k.startswith("up_projection.decode.") and k.endswith(".bias")),
                  key=lambda k: int(k.split(".")[2]))
    fields: dict[str, object] = dict(
        embed_dim=embed_dim, eva_depth=depth, eva_numheads=heads, patch_embed_size=patch, input_shape=input_shape,
        in_channels=in_channels, mlp_ratio=mlp_ratio, use_abs_pos_embed=pos is not None,
        init_values=0.1 if "eva.blocks.0.gamma_1" in state else None,
        scale_attn_inner="eva.blocks.0.attn.norm.weight" in state, name=name,
    )
    if last:
        fields["num_classes"] = int(state[last[-1]].shape[0])
    fields.update(defaults)
    return PrimusConfig(**fields)  # type: ignore[arg-type]
