"""torch.distributed set-up for ``torchrun`` launches (NCCL on GPUs, gloo on CPU).

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in its environment; a plain ``python``/``s3d`` process has none of them and runs alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group spans more than one process."""
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if the environment describes one (idempotent).

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``: the backend is NCCL for CUDA, gloo otherwise.

    Example:
        >>> info = init_distributed()      # under torchrun --nproc_per_node 2: rank 0 or 1 of 2
        >>> info.world_size
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, backend)


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op when alone)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def mean_across(value: torch.Tensor, info: DistInfo) -> float:
    """Mean of a scalar tensor over all processes (the value itself when alone)."""
    v = value.detach().float().reshape(1).clone()
    if info.enabled:
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= info.world_size
    return float(v.item())


def global_weighted_loss(
    loss: torch.Tensor, weight: torch.Tensor, info: DistInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn each rank's weighted-mean loss into the global batch's weighted mean under DDP.

    Rank ``r`` computed ``loss_r = S_r / max(W_r, 1)`` (``S_r``: its weighted error sum, ``W_r``: its
    weight sum, e.g. masked voxels). One process with the whole global batch would optimise
    ``sum_r S_r / max(W, 1)``, ``W = sum_r W_r``; DDP instead averages the ranks' gradients, i.e.
    optimises the mean of the per-rank means, which over-weights ranks with few masked voxels. This
    all-reduces ``(S_r, W_r)`` (detached; one collective) and returns the loss to backpropagate,
    ``loss_r * world_size * max(W_r, 1) / max(W, 1)`` (the factor carries no gradient), whose
    DDP-averaged gradient is that of the global mean. Apply an AMP GradScaler to the returned loss.
    When alone the loss is returned unchanged (no collective).

    Args:
        loss: scalar loss of this rank (with its graph).
        weight: scalar weight sum ``W_r`` of this rank (the loss's denominator before ``max(., 1)``).
        info: the process group (:func:`init_distributed`).

    Returns:
        ``(loss_for_backward, global_mean)``: the rescaled loss (scalar, with graph) and the global
        weighted mean ``sum_r S_r / max(W, 1)`` (detached fp32 scalar, same on every rank; convert it
        with ``float()`` only when logging, to avoid a host sync every step).

    Example:
        >>> out = mae(x)                  # under torchrun: x is this rank's share of the batch
        >>> loss, logged = global_weighted_loss(out.loss, out.loss_weight, info)
        >>> scaler.scale(loss).backward()
    """
    if not info.enabled:
        return loss, loss.detach().float()
    local_w = weight.detach().float().reshape(()).to(loss.device)
    local_denom = local_w.clamp_min(1.0)
    sums = torch.stack([loss.detach().float().reshape(()) * local_denom, local_w])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    global_denom = sums[1].clamp_min(1.0)
    factor = (info.world_size * local_denom / global_denom).to(loss.dtype)
    return loss * factor, sums[0] / global_denom


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
