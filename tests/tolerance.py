"""Tolerances that hold on any CPU: rounding bounds and same-run float32 yardsticks.

A tolerance in this suite is one of two kinds (docs/development.md, "Tolerances"):

- **a bound**: a rounding-error bound stated in the test, e.g. ``sum_bound(n, float64, max|x|)``
  for a sum of ``n`` terms, or the rounding of a printed number;
- **a yardstick**: "our error against float64 is at most ``K`` times the error of a plain float32
  computation of the same work against float64, measured in the same test" (:func:`assert_yardstick`).

Never a number read off one machine: CPUs differ in vector width and in oneDNN's convolution
algorithms, so a float32 error measured on one of them says nothing about another.

Why ``K = 4``: the computation under test and its plain float32 twin evaluate the same expression on
operands of the same size; their rounding-error bounds have the same form (``gamma_n * sum|terms|``
per sum, a few roundings per element-wise step) and differ at most by the extra level of partial
sums the computation under test adds (blocks, tiles, an all-reduce). Realised errors are a fraction
of such bounds and of the same size for the same shape of work; 4 allows the extra level to double
the error, with a factor 2 to spare. A wrong result (a missing term, a wrong index, a stale weight)
is off by orders of magnitude more. The floor ``EPS32`` keeps a yardstick that happens to round
exactly (error 0) from demanding exactness.
"""

from __future__ import annotations

import os

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 = 1.19e-7: one float32 ulp at 1.0
EPS64 = torch.finfo(torch.float64).eps  # 2^-52 = 2.22e-16
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2^-7 = 7.8e-3: one bfloat16 ulp at 1.0
YARDSTICK_K = 4.0


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|`` in float64 (0 when both are 0)."""
    a, ref = a.detach().double(), ref.detach().double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((a - ref).abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def norm_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||`` (Frobenius) in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    n = float(ref.norm())
    return float((a - ref).norm()) / n if n > 0 else float((a - ref).norm())


def flat(grads: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    """Gradients (or any named tensors) as one float64 vector, in sorted-name order."""
    keys = sorted(grads) if names is None else sorted(names)
    return torch.cat([grads[k].detach().double().flatten() for k in keys])


def sum_bound(n: int, dtype: torch.dtype, scale: float) -> float:
    """First-order bound on the rounding error of a sum of ``n`` terms each at most ``scale`` in size:
    ``n * eps * scale`` (recursive summation; pairwise or blocked orders are within it)."""
    return n * torch.finfo(dtype).eps * scale


def yardstick_tol(yard: float, k: float = YARDSTICK_K, floor: float = EPS32) -> float:
    """The tolerance a yardstick error gives: ``k * max(yard, floor)``."""
    return k * max(yard, floor)


def assert_yardstick(err: float, yard: float, what: str, k: float = YARDSTICK_K, floor: float = EPS32) -> None:
    """Assert ``err <= k * max(yard, floor)``: our error against float64 against a plain float32
    computation's error against float64, both measured in the calling test."""
    tol = yardstick_tol(yard, k, floor)
    log = os.environ.get("S3D_TOLERANCE_LOG")
    if log:  # how close each check runs to its tolerance, to compare CPUs (docs/development.md)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t{err:.3e}\t{yard:.3e}"
                    f"\t{err / tol:.3f}\n")
    assert err <= tol, (f"{what}: error {err:.2e} against float64 exceeds {k:g} x the plain float32 "
                        f"computation's {yard:.2e} (tolerance {tol:.2e})")
