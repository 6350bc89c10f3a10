"""The probability-flow ODE of any denoiser: ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Layer 3. Single deterministic steps (for distillation targets and fixed-grid sampling) and whole-trajectory solves,
adaptive ones through torchdiffeq.
"""

from __future__ import annotations

import math

import torch
from torchdiffeq import odeint

from . import sigmas as S

# single-step solvers (ode_step) and the grid solvers ode_solve runs itself; "ddim" is Euler: deterministic DDIM is
# exactly an Euler step of the PF-ODE in sigma space (Karras et al. 2022, section 3), named for users who look for it
FIXED_STEP_SOLVERS = ("euler", "heun", "dpm2", "ddim")
GRID_SOLVERS = FIXED_STEP_SOLVERS + ("dpmpp_2m",)


def pf_ode_drift(den, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
    """``(x - D(x, sigma)) / sigma``; ``sigma`` a float or shape (batch,)."""
    s = S.as_batch_sigma(sigma, x)
    return (x - den(x, s, **cond)) / S.append_dims(s, x.ndim)


def ode_step(den, x: torch.Tensor, sigma_from, sigma_to, solver: str = "heun", **cond) -> torch.Tensor:
    """One solver step from ``sigma_from`` to ``sigma_to`` (floats or per-sample tensors); no randomness.

    euler: x + h d(x, s);  heun: the trapezoidal correction with d at the Euler endpoint (Karras Algorithm 1),
    which falls back to Euler where ``sigma_to == 0`` (the drift is undefined there).
    """
    if solver not in FIXED_STEP_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(FIXED_STEP_SOLVERS)}")
    s0 = S.as_batch_sigma(sigma_from, x)
    s1 = S.as_batch_sigma(sigma_to, x)
    h = S.append_dims(s1 - s0, x.ndim)
    d0 = pf_ode_drift(den, x, s0, **cond)
    x1 = x + h * d0
    if solver in ("euler", "ddim"):
        return x1
    nonzero = s1 > 0
    if not bool(nonzero.any()):
        return x1
    if solver == "dpm2":
        # DPM-Solver-2 (Lu et al. 2022) as k-diffusion writes it: Euler to the geometric midpoint, then the full
        # step with the midpoint's drift
        s_mid = torch.where(nonzero, (s0.log().lerp(s1.clamp_min(1e-30).log(), 0.5)).exp(), s0)
        x_mid = x + S.append_dims(s_mid - s0, x.ndim) * d0
        x2 = x + h * pf_ode_drift(den, x_mid, s_mid, **cond)
        return torch.where(S.append_dims(nonzero, x.ndim), x2, x1)
    # Evaluate the second drift with a safe sigma where sigma_to == 0, then keep Euler's answer there.
    d1 = pf_ode_drift(den, x1, torch.where(nonzero, s1, s0), **cond)
    x2 = x + h * (d0 + d1) / 2
    return torch.where(S.append_dims(nonzero, x.ndim), x2, x1)


def ode_solve(den, x: torch.Tensor, sigmas, method: str = "heun", rtol: float = 1e-5, atol: float = 1e-5,
              return_nfe: bool = False, churn: float = 0.0, churn_range: tuple[float, float] = (0.0, math.inf),
              churn_noise: float = 1.0, noise: torch.Tensor | None = None, **cond):
    """Integrate the PF-ODE from ``sigmas[0]`` through ``sigmas[-1]`` (a descending grid; may end at 0).

    ``method``: "euler" / "heun" / "dpm2" / "ddim" (= euler) step along the grid, "dpmpp_2m" is the multistep
    DPM-Solver++(2M) along it (one evaluation per step); anything else ("dopri5", "rk4", "bosh3", ...) is handed to
    ``torchdiffeq.odeint`` in the variable log(sigma), with the grid as output times and ``rtol``/``atol`` as
    tolerances (a final 0 is reached by one exact denoise, since the drift is singular there). Returns the end state,
    and with ``return_nfe`` also the number of denoiser evaluations.

    ``churn`` (S_churn) turns a fixed-step solve into Karras et al.'s stochastic sampler (Algorithm 2): before the
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
    nfe = 0

    def counted(xx, s):
        nonlocal nfe
        nfe += 1
        return den(xx, s, **cond)

    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    if churn and method not in FIXED_STEP_SOLVERS:
        raise ValueError(f"churn runs with the fixed-step solvers ({', '.join(FIXED_STEP_SOLVERS)}), not {method!r}")
    if method in FIXED_STEP_SOLVERS:
        gamma = min(churn / (sig.numel() - 1), math.sqrt(2) - 1)
        for i, (s0, s1) in enumerate(zip(sig[:-1].tolist(), sig[1:].tolist())):
            if gamma > 0 and churn_range[0] <= s0 <= churn_range[1]:
                s_hat = s0 * (1 + gamma)
                eps = noise[i] if noise is not None else torch.randn_like(x)
                x = x + math.sqrt(s_hat**2 - s0**2) * churn_noise * eps
                s0 = s_hat
            x = ode_step(counted, x, s0, s1, solver=method)
    elif method == "dpmpp_2m":
        x = _dpmpp_2m(counted, x, sig.tolist())
    else:
        end_zero = float(sig[-1]) == 0.0
        grid = sig[:-1] if end_zero else sig

        # Integrate in u = log sigma: dx/du = sigma dx/dsigma = x - D(x, sigma). The drift stays O(1) near
        # sigma_min, where dx/dsigma blows up like 1/sigma and makes adaptive steps underflow.
        def f(u, y):
            s = u.exp().to(y.dtype)
            return y - counted(y, s.expand(y.shape[0]))

        if grid.numel() >= 2:
            x = odeint(f, x, grid.log().to(x.device), method=method, rtol=rtol, atol=atol)[-1]
        if end_zero:
            x = counted(x, float(grid[-1]))
    return (x, nfe) if return_nfe else x


def _dpmpp_2m(den, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form, with t = -log sigma and h = t_next - t:

        x <- (sigma_next / sigma) x - expm1(-h) D',   D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_last / h

    (first step and the step to sigma = 0 use D' = D_i)."""
    old = None
    for i, (s0, s1) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = den(x, s0)
        if s1 == 0:
            return d
        h = math.log(s0) - math.log(s1)
        if old is not None:
            r = (math.log(sigmas[i - 1]) - math.log(s0)) / h
            d_use = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        else:
            d_use = d
        x = (s1 / s0) * x - math.expm1(-h) * d_use
        old = d
    return x
