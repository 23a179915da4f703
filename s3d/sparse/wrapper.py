"""``SparseMAEWrapper``: sparse masked-autoencoder pre-training of a ResEnc U-Net (S3D, SparK-style).

The wrapper holds the backbone (the very module you later save and fine-tune) plus the
densification modules (mask tokens, densify convs). One forward pass:

1. sample (or take) a block keep-mask on the block grid (1 = visible, 0 = masked; the polarity is
   stated once, in :mod:`s3d.sparse.plan`);
2. build the forward's :class:`~s3d.sparse.plan.MaskPlan` (:meth:`SparseMAEWrapper.plan`): the boolean
   grid, the cell size, the keep mask of the input and of every encoder stage, and lazily the block
   layout; nothing below derives them again;
3. run the encoder masked, ``engine(encoder, x, plan)``: input zeroed at masked voxels, every
   conv/pool/norm re-masked, InstanceNorm statistics over visible voxels only
   (:meth:`SparseMAEWrapper.encode`, the single place where an encoder engine plugs in);
4. densify every skip with ``plan.keeps[1:]`` (:class:`s3d.sparse.densify.Densifier`);
5. decode with the backbone's own decoder and head (``num_classes == in_channels``);
6. loss: mean squared error in z-score space over the masked voxels of the whole batch (``plan.keeps[0]``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

import s3d.sparse.autotune as autotune
from s3d._triple import triple
from s3d.nn.masked import expand_keep
from s3d.nn.resenc_unet import ResEncUNet
from s3d.runtime.method import PatchProblem
from s3d.sparse.densify import Densifier
from s3d.sparse.engines import AUTO_ENGINE as AUTO_ENGINE  # re-exported: the engines' names as before
from s3d.sparse.engines import ENGINES, resolve_engine
from s3d.sparse.engines import EncoderEngine as EncoderEngine
from s3d.sparse.engines import dense_engine as dense_engine
from s3d.sparse.mask import MaskRatio, block_grid_size, check_mask_ratio, sample_block_mask
from s3d.sparse.plan import COARSE_POLICIES, MaskPlan


class MAEOutput(NamedTuple):
    """Result of :meth:`SparseMAEWrapper.forward`.

    Attributes:
        loss: scalar fp32 tensor, MSE over the masked (and loss-mask-included) voxels of the batch.
        reconstruction: (B, C, D, H, W) prediction at every voxel (visible ones carry no loss).
        mask: the keep grid used, bool (B, 1, d, h, w), True = visible.
        loss_weight: scalar fp32 tensor (detached), the loss weight sum ``sum(w)`` of
            :func:`masked_mse_loss` (masked voxels x channels counted); ``loss`` is
            ``sum(w * err) / max(loss_weight, 1)``. Multi-process training uses it to normalise by the
            masked-voxel count of the global batch (:func:`s3d.runtime.distributed.global_weighted_loss`).
            ``None`` when not computed.
        target: ``None``: the reconstruction's target is the input itself.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    mask: torch.Tensor
    loss_weight: torch.Tensor | None = None
    target: torch.Tensor | None = None


def masked_mse_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    return_weight: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over the masked voxels of a batch (fp32).

    ``sum(w * (rec - target)^2) / sum(w)`` with ``w = (1 - keep) * loss_mask`` broadcast over
    channels, i.e. the mean over every masked voxel and channel of the whole batch (samples with
    more masked voxels weigh more). Returns 0 (with a graph) when no voxel is counted.

    Args:
        reconstruction: (B, C, D, H, W).
        target: (B, C, D, H, W), z-scored image.
        keep: (B, 1, D, H, W), 1 = visible (no loss), 0 = masked (loss).
        loss_mask: optional (B, 1 or C, D, H, W), 1 = may count, 0 = excluded (e.g. background
            outside the anatomy or defaced voxels).
        return_weight: also return ``sum(w)`` (the count of masked voxels x channels, fractional with a
            fractional ``loss_mask``), a detached fp32 scalar; the loss is ``sum(w * err) / max(sum(w), 1)``.

    Returns:
        The scalar fp32 loss, or ``(loss, weight_sum)`` with ``return_weight=True``.

    Example:
        >>> rec, tgt = torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)
        >>> keep = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0.]).view(1, 1, 2, 2, 2)
        >>> float(masked_mse_loss(rec, tgt, keep))
        1.0
        >>> [float(v) for v in masked_mse_loss(rec, tgt, keep, return_weight=True)]
        [1.0, 4.0]
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} "
                         "differ")
    weight = 1.0 - keep.to(torch.float32)
    if loss_mask is not None:
        weight = weight * loss_mask.to(torch.float32)
    weight = weight.expand_as(reconstruction)
    err = (reconstruction.float() - target.float()).square()
    weight_sum = weight.sum()
    loss = (err * weight).sum() / weight_sum.clamp_min(1.0)
    return (loss, weight_sum.detach()) if return_weight else loss


