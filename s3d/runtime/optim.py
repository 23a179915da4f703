"""The optimiser side of a training step, shared by both loops: SGD, the AMP-aware
backward/unscale/clip/step, the grad scaler, and the RNG states a checkpoint saves.

Example:
    >>> opt = sgd(net.parameters(), lr=1e-2)
    >>> scaler = grad_scaler(None, torch.device("cpu"))          # disabled: fp32
    >>> grad_norm = backward_and_step(loss, opt, scaler, grad_clip=12.0)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def sgd(params: Iterable[torch.nn.Parameter], lr: float, *, momentum: float = 0.99, nesterov: bool = True,
        weight_decay: float = 3e-5) -> torch.optim.SGD:
    """nnU-Net's optimiser: SGD with Nesterov momentum 0.99 and weight decay 3e-5 on the trainable ``params``.

    Raises:
        ValueError: no parameter requires a gradient.

    Example:
        >>> sgd(torch.nn.Linear(2, 2).parameters(), 1e-2).param_groups[0]["nesterov"]
        True
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the optimiser got no parameter that requires a gradient")
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, *, betas: tuple[float, float] = (0.9, 0.98),
          weight_decay: float = 5e-2) -> torch.optim.AdamW:
    """The Primus recipe's optimiser: AdamW (decoupled weight decay) on the trainable ``params``.

    Raises:
        ValueError: no parameter requires a gradient.

    Example:
        >>> adamw(torch.nn.Linear(2, 2).parameters(), 1e-4).defaults["betas"]
        (0.9, 0.98)
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the optimiser got no parameter that requires a gradient")
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay)


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 autocast (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      grad_clip: float | None) -> torch.Tensor:
    """Backward (scaled under fp16), unscale, clip the global grad norm, step the optimiser, update the scaler.

    Gradients must have been zeroed before the forward pass. Clipping covers the optimiser's
    parameters.

    Returns:
        The global grad norm before clipping (a 0-d tensor; NaN when ``grad_clip`` is ``None``).
    """
    scaler.scale(loss).backward()
    norm = torch.full((), float("nan"))
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return norm


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, NumPy, Python) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def stream_seed(seed: int, rank: int, step: int, purpose: int) -> int:
    """A 63-bit seed for the random stream of (run seed, rank, step, purpose).

    Example:
        >>> stream_seed(0, 0, 10, 1) == stream_seed(0, 0, 10, 1) != stream_seed(0, 0, 11, 1)
        True
    """
    state = np.random.SeedSequence([seed, rank, step, purpose]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])
