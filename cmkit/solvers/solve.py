"""Whole-trajectory PF-ODE solves by solver name (fixed-step, multistep, or adaptive through torchdiffeq), single
steps by name, and teacher grids of an exact number of evaluations."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torchdiffeq import odeint

from ..core import RHO, karras_sigmas
from .registry import SOLVERS, step_solvers


def ode_step(den, x: torch.Tensor, sigma_from, sigma_to, solver: str = "heun", **cond) -> torch.Tensor:
    """One step of a registered step solver from ``sigma_from`` to ``sigma_to`` (floats or per-sample tensors)."""
    s = SOLVERS[solver]
    if s.step is None:
        raise ValueError(f"solver {solver!r} runs whole grids, not single steps; choose one of "
                         f"{', '.join(step_solvers())}")
    return s.step(den, x, sigma_from, sigma_to, **cond)


def ode_solve(den, x: torch.Tensor, sigmas, method: str = "heun", rtol: float = 1e-5, atol: float = 1e-5,
              return_nfe: bool = False, churn: float = 0.0, churn_range: tuple[float, float] = (0.0, math.inf),
              churn_noise: float = 1.0, noise: torch.Tensor | None = None, **cond):
    """Integrate the PF-ODE from ``sigmas[0]`` through ``sigmas[-1]`` (a descending grid; may end at 0).

    ``method``: a registered step solver ("euler", "heun", "dpm2", "ddim") steps along the grid; a grid solver
    ("dpmpp_2m", "unipc") runs it; anything else ("dopri5", "rk4", "bosh3", ...) is handed to ``torchdiffeq.odeint``
    in the variable log(sigma), with the grid as output times and ``rtol``/``atol`` as tolerances (a final 0 is reached
    by one exact denoise, since the drift is singular there). ``sigmas[0]`` may be ``inf`` (pure noise, where
    flow-matching pipelines start): then ``x`` holds the unit noise eps and the first step is Euler's exact limit
    ``D(eps, inf) + sigma_1 eps`` (Heun, DPM-Solver-2 and adaptive methods take that step too). Returns the end
    state, and with ``return_nfe`` also the number of network passes (denoiser evaluations, a guided one counting two).

    ``churn`` (S_churn) turns a step-solver solve into Karras et al.'s stochastic sampler (Algorithm 2): before the
    step from sigma_i, where sigma_i lies in ``churn_range`` (S_tmin, S_tmax), noise raises the level to
    sigma_hat = sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1), N the number of steps:
    x <- x + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps, and the step runs from sigma_hat. No extra evaluations.
    ``noise`` (shape (N, *x.shape)) supplies each step's eps; by default they are drawn with torch.randn.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sig.numel() < 2:
        raise ValueError("ode_solve needs at least two sigmas (start and end)")
    if (sig[1:] >= sig[:-1]).any():
        raise ValueError(f"ode_solve needs a strictly descending sigma grid, got {sig.tolist()}")
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    nfe = 0

    passes = getattr(den, "passes", None)  # guided denoisers cost two network passes a call

    def counted(xx, s, **c):
        nonlocal nfe
        nfe += passes(**c) if passes is not None else 1
        return den(xx, s, **c)
    if hasattr(den, "fresh_noise"):  # a re-noising step draws in the model's pipeline layout (solvers/steps.py)
        counted.fresh_noise = den.fresh_noise

    solver = SOLVERS[method] if method in SOLVERS else None
    if churn and (solver is None or solver.step is None):
        raise ValueError(f"churn runs with the step solvers ({', '.join(step_solvers())}), not {method!r}")
    if solver is not None and solver.step is not None:
        x = _step_along(solver.step, counted, x, sig.tolist(), churn, churn_range, churn_noise, noise, cond)
    elif solver is not None:
        x = solver.solve(counted, x, sig.tolist(), **cond)
    else:
        x = _adaptive(counted, x, sig, method, rtol, atol, cond)
    return (x, nfe) if return_nfe else x


def _step_along(step, den, x, sigmas: list[float], churn, churn_range, churn_noise, noise, cond):
    gamma = min(churn / (len(sigmas) - 1), math.sqrt(2) - 1)
    for i, (s0, s1) in enumerate(pairwise(sigmas)):
        if gamma > 0 and churn_range[0] <= s0 <= churn_range[1] and math.isfinite(s0):
            s_hat = s0 * (1 + gamma)
            eps = noise[i] if noise is not None else torch.randn_like(x)
            x = x + math.sqrt(s_hat**2 - s0**2) * churn_noise * eps
            s0 = s_hat
        x = step(den, x, s0, s1, **cond)
    return x


def _adaptive(den, x, sig: torch.Tensor, method: str, rtol: float, atol: float, cond: dict):
    if math.isinf(float(sig[0])):  # no integrator starts at infinity: Euler's exact-limit step to the next sigma
        x = SOLVERS["euler"].step(den, x, float(sig[0]), float(sig[1]), **cond)
        if sig.numel() == 2:
            return x
        sig = sig[1:]
    end_zero = float(sig[-1]) == 0.0
    grid = sig[:-1] if end_zero else sig

    # Integrate in u = log sigma: dx/du = sigma dx/dsigma = x - D(x, sigma). The drift stays O(1) near sigma_min,
    # where dx/dsigma blows up like 1/sigma and makes adaptive steps underflow.
    def f(u, y):
        s = u.exp().to(y.dtype)
        return y - den(y, s.expand(y.shape[0]), **cond)

    if grid.numel() >= 2:
        try:
            x = odeint(f, x, grid.log().to(x.device), method=method, rtol=rtol, atol=atol)[-1]
        except AssertionError as e:  # torchdiffeq's way of saying it does not know a method
            if "method" not in str(e).lower():
                raise
            raise ValueError(f"unknown solver {method!r}: not a cmkit solver ({', '.join(SOLVERS.names())}) nor a "
                             "torchdiffeq method (dopri5, rk4, bosh3, ...)") from None
    if end_zero:
        x = den(x, float(grid[-1]), **cond)
    return x


def teacher_grid(nfe: int, solver: str, sigma_min: float, sigma_max: float, rho: float = RHO) -> list[float]:
    """A Karras grid ending in 0 whose solve costs exactly ``nfe`` denoiser evaluations with ``solver``.

    One-evaluation solvers (euler, ddim, dpmpp_2m, unipc): nfe + 1 points. Two-evaluation solvers (heun, dpm2): 2
    evaluations a step except the last (Euler to 0), so nfe must be odd.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    per_step = SOLVERS[solver].evals_per_step
    if per_step == 1:
        n_points = nfe
    else:
        if nfe % 2 == 0:
            raise ValueError(f"{solver} reaches only odd NFE (2n - 1), got {nfe}")
        n_points = (nfe + 1) // 2
    return karras_sigmas(n_points, sigma_min, sigma_max, rho, dtype=torch.float64).tolist() + [0.0]
