"""Noise levels in EDM units (``x_sigma = x_0 + sigma * z``): grids, scalings and noise-level samplers.

Layer 1: depends on torch only.
"""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5

# Every network cmkit builds (EDM teachers and consistency models alike) sees its noise level as
# c_noise = 250 log(sigma), the value openai's code and diffusers' CMStochasticIterativeScheduler use. One convention
# means a student initialised from an EDM teacher's weights starts with a time embedding that means the right thing
# (a VP/DDPM teacher's UNet was trained on timestep indices instead: copying it still helps CD, but less).
C_NOISE_SCALE = 250.0


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


def boundary_scalings(sigma, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
    """Consistency-model scalings ``(c_skip, c_out, c_in)`` with ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``.

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)
    c_out  = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning (Karras et al. 2022, Table 1): ``(c_skip, c_out, c_in)``.

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def c_noise(sigma) -> torch.Tensor:
    """The network's time input: ``250 log(sigma)`` (see ``C_NOISE_SCALE``)."""
    return C_NOISE_SCALE * torch.log(torch.as_tensor(sigma))


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad a per-sample tensor with singleton dims so it broadcasts against an ``ndim``-dim batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """A float or 0-/1-D tensor of noise levels as a shape ``(batch,)`` tensor on ``x``'s device and dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or have shape ({x.shape[0]},), got shape {tuple(s.shape)}")
    return s


def uniform_index_pairs(n_points: int, batch: int, device=None, generator=None) -> torch.Tensor:
    """Indices ``n`` uniform on ``{0, ..., n_points - 2}``: the pair (n, n+1) of an ascending N-point grid."""
    if n_points < 2:
        raise ValueError(f"a grid for index pairs needs at least 2 points, got {n_points}")
    return torch.randint(0, n_points - 1, (batch,), device=device, generator=generator)


def lognormal_sigmas(batch: int, p_mean: float = -1.2, p_std: float = 1.2, device=None, generator=None) -> torch.Tensor:
    """EDM training noise levels: ``log sigma ~ N(p_mean, p_std^2)``."""
    z = torch.randn(batch, device=device, generator=generator)
    return (p_mean + p_std * z).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``: unit effective weight across levels."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


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


def rho_interp(sigma_hi: float, sigma_lo: float, frac: float, rho: float = RHO) -> float:
    """The point a fraction ``frac`` of the way from sigma_hi to sigma_lo in ``sigma^(1/rho)`` space."""
    return (sigma_hi ** (1 / rho) + frac * (sigma_lo ** (1 / rho) - sigma_hi ** (1 / rho))) ** rho


__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "RHO", "SIGMA_DATA", "C_NOISE_SCALE", "karras_sigmas", "boundary_scalings",
    "edm_scalings", "c_noise", "append_dims", "as_batch_sigma", "uniform_index_pairs", "lognormal_sigmas",
    "edm_loss_weight", "check_sigmas", "rho_interp", "ct_num_points", "ct_target_mu", "ict_num_points",
    "lognormal_index_probs", "ect_r",
]


# ---- consistency-training curricula (Song et al. 2023; Song & Dhariwal 2023) -------------------------------------

def ct_num_points(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """CT's N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1: grid points at step k of K."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_mu(k: int, total: int, s0: int = 2, s1: int = 150, mu0: float = 0.9, variant: str = "openai") -> float:
    """CT's target EMA rate. paper: mu(k) = exp(s0 log(mu0) / N(k)); openai: the released code divides by
    N(k) - 1 (its number of intervals), which is what produced the published CT results."""
    n = ct_num_points(k, total, s0, s1)
    if variant == "paper":
        return math.exp(s0 * math.log(mu0) / n)
    if variant == "openai":
        return math.exp(s0 * math.log(mu0) / max(n - 1, 1))
    raise ValueError(f"unknown CT mu variant {variant!r}; choose 'openai' or 'paper'")


def ict_num_points(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


def lognormal_index_probs(grid_ascending: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised lognormal over pairs (n, n+1) of an ascending grid:
    p(n) ~ erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_n - P_mean) / (sqrt 2 P_std))."""
    e = torch.erf((grid_ascending.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return (p / p.sum()).float()


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0) -> torch.Tensor:
    """ECT's paired level r = max(t (1 - n(t) / q^(stage + 1)), 0) with n(t) = 1 + 8 sigmoid(-t): the gap shrinks
    by a factor q every stage. Computed in float64 so that late stages' tiny gaps t - r do not round to zero."""
    t64 = t.double()
    n = 1 + 8 * torch.sigmoid(-t64)
    return (t64 * (1 - n / q ** (stage + 1))).clamp_min(0)
