"""Single-step PF-ODE solvers (one function each, one signature): Euler, DDIM, Heun and DPM-Solver-2.

A step may start at sigma = inf (pure noise, where flow-matching pipelines start), where the state holds the unit
noise ``eps = lim x / sigma`` (``core.schedules``). Euler written in data-prediction form,
``x' = D + sigma' (x - D) / sigma``, is finite there: ``x' = D(eps, inf) + sigma' eps``, exactly the first step of
diffusers' flow-matching Euler. A second-order correction has no meaning over an infinite interval, so Heun and
DPM-Solver-2 take Euler's step from sigma = inf (and to sigma = 0).
"""

from __future__ import annotations

import math

import torch

from ..core import append_dims, as_batch_sigma
from .registry import pf_ode_drift, step_solver


def _to_zero(sigma_to) -> bool:
    """A step to sigma = 0 given as a number: Euler's answer is final there. (Per-sample tensors are not checked,
    which would cost a host-device sync every training step; ``torch.where`` keeps Euler's answer where they are 0.)"""
    return not torch.is_tensor(sigma_to) and float(sigma_to) == 0.0


def _from_inf(sigma_from) -> bool:
    """A step from sigma = inf given as a number (per-sample tensors are handled by ``torch.where``)."""
    return not torch.is_tensor(sigma_from) and math.isinf(float(sigma_from))


def _euler(den, x, s0, s1, **cond):
    """Euler's step and the drift at its start; from sigma = inf, ``D + sigma_to eps`` (the limit of the step)."""
    x0 = den(x, s0, **cond)
    inf = append_dims(torch.isinf(s0), x.ndim)
    d0 = torch.where(inf, x, (x - x0) / append_dims(s0, x.ndim))
    x1 = x + append_dims(s1 - s0, x.ndim) * d0
    return torch.where(inf, x0 + append_dims(s1, x.ndim) * d0, x1), d0


@step_solver("euler", evals_per_step=1)
def euler(den, x: torch.Tensor, sigma_from, sigma_to, **cond) -> torch.Tensor:
    """``x + (sigma_to - sigma_from) d(x, sigma_from)``."""
    return _euler(den, x, as_batch_sigma(sigma_from, x), as_batch_sigma(sigma_to, x), **cond)[0]


# Deterministic DDIM is exactly an Euler step of the PF-ODE in sigma space (Karras et al. 2022, section 3); named
# for users who look for it (a test checks it against diffusers' DDIMScheduler).
step_solver("ddim", evals_per_step=1)(euler)


@step_solver("heun", evals_per_step=2)
def heun(den, x: torch.Tensor, sigma_from, sigma_to, **cond) -> torch.Tensor:
    """The trapezoidal correction with d at the Euler endpoint (Karras Algorithm 1); Euler where ``sigma_to == 0``
    (the drift is undefined there)."""
    s0, s1 = as_batch_sigma(sigma_from, x), as_batch_sigma(sigma_to, x)
    x1, d0 = _euler(den, x, s0, s1, **cond)
    if _to_zero(sigma_to) or _from_inf(sigma_from):
        return x1
    nonzero = (s1 > 0) & torch.isfinite(s0)
    # evaluate the second drift with a safe sigma where sigma_to == 0, then keep Euler's answer there
    d1 = pf_ode_drift(den, x1, torch.where(nonzero, s1, s0), **cond)
    x2 = x + append_dims(s1 - s0, x.ndim) * (d0 + d1) / 2
    return torch.where(append_dims(nonzero, x.ndim), x2, x1)


@step_solver("dpm2", evals_per_step=2)
def dpm2(den, x: torch.Tensor, sigma_from, sigma_to, **cond) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022) as k-diffusion writes it: Euler to the geometric midpoint, then the full step
    with the midpoint's drift; Euler where ``sigma_to == 0``."""
    s0, s1 = as_batch_sigma(sigma_from, x), as_batch_sigma(sigma_to, x)
    x1, d0 = _euler(den, x, s0, s1, **cond)
    if _to_zero(sigma_to) or _from_inf(sigma_from):
        return x1
    nonzero = (s1 > 0) & torch.isfinite(s0)
    s_mid = torch.where(nonzero, (s0.log().lerp(s1.clamp_min(1e-30).log(), 0.5)).exp(), s0)
    x_mid = x + append_dims(s_mid - s0, x.ndim) * d0
    x2 = x + append_dims(s1 - s0, x.ndim) * pf_ode_drift(den, x_mid, s_mid, **cond)
    return torch.where(append_dims(nonzero, x.ndim), x2, x1)


@step_solver("consistency", evals_per_step=1)
def consistency(den, x: torch.Tensor, sigma_from, sigma_to, **cond) -> torch.Tensor:
    """Multistep consistency sampling: denoise, then re-noise with fresh noise, ``D(x, sigma_from) + sigma_to eps``
    (``eps`` from torch's global generator, as ``FlowMatchLCMScheduler`` draws it when a pipeline passes none; a
    model with ``fresh_noise(like)`` draws it in its pipeline's latent layout, so the same seed gives the same
    noise). A consistency model's sampler; on a diffusion model it is a stochastic (and poor) one."""
    x0 = den(x, as_batch_sigma(sigma_from, x), **cond)
    if _to_zero(sigma_to):
        return x0
    eps = den.fresh_noise(x0) if hasattr(den, "fresh_noise") else torch.randn_like(x0)
    return x0 + append_dims(as_batch_sigma(sigma_to, x), x.ndim) * eps