class SparseMAEWrapper(nn.Module):
    """Sparse masked-autoencoder pre-training around a :class:`s3d.ResEncUNet`.

    The backbone's decoder and head reconstruct the image, so the backbone must output as many
    channels as it takes in: build it with ``num_classes=in_channels`` (e.g.
    ``build_resenc_unet("resenc_l", in_channels=1, num_classes=1)``), deep supervision off.

    Args:
        model: the backbone; ``wrapper.backbone is model``.
        block_size: mask cell edge, voxels. 32 = paper text (5^3 grid at 160^3); 16 = released code.
        mask_ratio: fraction of cells masked, fixed or ``(lo, hi)`` drawn uniformly (S3D: (0.6, 0.9)).
        per_sample: draw the ratio per sample (True) or once per batch (False, released code).
        mask_token: fill masked skip positions with learnable per-stage tokens.
        densify: 3x3x3 densification conv on every skip except the highest resolution.
        densify_norm: masked InstanceNorm (no affine) on each skip before the token;
            ``None`` = on when ``mask_token`` or ``densify`` is on.
        sparse: run the encoder masked (re-mask after every layer, masked norm statistics).
            ``False`` is Table 1a's "Base": a dense encoder on the zeroed image.
        coarse: stages coarser than the block grid: ``"pool"`` (visible if any cell under it is
            visible) or ``"ones"`` (never masked, as the released code's bottleneck).
        engine: encoder engine: ``"auto"`` (default: the first forward for each device, network,
            input shape/dtype, mask cell, mask ratio and grad mode times "dense" and "blocks" at each
            crossover edge on that input, keeps the fastest, logs it and caches it in the process,
            :mod:`s3d.sparse.autotune`; :attr:`engine_choices` holds what was picked), ``"dense"``
            (masked-dense, the reference) or ``"blocks"`` (block-sparse, :mod:`s3d.sparse.block_engine`,
            at the device's default crossover edge). Every engine gives the same numbers to rounding.
        freeze_unused_heads: the decoder's lower-resolution heads (kept so deep-supervision
            weights load) never see the loss; freeze them (``requires_grad=False``) so every
            trainable parameter gets a gradient and DDP needs no ``find_unused_parameters``.
            They stay in the state dict.

    Example:
        >>> from s3d import build_resenc_unet
        >>> net = build_resenc_unet("tiny", in_channels=1, num_classes=1)
        >>> mae = SparseMAEWrapper(net, block_size=16, mask_ratio=0.75)
        >>> out = mae(torch.randn(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> out.reconstruction.shape, out.mask.shape
        (torch.Size([2, 1, 32, 32, 32]), torch.Size([2, 1, 2, 2, 2]))
    """

    def __init__(
        self,
        model: ResEncUNet,
        block_size: int = 32,
        mask_ratio: MaskRatio = (0.6, 0.9),
        per_sample: bool = True,
        mask_token: bool = True,
        densify: bool = True,
        densify_norm: bool | None = None,
        sparse: bool = True,
        coarse: str = "pool",
        engine: str = "auto",
        freeze_unused_heads: bool = True,
    ) -> None:
        super().__init__()
        for attr in ("config", "encoder", "decoder"):
            if not hasattr(model, attr):
                raise TypeError(f"model: expected a ResEncUNet (from s3d.build_resenc_unet), "
                                f"got {type(model).__name__} without .{attr}")
        cfg = model.config
        if cfg.num_classes != cfg.in_channels:
            raise ValueError(
                f"the backbone reconstructs the image, so its head needs num_classes == in_channels; got "
                f"num_classes={cfg.num_classes}, in_channels={cfg.in_channels}. Build it with "
                f"build_resenc_unet(config, in_channels={cfg.in_channels}, num_classes={cfg.in_channels})"
            )
        if cfg.deep_supervision:
            raise ValueError("deep supervision must be off for MAE pre-training (one full-resolution "
                             "reconstruction); set model.deep_supervision = False")
        if sparse and cfg.norm != "instance":
            raise ValueError(f"the sparse encoder needs norm='instance' (masked statistics), "
                             f"got {cfg.norm!r}")
        if coarse not in COARSE_POLICIES:
            raise ValueError(f"coarse: expected one of {COARSE_POLICIES}, got {coarse!r}")
        if engine != "auto" and engine not in ENGINES:
            raise NotImplementedError(f"engine {engine!r} is not available; "
                                      f"registered engines: {sorted(ENGINES)}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int (voxels), got {block_size!r}")
        self.backbone = model
        self.block_size = block_size
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.per_sample = bool(per_sample)
        self.sparse = bool(sparse)
        self.coarse = coarse
        self.engine = engine
        #: the choices ``engine="auto"`` made for this wrapper, by key (:class:`s3d.sparse.autotune.EngineKey`)
        self.engine_choices: dict[autotune.EngineKey, autotune.EngineChoice] = {}
        self.densifier = Densifier(cfg.features_per_stage, mask_token=mask_token, densify=densify,
                                   densify_norm=densify_norm, eps=cfg.norm_eps)
        if freeze_unused_heads:
            for head in list(model.decoder.seg_layers)[:-1]:
                head.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, mask_ratio={self.mask_ratio}, per_sample={self.per_sample}, "
                f"sparse={self.sparse}, coarse={self.coarse!r}, engine={self.engine!r}")

    # ---- pieces -----------------------------------------------------------------------------------
    def sample_mask(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A random keep grid (B, 1, D/bs, H/bs, W/bs), bool, True = visible, on ``x.device``."""
        return sample_block_mask(x.shape[0], x.shape[2:], self.block_size, self.mask_ratio,
                                 self.per_sample, generator, device=x.device)

    def plan(self, mask: torch.Tensor, input_size: Sequence[int]) -> MaskPlan:
        """The :class:`~s3d.sparse.plan.MaskPlan` of keep grid ``mask`` (1 = visible) for an input of
        ``input_size`` voxels: the backbone's stage strides and this wrapper's ``coarse`` policy."""
        return MaskPlan.build(mask, input_size, self.backbone.config.stage_strides(), self.coarse)

    def stage_keeps(self, mask: torch.Tensor, input_size: Sequence[int]) -> list[torch.Tensor]:
        """Float keep masks ``[input, stage0, stage1, ...]`` for ``mask`` (1 = visible): ``plan(...).keeps``."""
        return list(self.plan(mask, input_size).keeps)

    def encode(self, x: torch.Tensor, plan: MaskPlan, sampled: bool = False) -> list[torch.Tensor]:
        """Encoder features (highest resolution first) of ``x`` under the forward's mask ``plan``.

        ---- ENCODER ENGINE: the only place the encoder runs. ----
        ``ENGINES[name](encoder, x, plan)`` must equal ``encoder(x, plan.keeps)``. With ``sparse=False``
        the dense encoder sees the zeroed image. ``sampled``: the mask was drawn from ``mask_ratio``
        (the autotune key then holds the ratio spec, not this mask's fraction).
        """
        encoder = self.backbone.encoder
        if not self.sparse:
            return encoder(x * plan.keeps[0].to(x.dtype))
        if self.engine != "auto":
            return ENGINES[self.engine](encoder, x, plan)
        choice = self.engine_choice(x, plan, sampled)
        return ENGINES[choice.engine](encoder, x, plan, min_block_edge=choice.min_block_edge)

    @torch.compiler.disable
    def engine_choice(self, x: torch.Tensor, plan: MaskPlan, sampled: bool = False) -> autotune.EngineChoice:
        """What ``engine="auto"`` runs for this input: remembered, cached in the process, or measured now.

        Runs eagerly under ``torch.compile`` (a graph break). ``sampled``: the plan's mask was drawn from
        ``mask_ratio``, so the key holds the ratio spec.
        """
        encoder = self.backbone.encoder
        key = autotune.engine_key(encoder, self.backbone.config, x, plan, self.mask_ratio if sampled else None)
        choice = self.engine_choices.get(key)
        if choice is None:
            if autotune.autotune_enabled():
                choice = autotune.choose_engine(ENGINES, encoder, x, key, plan)
            else:
                choice = autotune.table_choice(key, resolve_engine("auto", x.device), x.device)
            self.engine_choices[key] = choice
        return choice

    def restore_engine_choices(self, choices: Sequence[dict]) -> None:
        """Reuse choices saved by :meth:`autotune.EngineChoice.to_dict` (a resumed run runs what it ran);
        ``load_state_dict`` calls it with the choices of the state dict (:meth:`get_extra_state`)."""
        for d in choices:
            c = autotune.EngineChoice.from_dict(d, source="checkpoint")
            self.engine_choices[c.key] = c

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Mask, encode, densify, decode and score one batch.

        Args:
            x: z-scored images (B, C, D, H, W), each spatial size a multiple of ``block_size`` and
                of the network's total stride.
            mask: optional keep grid (B, 1, d, h, w), bool or 0/1, 1 = visible, on any grid that tiles
                the input (normally the block grid); ``None`` samples one.
            loss_mask: optional (B, 1 or C, D, H, W), 1 = voxel may count in the loss, 0 = excluded.
            generator: RNG for the sampled mask.

        Returns:
            :class:`MAEOutput` (loss, reconstruction (B, C, D, H, W), mask (B, 1, d, h, w) bool,
            loss_weight: the loss's weight sum, for normalising across processes).
        """
        self.backbone.check_input(x)
        size = tuple(x.shape[2:])
        if loss_mask is not None:
            lm = loss_mask.shape
            bad = loss_mask.dim() != 5 or lm[0] != x.shape[0] or lm[2:] != x.shape[2:]
            if bad or loss_mask.shape[1] not in (1, x.shape[1]):
                raise ValueError(f"loss_mask: expected (B, 1 or C, D, H, W) = ({x.shape[0]}, 1, "
                                 f"{', '.join(map(str, size))}), got {tuple(loss_mask.shape)}")
        sampled = mask is None
        if mask is None:
            block_grid_size(size, self.block_size)
            mask = self.sample_mask(x, generator)
        else:
            if mask.dim() != 5 or mask.shape[0] != x.shape[0] or mask.shape[1] != 1:
                raise ValueError(f"mask: expected a keep grid (B={x.shape[0]}, 1, d, h, w) (1 = visible), "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(device=x.device)
        plan = self.plan(mask, size)
        feats = self.encode(x, plan, sampled)
        reconstruction = self.backbone.decoder(self.densifier(feats, plan.keeps[1:]))
        loss, loss_weight = masked_mse_loss(reconstruction, x, plan.keeps[0], loss_mask, return_weight=True)
        return MAEOutput(loss, reconstruction, plan.grid, loss_weight)

    # ---- the pre-training method contract (s3d.runtime.method.PretrainMethod) -------------------------
    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch :meth:`forward` takes: the loop's z-scored patches (B, C, D, H, W) as they are."""
        return x

    def patch_problem(self, patch_size: Sequence[int]) -> PatchProblem | None:
        """``None`` when patches of ``patch_size`` (D, H, W voxels) hold a whole number of mask blocks, at
        least 2 (one visible, one masked); else what to change (``patch_size`` or ``block_size``).

        Example:
            >>> from s3d import build_resenc_unet
            >>> mae = SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1), block_size=32)
            >>> mae.patch_problem((32, 32, 32)).fix_patch_size
            (32, 32, 64)
        """
        patch, bs = tuple(int(p) for p in patch_size), self.block_size
        try:
            if math.prod(block_grid_size(patch, bs)) >= 2:
                return None
        except ValueError:  # not a whole number of blocks along some axis
            pass
        fit = [-(-p // bs) * bs for p in patch]  # each axis up to a whole block
        if math.prod(f // bs for f in fit) < 2:
            fit[-1] *= 2
        return PatchProblem(triple(patch), f"with mask block_size {bs} the patch must be a multiple of the block "
                            "along every axis and hold at least 2 blocks (one visible, one masked)",
                            triple(fit), {"block_size": max(1, bs // 2)})

    def get_extra_state(self) -> dict[str, Any]:
        """The engine choices of ``engine="auto"`` (:attr:`engine_choices`): part of ``state_dict()``, so a
        checkpoint holds them and a resumed run runs the engine it measured."""
        return {"engine_choices": [c.to_dict() for c in self.engine_choices.values()]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state` (choices marked ``source="checkpoint"``)."""
        self.restore_engine_choices(state.get("engine_choices", []))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 - nn.Module's signature
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a state dict from before the engine choices were part of it: none to restore
            missing_keys.remove(key)

    # ---- export -------------------------------------------------------------------------------------
    def export_backbone(self) -> OrderedDict[str, torch.Tensor]:
        """A detached copy of the backbone's state dict; loads strictly into ``build_resenc_unet(config)``.

        Mask tokens and densify convs are pre-training only and are not part of it.

        Example:
            >>> from s3d import build_resenc_unet
            >>> mae = SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1))
            >>> _ = build_resenc_unet(mae.backbone.config).load_state_dict(mae.export_backbone())
        """
        return OrderedDict((k, v.detach().clone()) for k, v in self.backbone.state_dict().items())

    def pretraining_parameter_names(self) -> list[str]:
        """Names of the parameters that exist only for pre-training (tokens, densify convs)."""
        return [f"densifier.{n}" for n, _ in self.densifier.named_parameters()]


def keep_at_input(mask: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """Keep grid (B, 1, d, h, w) -> float voxel mask (B, 1, D, H, W), 1 = visible (nearest upsampling).

    Example:
        >>> keep_at_input(torch.ones(1, 1, 2, 2, 2, dtype=torch.bool), (4, 4, 4)).shape
        torch.Size([1, 1, 4, 4, 4])
    """
    return expand_keep(mask, input_size)
