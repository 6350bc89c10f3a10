"""Every sigma grid cmkit uses is built here: the Karras grid and its views (ascending for training pairs, without
its last point for consistency-model sampling, the index of a sigma on it for diffusers' integer timesteps), log
spacing for schedule searches, and the check of a user's sigma list."""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Karras et al. (2022) grid: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Descending, length ``n``, first ``sigma_max``, last exactly ``sigma_min``. ``n == 1`` gives ``[sigma_max]``.
    """
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=dtype, device=device)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    sig[0], sig[-1] = sigma_max, sigma_min  # exact ends, not rounded through the power
    return sig.to(dtype=dtype, device=device)


def karras_ascending(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                     rho: float = RHO) -> torch.Tensor:
    """The N-point Karras grid in the training objectives' order: ascending, ``grid[0] = sigma_min``."""
    return karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)


def karras_steps(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> list[float]:
    """A consistency model's ``steps``-step schedule: Karras spacing over ``steps + 1`` points without the last
    (a denoise at sigma_min is the identity). Float64 values, first = sigma_max."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return karras_sigmas(steps + 1, sigma_min, sigma_max, rho, dtype=torch.float64)[:-1].tolist()


def karras_index(sigma: float, n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> int:
    """The index (counted from sigma_max) of the point of the n-point Karras grid nearest ``sigma`` in
    ``sigma^(1/rho)``: the inverse of ``karras_sigmas``."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return round((sigma ** (1 / rho) - hi) / (lo - hi) * (n - 1))


def log_spaced(hi: float, lo: float, n: int) -> list[float]:
    """``n`` points strictly between ``hi`` and ``lo``, evenly spaced in log sigma (both ends excluded)."""
    return [math.exp(math.log(hi) + (math.log(lo) - math.log(hi)) * (i + 1) / (n + 1)) for i in range(n)]


def check_sigmas(sigmas, sigma_min: float, sigma_max: float, *, allow_zero_end: bool = False) -> torch.Tensor:
    """Validate a user's sigma list: non-empty, strictly descending, inside [sigma_min, sigma_max].

    Raises ``ValueError`` with a one-line reason and the fix.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("the sigma list is empty; give at least one noise level, e.g. sigmas=[80.0]")
    if not torch.isfinite(s).all():
        raise ValueError(f"the sigma list has non-finite values: {s.tolist()}")
    body = s[:-1] if (allow_zero_end and s.numel() > 1 and s[-1] == 0) else s
    if (body[1:] >= body[:-1]).any() or (allow_zero_end and body.numel() < s.numel() and body[-1] <= 0):
        raise ValueError(f"sigmas must be strictly descending, got {_fmt(s)}")
    tol = 1e-6 * sigma_max
    if body.max() > sigma_max + tol or body.min() < sigma_min - 1e-9:
        raise ValueError(f"sigmas must lie in [sigma_min, sigma_max] = [{sigma_min:g}, {sigma_max:g}], got {_fmt(s)}")
    return s


def _fmt(s: torch.Tensor) -> str:
    vals = [f"{v:g}" for v in s.tolist()]
    return "[" + ", ".join(vals if len(vals) <= 8 else vals[:4] + ["..."] + vals[-3:]) + "]"
