"""Consistency distillation (Song et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import RHO, append_dims, karras_ascending
from ..core.proposals import uniform_index_pairs
from ..solvers import SOLVERS, ode_step
from .base import BuildContext, LevelsConfig, register_objective
from .distances import WEIGHTINGS, make_distance
from .students import levels_within_teacher, student_from_teacher


@dataclass
class CDConfig(LevelsConfig):
    kind: str = "cd"
    n_points: int = 18                  # N of the Karras grid
    solver: str = "heun"                # the teacher's ODE step: any step solver (heun, euler, dpm2, ddim)
    distance: str = "l2"                # l2 | l1 | pseudo_huber | l2-32 | lpips[-vgg|-alex]
    huber_c: float | None = None        # pseudo_huber's c (default 0.00054 sqrt(d))
    weighting: str = "uniform"          # uniform | inverse_gap
    target_mu: float = 0.95             # target EMA rate; 0 = the stop-gradient online network


class ConsistencyDistillation:
    """With n uniform on the N-point Karras grid (ascending, sigma_1 = sigma_min):

        x_{n+1} = x0 + sigma_{n+1} z
        x_n     = one teacher ODE step from (x_{n+1}, sigma_{n+1}) to sigma_n      (no gradient)
        loss    = lambda(sigma_n, sigma_{n+1}) d( f(x_{n+1}, sigma_{n+1}),  f_target(x_n, sigma_n) )
    """

    def __init__(self, teacher, n_points: int = 18, solver: str = "heun", distance="l2", weighting: str = "uniform",
                 target_mu: float = 0.95, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = RHO, huber_c: float | None = None):
        if SOLVERS[solver].step is None:
            raise ValueError(f"objective.solver {solver!r} runs whole grids; CD needs a single-step solver")
        if n_points < 2:
            raise ValueError(f"objective.n_points must be >= 2, got {n_points}")
        self.teacher, self.solver, self.target_mu = teacher, solver, float(target_mu)
        self.weighting = WEIGHTINGS[weighting]
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance
        smin = teacher.sigma_min if sigma_min is None else sigma_min
        smax = teacher.sigma_max if sigma_max is None else sigma_max
        self.grid = karras_ascending(n_points, smin, smax, rho)  # grid[0] = sigma_min

    def target_ema(self, step: int) -> float:
        return self.target_mu

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        if self.grid.device != x0.device or self.grid.dtype != x0.dtype:
            self.grid = self.grid.to(device=x0.device, dtype=x0.dtype)
            if isinstance(self.distance, torch.nn.Module):
                self.distance.to(x0.device)
        n = uniform_index_pairs(x0.shape[0], len(self.grid), device=x0.device)
        s_n, s_np1 = self.grid[n], self.grid[n + 1]
        x_np1 = x0 + append_dims(s_np1, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            x_n = ode_step(self.teacher, x_np1, s_np1, s_n, solver=self.solver, **cond)
            f_target = (model if target is None else target)(x_n, s_n, **cond)
        f_online = model(x_np1, s_np1, **cond)
        return (self.weighting(s_np1, s_n) * self.distance(f_online, f_target)).mean()


@register_objective("cd", CDConfig, job="distill", teacher="required")
def build(cfg: CDConfig, ctx: BuildContext):
    """Consistency distillation of a teacher (a student started from its weights)."""
    model = student_from_teacher(cfg, ctx, wrap_vp=False)
    sigma_min, sigma_max = levels_within_teacher(cfg, ctx.teacher)
    return model, ConsistencyDistillation(ctx.teacher, cfg.n_points, cfg.solver, ctx.distance or cfg.distance,
                                          cfg.weighting, cfg.target_mu, sigma_min, sigma_max, huber_c=cfg.huber_c)
