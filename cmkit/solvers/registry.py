"""The solver registry and the probability-flow ODE every solver integrates: ``dx/dsigma = (x - D(x, sigma)) / sigma``.

Two shapes, one signature each:
- a *step* solver ``step(den, x, sigma_from, sigma_to, **cond) -> x`` moves one step (per-sample sigmas allowed);
  distillation targets take single steps, and a grid solve is a loop of them (with Karras churn if asked);
- a *grid* solver ``solve(den, x, sigmas, **cond) -> x`` runs a whole descending grid itself (multistep methods).
Any other method name is handed to torchdiffeq (``solve.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import Registry, append_dims, as_batch_sigma


@dataclass(frozen=True)
class Solver:
    name: str
    evals_per_step: int                 # denoiser evaluations a step costs (the last step to sigma = 0 costs 1)
    step: Callable | None = None        # step solvers
    solve: Callable | None = None       # grid solvers


SOLVERS: Registry[Solver] = Registry("solver")


def step_solver(name: str, evals_per_step: int):
    """Register ``step(den, x, sigma_from, sigma_to, **cond)`` under ``name``."""
    def add(fn):
        SOLVERS.register(name, Solver(name, evals_per_step, step=fn))
        return fn
    return add


def grid_solver(name: str, evals_per_step: int):
    """Register ``solve(den, x, sigmas, **cond)`` (sigmas: a descending list of floats, may end at 0)."""
    def add(fn):
        SOLVERS.register(name, Solver(name, evals_per_step, solve=fn))
        return fn
    return add


def step_solvers() -> list[str]:
    return [n for n, s in SOLVERS.items() if s.step is not None]


def pf_ode_drift(den, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
    """``(x - D(x, sigma)) / sigma``; ``sigma`` a float or shape (batch,). At sigma = inf, where the state holds
    the unit noise eps, the drift's limit: eps."""
    s = as_batch_sigma(sigma, x)
    drift = (x - den(x, s, **cond)) / append_dims(s, x.ndim)
    return torch.where(append_dims(torch.isinf(s), x.ndim), x, drift)
