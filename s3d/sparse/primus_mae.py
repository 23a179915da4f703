"""``PrimusMAEWrapper``: token-sparse masked-autoencoder pre-training of a Primus (nnssl's EvaMAE, truly sparse).

One forward pass, with E the token width and N the tokens of the training patch:

1. embed: ``backbone.embed(x)`` -> tokens (B, N, E) in grid order;
2. mask: each sample keeps the same number K = N - round(N * ratio) of tokens (one ratio per batch, so the
   visible set is a dense (B, K, E) tensor), chosen at random; ``keep_index`` (B, K) lists their grid
   indices in ascending order;
3. encode: the backbone's EVA runs on the K visible tokens only, with the absolute and rotary position
   embeddings of those tokens (:meth:`s3d.nn.primus.modules.PrimusEncoder.forward` with ``keep_index``):
   its cost falls with the mask ratio;
4. restore: the features go back to their grid positions, a learnable mask token (``mask_token``, (1, 1,
   E)) at the masked ones (:meth:`s3d.nn.Primus.restore`);
5. decode: a small EVA over all N tokens (``decoder.*``, depth 2 as nnssl's MAE, its own position
   embedding), then the backbone's patch decoder ``up_projection`` (``num_classes == in_channels``);
6. loss: mean squared error in z-score space over the voxels of the masked tokens only
   (:func:`s3d.sparse.wrapper.masked_mse_loss`).

The state dict is ``backbone.*`` (the Primus that is fine-tuned later), ``mask_token`` and ``decoder.*``
(nnssl's EvaMAE names these two the same).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from s3d._triple import triple
from s3d.nn.masked import expand_keep
from s3d.nn.primus import Primus
from s3d.nn.primus.modules import PrimusEncoder
from s3d.runtime.method import PatchProblem
from s3d.sparse.mask import MaskRatio, check_mask_ratio
from s3d.sparse.wrapper import MAEOutput, masked_mse_loss


def sample_token_keep(batch: int, num_tokens: int, mask_ratio: MaskRatio, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Random visible tokens, the same count for every sample: (B, K) grid indices, ascending per row.

    The ratio is drawn once for the batch (uniformly from ``(lo, hi)`` or fixed); K = N - round(N * ratio),
    at least 1 and at most N - 1 (one token visible, one masked).

    Example:
        >>> sample_token_keep(2, 8, 0.75, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 2])
    """
    if num_tokens < 2:
        raise ValueError(f"num_tokens: need at least 2 tokens (one visible, one masked), got {num_tokens}")
    lo, hi = check_mask_ratio(mask_ratio)
    ratio = lo if lo == hi else lo + (hi - lo) * float(torch.rand((), generator=generator))
    keep = min(num_tokens - 1, max(1, num_tokens - round(num_tokens * ratio)))
    noise = torch.rand(batch, num_tokens, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(device)


class PrimusMAEWrapper(nn.Module):
    """Token-sparse MAE pre-training around a :class:`s3d.nn.Primus` (the sibling of
    :class:`s3d.sparse.SparseMAEWrapper`, with the same output type :class:`~s3d.sparse.wrapper.MAEOutput`).

    The backbone reconstructs the image with its own patch decoder, so build it with
    ``num_classes == in_channels`` (``build_primus("primus_m", in_channels=1, num_classes=1,
    input_shape=patch)``). It trains on patches of exactly ``backbone.config.input_shape``.

    Args:
        model: the backbone; ``wrapper.backbone is model``.
        mask_ratio: fraction of tokens masked, fixed or ``(lo, hi)`` drawn once per batch (nnssl: 0.75).
        decoder_depth: EVA blocks of the pre-training decoder (nnssl's MAE: 2).

    Attributes:
        mask_token: (1, 1, E) learnable token at the masked positions (zeros at start, as nnssl's).
        decoder: :class:`~s3d.nn.primus.modules.PrimusEncoder` of ``decoder_depth`` blocks over all tokens.
        engine_choices: always empty (no run-time choice).

    Example:
        >>> from s3d import build_primus
        >>> mae = PrimusMAEWrapper(build_primus("primus_tiny", num_classes=1), mask_ratio=0.75)
        >>> out = mae(torch.randn(2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> out.reconstruction.shape, out.mask.shape
        (torch.Size([2, 1, 32, 32, 32]), torch.Size([2, 1, 8, 8, 8]))
    """

    #: keyword arguments of :class:`~s3d.sparse.SparseMAEWrapper` that have no meaning for tokens (the token is
    #: the mask cell, every sample keeps the same count, the encoder is always sparse); ``build_method``
    #: drops them, with a warning, when a ResEnc MAE recipe pre-trains a Primus.
    RESENC_ONLY_KWARGS = ("block_size", "per_sample", "mask_token", "densify", "densify_norm", "sparse", "coarse",
                          "engine", "freeze_unused_heads")

    def __init__(self, model: Primus, mask_ratio: MaskRatio = 0.75, decoder_depth: int = 2) -> None:
        super().__init__()
        if not isinstance(model, Primus):
            raise TypeError(f"model: expected a Primus (from s3d.build_primus), got {type(model).__name__}")
        cfg = model.config
        if cfg.num_classes != cfg.in_channels:
            raise ValueError(
                f"the backbone reconstructs the image, so its patch decoder needs num_classes == in_channels; got "
                f"num_classes={cfg.num_classes}, in_channels={cfg.in_channels}. Build it with "
                f"build_primus(config, in_channels={cfg.in_channels}, num_classes={cfg.in_channels})")
        if isinstance(decoder_depth, bool) or not isinstance(decoder_depth, int) or decoder_depth < 1:
            raise ValueError(f"decoder_depth: expected a positive int (EVA blocks), got {decoder_depth!r}")
        self.backbone = model
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.decoder = PrimusEncoder(cfg.replace(eva_depth=decoder_depth, drop_path_rate=0.0))
        if self.decoder.pos_embed is not None:
            nn.init.trunc_normal_(self.decoder.pos_embed, std=0.02)
        self.engine_choices: dict[Any, Any] = {}

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, decoder_depth={len(self.decoder.blocks)}"

    # ---- pieces -----------------------------------------------------------------------------------
    def keep_grid(self, keep_index: torch.Tensor) -> torch.Tensor:
        """Token keep grid (B, 1, d, h, w), bool, True = visible, of ``keep_index`` (B, K)."""
        b = keep_index.shape[0]
        grid = torch.zeros(b, self.backbone.config.num_tokens, dtype=torch.bool, device=keep_index.device)
        grid.scatter_(1, keep_index, True)
        return grid.view(b, 1, *self.backbone.config.grid)

    def encode(self, tokens: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, K, E) of the visible tokens: ``tokens`` (B, N, E) gathered at ``keep_index`` (B, K)
        and run through the backbone's EVA with their own position embeddings (the masked tokens take no part)."""
        e = tokens.shape[-1]
        visible = tokens.gather(1, keep_index[:, :, None].expand(-1, -1, e))
        return self.backbone.eva(visible, keep_index)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, keep_index: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Mask tokens, encode the visible ones, restore, decode and score one batch.

        Args:
            x: z-scored images (B, C, D, H, W) of size ``backbone.config.input_shape``.
            keep_index: optional (B, K) long grid indices of the visible tokens (the same K for every
                sample); ``None`` samples them (:func:`sample_token_keep`).
            loss_mask: optional (B, 1 or C, D, H, W), 1 = voxel may count in the loss, 0 = excluded.
            generator: RNG for the sampled tokens.

        Returns:
            :class:`~s3d.sparse.wrapper.MAEOutput`: the loss (MSE over the voxels of masked tokens),
            reconstruction (B, C, D, H, W), the token keep grid (B, 1, d, h, w) and the loss weight.
        """
        self.backbone.check_input(x)
        cfg = self.backbone.config
        if keep_index is None:
            keep_index = sample_token_keep(x.shape[0], cfg.num_tokens, self.mask_ratio, generator, x.device)
        elif keep_index.dim() != 2 or keep_index.shape[0] != x.shape[0]:
            raise ValueError(f"keep_index: expected (B={x.shape[0]}, K) token indices, got {tuple(keep_index.shape)}")
        keep_index = keep_index.to(device=x.device, dtype=torch.long)
        features = self.encode(self.backbone.embed(x), keep_index)
        full = self.backbone.restore(features, keep_index, self.mask_token)
        reconstruction = self.backbone.decode(self.decoder(full))
        grid = self.keep_grid(keep_index)
        keep = expand_keep(grid, x.shape[2:])
        loss, loss_weight = masked_mse_loss(reconstruction, x, keep, loss_mask, return_weight=True)
        return MAEOutput(loss, reconstruction, grid, loss_weight)

    # ---- the pre-training method contract (s3d.runtime.method.PretrainMethod) -------------------------
    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """The batch :meth:`forward` takes: the loop's z-scored patches (B, C, D, H, W) as they are."""
        return x

    def patch_problem(self, patch_size: Sequence[int]) -> PatchProblem | None:
        """``None`` when ``patch_size`` (D, H, W voxels) is the backbone's ``input_shape``, else the fix.

        Example:
            >>> from s3d import build_primus
            >>> PrimusMAEWrapper(build_primus("primus_tiny", num_classes=1)).patch_problem((64, 64, 64)).fix_patch_size
            (32, 32, 32)
        """
        patch = triple(int(p) for p in patch_size)
        shape = self.backbone.config.input_shape
        if patch == shape:
            return None
        return PatchProblem(patch, f"a Primus trains on exactly its input_shape {shape} (one position embedding per "
                            "token); build the backbone with input_shape=the patch, or use that patch", shape)

    def export_backbone(self) -> OrderedDict[str, torch.Tensor]:
        """A detached copy of the backbone's state dict (mask token and decoder EVA are pre-training only)."""
        return OrderedDict((k, v.detach().clone()) for k, v in self.backbone.state_dict().items())

    def pretraining_parameter_names(self) -> list[str]:
        """Names of the parameters that exist only for pre-training (mask token, decoder EVA)."""
        return ["mask_token", *(f"decoder.{n}" for n, _ in self.decoder.named_parameters())]
