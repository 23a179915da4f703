"""The fine-tuning loss: soft Dice + cross-entropy with nnU-Net's deep-supervision weights.

Under DDP the loss stays the one of the whole (global) batch: :meth:`DiceCELoss.global_batch`
all-reduces the batch-Dice statistics, so the gradients DDP averages over ranks equal those of one
process holding the whole batch (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: sums a tensor over all processes (in place or not) and returns the sum, e.g. ``dist.all_reduce``
SumAcross = Callable[[torch.Tensor], torch.Tensor]


class DiceCELoss(nn.Module):
    """Soft Dice (foreground classes) + cross-entropy, as nnU-Net; optional deep supervision.

    ``loss = CE(logits, y) + (1 - mean_k Dice_k)`` with Dice over the batch and all voxels
    ("batch Dice", nnU-Net's 3d default) and smoothing 1e-5. With a list of logits (deep
    supervision, highest resolution first), the target is nearest-downsampled to each output and
    the losses are weighted ``1 / 2**i``, the lowest resolution with 0, normalised to sum 1
    (nnU-Net's weights).

    Example:
        >>> loss = DiceCELoss()(torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 8, 8, 8)))
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice

    def _terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE mean, Dice intersections, Dice denominators) of one output; Dice sums (K-1,) or (B, K-1).

        Half-precision logits are computed in fp32; fp32 and fp64 stay as they are."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        ce = F.cross_entropy(logits, target)
        k = logits.shape[1]
        probs = torch.softmax(logits, 1)[:, 1:]
        onehot = F.one_hot(target, k).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
        axes = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
        return ce, (probs * onehot).sum(axes), probs.sum(axes) + onehot.sum(axes)

    def _dice(self, inter: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        return (2 * inter + self.smooth) / (denom + self.smooth).clamp_min(1e-8)

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of logits (B, K, D, H, W) against integer labels (B, D, H, W)."""
        ce, inter, denom = self._terms(logits, target)
        return ce + (1 - self._dice(inter, denom).mean())

    @staticmethod
    def deep_supervision_weights(n: int) -> list[float]:
        """nnU-Net's weights for ``n`` outputs: ``1/2**i``, last 0 (if n > 1), normalised to sum 1."""
        w = [1 / 2**i for i in range(n)]
        if n > 1:
            w[-1] = 0.0
        s = sum(w)
        return [x / s for x in w]

    def _levels(self, logits: torch.Tensor | Sequence[torch.Tensor],
                target: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        """``(weight, logits, target)`` per output with a nonzero weight (targets downsampled)."""
        if isinstance(logits, torch.Tensor):
            return [(1.0, logits, target)]
        out = []
        for w, lg in zip(self.deep_supervision_weights(len(logits)), logits, strict=True):
            if w == 0:
                continue
            t = target
            if lg.shape[2:] != target.shape[1:]:
                t = F.interpolate(target[:, None].float(), size=lg.shape[2:], mode="nearest")[:, 0].long()
            out.append((w, lg, t))
        return out

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        total = None
        for w, lg, t in self._levels(logits, target):
            term = w * self.single(lg, t)
            total = term if total is None else total + term
        assert total is not None
        return total

    def global_batch(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                     world_size: int, sum_across: SumAcross) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the loss of the global batch (DDP), and that loss's value.

        Every rank holds ``B / world_size`` samples of the global batch. The CE part is a mean over
        voxels: with equal shares, the mean over ranks of the per-rank means is the global mean, so
        DDP's gradient average already gives its global gradient. Batch Dice is not a mean: it is a
        ratio of sums over the whole batch, so the intersections and denominators are summed over the
        ranks (one collective for all outputs, detached) and each rank differentiates the global Dice
        through its own part only (``local + (global - local).detach()``), scaled by ``world_size``
        because DDP divides the summed gradients by it. The gradient DDP then applies equals that of
        one process computing :meth:`forward` on the whole batch (nnU-Net's DDP all-gathers its
        tp/fp/fn for the same reason). With ``batch_dice=False`` the per-sample Dice is a mean too.

        Args:
            logits: this rank's output(s), as :meth:`forward`.
            target: this rank's labels (B_local, D, H, W).
            world_size: number of processes.
            sum_across: sums a tensor over the processes and returns it (e.g. ``dist.all_reduce``).

        Returns:
            ``(loss_for_backward, global_loss)``: backpropagate the first (its value is not the loss);
            the second is the global batch's loss (detached, the same on every rank).

        Example:
            >>> loss, value = DiceCELoss().global_batch(out, y, 2, lambda t: dist.all_reduce(t) or t)
        """
        levels = [(w, *self._terms(lg, t)) for w, lg, t in self._levels(logits, target)]
        parts = []
        for _, ce, inter, denom in levels:
            if self.batch_dice:
                parts.append(torch.cat([ce.detach().reshape(1), inter.detach().flatten(), denom.detach().flatten()]))
            else:  # per-sample Dice is a mean over samples, like CE: only the value needs the sum
                parts.append((ce + 1 - self._dice(inter, denom).mean()).detach().reshape(1))
        summed = sum_across(torch.cat(parts))
        loss = value = None
        at = 0
        for w, ce, inter, denom in levels:
            if self.batch_dice:
                n = inter.numel()
                g_inter = inter + (summed[at + 1:at + 1 + n].view_as(inter) - inter.detach())
                g_denom = denom + (summed[at + 1 + n:at + 1 + 2 * n].view_as(denom) - denom.detach())
                dice_loss = 1 - self._dice(g_inter, g_denom).mean()
                part, val = ce + world_size * dice_loss, summed[at] / world_size + dice_loss.detach()
                at += 1 + 2 * n
            else:
                part, val = ce + 1 - self._dice(inter, denom).mean(), summed[at] / world_size
                at += 1
            loss = w * part if loss is None else loss + w * part
            value = w * val if value is None else value + w * val
        assert loss is not None and value is not None
        return loss, value


__all__ = ["DiceCELoss", "SumAcross"]
