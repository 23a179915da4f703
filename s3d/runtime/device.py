"""The compute device and automatic mixed precision, with one vocabulary for every job and command.

``amp`` is one of :data:`AMP_MODES`:

- ``"auto"``: bf16 autocast on CUDA GPUs that support it, else fp16; full fp32 on the CPU (where
  bf16 autocast is about 3x slower than fp32);
- ``"bf16"`` / ``"fp16"``: that autocast dtype; ``"fp16"`` needs a CUDA device (an error on the CPU);
  ``"bf16"`` on the CPU is honoured (slow; a warning says so);
- ``"off"``: full fp32.

Example:
    >>> dev = resolve_device("cpu"); resolve_amp("auto", dev) is None
    True
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from s3d._paths import UsageError

#: The device names every job, function and command accepts (in messages).
DEVICES = "auto, cpu, cuda or cuda:N"

#: The ``amp`` values every job, function and command accepts.
AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device a job runs on.

    Args:
        device: ``"auto"``/``None`` (the CUDA device ``local_rank`` when CUDA is available, else the
            CPU), ``"cpu"``, ``"cuda"`` (= ``cuda:local_rank``), ``"cuda:N"`` or a ``torch.device``.
        local_rank: this process's GPU index on its node under ``torchrun``.

    Raises:
        s3d._paths.UsageError: (a ``ValueError``) the name is not a device, names one s3d does not run
            on (``mps``, ``meta``, ...), or CUDA (or that CUDA device) is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() != device:
        device = device.strip().lower()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"device (--device) {str(device)!r} is not a device; use {DEVICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device (--device) {str(device)!r} is not supported; s3d runs on the CPU or on CUDA "
                         f"GPUs, use {DEVICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device (--device) {str(device)!r} requested but CUDA is not available here (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise UsageError(f"device (--device) {str(device)!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def resolve_amp(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``; ``None`` means full fp32.

    Args:
        amp: one of :data:`AMP_MODES`, or a torch dtype (``torch.float32``/``None`` = off).
        device: where the network runs.

    Raises:
        s3d._paths.UsageError: (a ``ValueError``) an unknown value, or ``"fp16"`` on a device without CUDA.

    Example:
        >>> resolve_amp("off", torch.device("cpu")) is None
        True
    """
    if amp is None or amp == torch.float32:
        return None
    if isinstance(amp, torch.dtype):
        if amp not in (torch.bfloat16, torch.float16):
            raise UsageError(f"amp (--amp): expected bf16, fp16 or fp32, got {amp}")
        amp = "bf16" if amp == torch.bfloat16 else "fp16"
    if amp not in AMP_MODES:
        raise UsageError(f"amp (--amp): expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UsageError(f"amp (--amp) 'fp16' needs a CUDA device, this job runs on {device}; use bf16 or off")
    if amp == "bf16" and device.type == "cpu":
        warnings.warn("amp='bf16' on the CPU: honoured, but bf16 autocast is about 3x slower than fp32 on "
                      "most CPUs; use amp='off' (or auto) for speed", RuntimeWarning, stacklevel=2)
    return torch.bfloat16 if amp == "bf16" else torch.float16


def amp_name(dtype: torch.dtype | None) -> str:
    """The :data:`AMP_MODES` name of a resolved autocast dtype (``None`` -> ``"off"``).

    Example:
        >>> amp_name(torch.bfloat16)
        'bf16'
    """
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for ``None`` (fp32).

    Example:
        >>> with autocast(torch.device("cpu"), None):
        ...     pass
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
