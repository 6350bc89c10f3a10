"""Time proposals: the noise levels (or times) a training objective draws each step, one function per proposal, in
one place. Each is written in its schedule's native time and carried to sigma by that schedule's own exact maps
(``schedules.py``'s ``shift_times``, ``FlowMatchSchedule`` and ``TrigFlowSchedule``, named in ``trigflow.py``), so
no objective re-derives one.

Every proposal takes ``(batch, <its parameters>, *, device=None, dtype=None, generator=None)``: it draws on
``device`` with torch's global generator unless ``generator`` is given, in float32 (the shifted uniform in float64),
and casts the result to ``dtype`` last. The order and form of the random calls are part of the contract: a resumed
run, or a re-run with the same seed, draws the same numbers.

- ``lognormal_sigmas`` (EDM, ECT): ``log sigma ~ N(P_mean, P_std^2)``;
- ``lognormal_index_pairs`` (iCT): the same log-normal discretised over the pairs (n, n+1) of a grid;
- ``uniform_index_pairs`` (CT, CD, flow CD): n uniform over the pairs (n, n+1) of a grid;
- ``uniform_indices`` (DDPM, LCM): a timestep uniform over a table;
- ``logit_normal_times`` (flow matching, SD3's recipe): ``t = shift(sigmoid(m + s n))``;
- ``shifted_uniform_sigmas`` (rCM's DMD noise): ``sigma = s / (1 - s)``, ``s = shift(u)``, ``u ~ U(0, 1)``;
- ``trigflow_times`` (sCT, sCD, latent sCD, rCM): ``sigma_d tan t = e^tau``, ``tau ~ N(P_mean, P_std^2)``;
- ``meanflow_times`` (MeanFlow): two logit-normal times, t the larger, and r = t for a share of pairs.

(The proposals are functions of the objective's own settings, not methods of a schedule object: EDM, ECT, CT and
LCM train without one, and one schedule, flow matching, has three proposals with different parameters.)
"""

from __future__ import annotations

import math

import torch

from .scalings import SIGMA_DATA
from .schedules import shift_times
from .trigflow import flow_to_sigma, sigma_to_trig


def _cast(x: torch.Tensor, dtype) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def lognormal_sigmas(batch: int, p_mean: float = -1.2, p_std: float = 1.2, lo: float | None = None,
                     hi: float | None = None, *, device=None, dtype=None, generator=None) -> torch.Tensor:
    """EDM's (and ECT's) noise levels: ``log sigma ~ N(P_mean, P_std^2)``, clamped to ``[lo, hi]`` where given."""
    sigma = (p_mean + p_std * torch.randn(batch, device=device, generator=generator)).exp()
    if lo is not None or hi is not None:
        sigma = sigma.clamp(lo, hi)
    return _cast(sigma, dtype)


def lognormal_index_probs(grid_ascending: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's discretised lognormal over pairs (n, n+1) of an ascending grid:
    p(n) ~ erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_n - P_mean) / (sqrt 2 P_std))."""
    e = torch.erf((grid_ascending.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return (p / p.sum()).float()


def lognormal_index_pairs(batch: int, probs: torch.Tensor, *, generator=None) -> torch.Tensor:
    """iCT's pair indices n ~ ``probs`` (``lognormal_index_probs`` of the step's grid), on the table's device."""
    return torch.multinomial(probs, batch, replacement=True, generator=generator)


def uniform_index_pairs(batch: int, n_points: int, *, device=None, generator=None) -> torch.Tensor:
    """Indices ``n`` uniform on ``{0, ..., n_points - 2}``: the pair (n, n+1) of an N-point grid."""
    if n_points < 2:
        raise ValueError(f"a grid for index pairs needs at least 2 points, got {n_points}")
    return torch.randint(0, n_points - 1, (batch,), device=device, generator=generator)


def uniform_indices(batch: int, n: int, *, device=None, generator=None) -> torch.Tensor:
    """Indices uniform on ``{0, ..., n - 1}``: a timestep of a table (DDPM's training draw, LCM's skipping grid)."""
    return torch.randint(0, n, (batch,), device=device, generator=generator)


def logit_normal_times(batch: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, eps: float = 0.0, *,
                       device=None, dtype=None, generator=None) -> torch.Tensor:
    """SD3's flow-matching times: ``u = sigmoid(mean + std n)``, then the scheduler's static shift
    ``t = shift u / (1 + (shift - 1) u)``, clamped to ``[eps, 1 - eps]`` (eps > 0 keeps sigma finite)."""
    u = torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))
    t = shift_times(u, shift)
    return _cast(t.clamp(eps, 1 - eps) if eps else t, dtype)


def shifted_uniform_sigmas(batch: int, shift: float, lo: float | None = None, hi: float | None = None, *,
                           device=None, dtype=None, generator=None) -> torch.Tensor:
    """rCM's DMD noise levels: flow time ``s = shift u / (1 + (shift - 1) u)``, ``u ~ U(0, 1)`` (drawn in float64),
    ``sigma = s / (1 - s)``, clamped to ``[lo, hi]`` where given."""
    u = torch.rand(batch, device=device, dtype=torch.float64, generator=generator)
    sigma = flow_to_sigma(shift_times(u, shift))
    if lo is not None or hi is not None:
        sigma = sigma.clamp(lo, hi)
    return _cast(sigma, dtype)


def trigflow_times(batch: int, p_mean: float = -1.0, p_std: float = 1.4, sigma_data: float = SIGMA_DATA,
                   sigma_min: float = 0.0, sigma_max: float = math.inf, *, device=None, dtype=None,
                   generator=None) -> torch.Tensor:
    """sCM's TrigFlow times: ``sigma_d tan t = e^tau``, ``tau ~ N(P_mean, P_std^2)`` (a log-normal sigma, carried to
    ``t = arctan(sigma / sigma_d)``), clamped to the times of ``[sigma_min, sigma_max]`` (computed in float64)."""
    t_min, t_max = (float(sigma_to_trig(torch.tensor(s, dtype=torch.float64), sigma_data))
                    for s in (sigma_min, sigma_max))
    t = sigma_to_trig(lognormal_sigmas(batch, p_mean, p_std, device=device, generator=generator), sigma_data)
    return _cast(t.clamp(t_min, t_max), dtype)


def meanflow_times(batch: int, p_mean: float = -0.4, p_std: float = 1.0, r_neq_t: float = 0.25, *, device=None,
                   dtype=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's ``(r, t)``: two logit-normal draws ``sigmoid(P_mean + P_std n)``, t the larger, r the smaller; a
    share ``1 - r_neq_t`` of pairs has ``r = t`` (plain flow matching)."""
    a, b = torch.sigmoid(p_mean + p_std * torch.randn(2, batch, device=device, generator=generator))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r = torch.where(torch.rand(batch, device=device, generator=generator) < r_neq_t, r, t)
    return _cast(r, dtype), _cast(t, dtype)
