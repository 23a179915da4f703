"""VoCo (Wu et al., CVPR 2024): predict where random crops lie by contrasting them with base crops.

Per patch: the base crops tile it on a grid (``patch // crop`` per axis; the paper's CNN adaptation
uses 64^3 crops on a 192x192x64 patch, a 3x3 grid, Appendix A.3) and ``num_targets`` target crops
of the same size lie at uniform random positions inside it. The target of target crop t is its
overlap with every base crop, ``y[t, j] = |t & j| / |crop|`` (a vector summing to 1).

Every crop goes through the backbone's encoder; each stage's features are global-average pooled,
concatenated ("multi-scale") and sent through a projection head (Linear-ReLU-Linear, in this
module, not in the backbone). Predictions are ``l[t, j] = relu(cos(p_t, q_j))`` with p/q the
projected target/base features of the same patch, and

    L_pred = mean_{t, j} -log(1 - |l[t, j] - y[t, j]|)
    L_reg  = mean_{i != j} |cos(q_i, q_j)|   (base crops of one patch are pushed apart)
    loss   = L_pred + reg_weight * L_reg

(VoCo's position-prediction and regularisation terms, written from the paper's definitions).
The decoder is not used and is frozen; the exported backbone keeps its initial decoder weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s3d._triple import to_3tuple, triple
from s3d.pretext._common import PretextMethod, PretextOutput, check_backbone, device_generator, randint_between
from s3d.runtime.method import PatchProblem


def base_grid(size: Sequence[int], crop: Sequence[int]) -> torch.Tensor:
    """Corners (N_base, 3) of the base crops tiling a patch of ``size`` (each a multiple of ``crop``).

    Example:
        >>> base_grid((192, 192, 64), (64, 64, 64)).shape
        torch.Size([9, 3])
    """
    bad = [a for a in range(3) if int(size[a]) % int(crop[a])]
    if bad:
        raise ValueError(f"voco: patch size {tuple(size)} must be a multiple of the crop size {tuple(crop)} "
                         f"on "
                         f"every axis (axes {bad} are not); e.g. patch_size 192x192x64 for 64^3 crops")
    axes = [torch.arange(0, int(size[a]), int(crop[a])) for a in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def overlap_targets(target_lo: torch.Tensor, base_lo: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Overlap of every target crop with every base crop, as a fraction of the crop volume.

    Args:
        target_lo: (..., T, 3) target corners (voxels). base_lo: (N, 3) base corners.
        crop: crop size (voxels) per axis.

    Returns:
        (..., T, N) in [0, 1]; rows sum to 1 when the base crops tile the patch holding the targets.

    Example:
        >>> overlap_targets(torch.tensor([[32, 0, 0]]), base_grid((128, 64, 64), (64, 64, 64)), (64, 64, 64))
        tensor([[0.5000, 0.5000]])
    """
    c = torch.tensor(list(crop), device=target_lo.device, dtype=torch.float64)
    t = target_lo.to(torch.float64)[..., :, None, :]
    b = base_lo.to(target_lo.device, torch.float64)
    inter = (torch.minimum(t + c, b + c) - torch.maximum(t, b)).clamp_min(0)  # (..., T, N, 3)
    return (inter / c).prod(-1).to(torch.float32)


def extract_crops(x: torch.Tensor, lo: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Crops of ``x`` (B, C, D, H, W) at corners ``lo`` (B, K, 3): (B * K, C, cd, ch, cw), sample-major."""
    b, k = lo.shape[:2]
    idx = [torch.arange(int(crop[a]), device=x.device) for a in range(3)]
    lo = lo.to(x.device)
    d = (lo[..., 0, None] + idx[0])[:, :, :, None, None]
    h = (lo[..., 1, None] + idx[1])[:, :, None, :, None]
    w = (lo[..., 2, None] + idx[2])[:, :, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None, None]
    crops = x.permute(0, 2, 3, 4, 1)[bi, d, h, w]  # (B, K, cd, ch, cw, C)
    return crops.permute(0, 1, 5, 2, 3, 4).reshape(b * k, x.shape[1], *[int(c) for c in crop])


class VoCo(PretextMethod):
    """VoCo position-contrast pre-training of a ResEnc U-Net's encoder.

    Args:
        backbone: the ResEnc U-Net (only its encoder is trained; the decoder is frozen).
        crop_size: base/target crop size (voxels), int or (D, H, W); the patch must be a multiple.
        num_targets: random target crops per patch (5 in the paper's adaptation).
        proj_hidden, proj_dim: widths of the projection head.
        reg_weight: weight of the base-crop regularisation term.
        eps: keeps ``log`` finite.

    Example:
        >>> from s3d.nn import build_resenc_unet
        >>> voco = VoCo(build_resenc_unet("tiny", in_channels=1, num_classes=1), crop_size=32, num_targets=2)
        >>> out = voco(torch.randn(1, 1, 64, 64, 32), generator=torch.Generator().manual_seed(0))
        >>> tuple(out.extras["overlap"].shape)
        (1, 2, 4)
    """

    def __init__(self, backbone: nn.Module, crop_size: int | Sequence[int] = 64, num_targets: int = 5,
                 proj_hidden: int = 1024, proj_dim: int = 512, reg_weight: float = 1.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        check_backbone(backbone, "voco")
        self.crop_size = to_3tuple(crop_size, "voco: crop_size")
        if num_targets < 1:
            raise ValueError(f"voco: num_targets must be >= 1, got {num_targets}")
        if reg_weight < 0 or eps <= 0:
            raise ValueError(f"voco: need reg_weight >= 0 and eps > 0, got {reg_weight}, {eps}")
        self.backbone = backbone
        self.num_targets = int(num_targets)
        self.reg_weight = float(reg_weight)
        self.eps = float(eps)
        feats = sum(backbone.config.features_per_stage)
        self.projector = nn.Sequential(nn.Linear(feats, proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(proj_hidden, proj_dim))
        backbone.decoder.requires_grad_(False)

    def patch_problem(self, patch_size: Sequence[int]) -> PatchProblem | None:
        """``None`` when patches of ``patch_size`` (D, H, W voxels) are a whole number of crops along every
        axis (the base crops tile the patch); else a patch size that is.

        Example:
            >>> from s3d.nn import build_resenc_unet
            >>> VoCo(build_resenc_unet("tiny", num_classes=1), crop_size=32).patch_problem((48, 64, 32)).fix_patch_size
            (64, 64, 32)
        """
        patch = triple(int(p) for p in patch_size)
        if all(p % c == 0 for p, c in zip(patch, self.crop_size, strict=True)):
            return None
        fit = triple(max(c, -(-p // c) * c) for p, c in zip(patch, self.crop_size, strict=True))
        return PatchProblem(patch, f"with voco crop_size {self.crop_size} the patch must be a multiple of the crop "
                            "along every axis (the base crops tile it)", fit)

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Projected, pooled multi-scale encoder features (N, proj_dim) of crops (N, C, d, h, w)."""
        self.backbone.check_input(crops)
        pooled = [f.float().mean(dim=(2, 3, 4)) for f in self.backbone.encoder(crops)]
        return self.projector(torch.cat(pooled, dim=1))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                target_lo: torch.Tensor | None = None) -> PretextOutput:
        """Score one batch ``x`` (B, C, D, H, W, z-scored).

        Args:
            target_lo: optional (B, T, 3) target-crop corners (voxels); ``None`` samples
                ``num_targets`` uniformly inside the patch.

        Returns:
            :class:`PretextOutput` (loss; no reconstruction; extras ``{"logits", "overlap", "pred_loss",
            "reg_loss", "target_lo"}``, logits/overlap (B, T, N_base)).
        """
        if x.dim() != 5:
            raise ValueError(f"voco: expected (B, C, D, H, W), got {tuple(x.shape)}")
        b, size, crop = x.shape[0], tuple(x.shape[2:]), self.crop_size
        base_lo = base_grid(size, crop).to(x.device)
        nb = base_lo.shape[0]
        if target_lo is None:
            g = device_generator(x, generator)
            shape = (b, self.num_targets, 3)
            hi = (torch.tensor(size, device=x.device) - torch.tensor(crop, device=x.device)).expand(shape)
            target_lo = randint_between(torch.zeros(shape, dtype=torch.long, device=x.device), hi, g)
        target_lo = target_lo.to(x.device).long()
        nt = target_lo.shape[1]
        overlap = overlap_targets(target_lo, base_lo, crop)  # (B, T, N)
        crops = torch.cat([extract_crops(x, base_lo.expand(b, nb, 3), crop),
                           extract_crops(x, target_lo, crop)])
        z = F.normalize(self.embed(crops).float(), dim=1)
        q, p = z[: b * nb].view(b, nb, -1), z[b * nb:].view(b, nt, -1)
        logits = F.relu(p @ q.transpose(1, 2))  # (B, T, N)
        pred_loss = -torch.log((1 - (logits - overlap).abs()).clamp_min(self.eps)).mean()
        if nb > 1:
            sim = (q @ q.transpose(1, 2)).abs()
            off = ~torch.eye(nb, dtype=torch.bool, device=x.device)
            reg_loss = sim[:, off].mean()
        else:
            reg_loss = pred_loss.new_zeros(())
        loss = pred_loss + self.reg_weight * reg_loss
        extras = {"logits": logits, "overlap": overlap, "pred_loss": pred_loss.detach(),
                  "reg_loss": reg_loss.detach(), "target_lo": target_lo}
        return PretextOutput(loss, None, None, extras)
