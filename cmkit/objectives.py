"""Training objectives. Each is a small class whose ``__call__`` reads like its paper's equation.

Layer 4. Uniform signature: ``objective(model, x0, target=None, **cond) -> scalar loss``, where ``model`` is the
network being trained (a denoiser for teachers, a consistency model otherwise) and ``target`` the target network
(None: the stop-gradient online network). ``target_ema(step)`` gives the target's EMA rate mu at a step
(0 means no separate target network is kept). Randomness comes from torch's global generator, which the trainer
seeds once per step, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from . import sigmas as S
from .losses import distance, make_distance, weighting
from .ode import ode_step


class EDMLoss:
    """Karras et al. (2022): ``lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2`` with ``log sigma ~ N(P_mean, P_std^2)``."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = S.SIGMA_DATA):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def target_ema(self, step: int) -> float:
        return 0.0

    def __call__(self, model, x0: torch.Tensor, target=None, **cond) -> torch.Tensor:
        sigma = S.lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, device=x0.device).to(x0.dtype)
        noisy = x0 + S.append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        denoised = model(noisy, sigma, **cond)
        return (S.edm_loss_weight(sigma, self.sigma_data) * distance("l2", denoised, x0)).mean()


class DDPMLoss:
    """Ho et al. (2020) for a ``DiffusersDenoiser``: t uniform over the scheduler's table, and the loss in the
    network's own target space written through x0 (so the trainer still only sees a denoiser):

        epsilon:      ||eps_hat - eps||^2 = ||x0_hat - x0||^2 / sigma^2
        v_prediction: ||v_hat - v||^2     = ||x0_hat - x0||^2 (1 + sigma^2) / sigma^2
        sample:       ||x0_hat - x0||^2
    """

    def __init__(self, log_sigmas: torch.Tensor, prediction_type: str = "epsilon"):
        self.sigmas = log_sigmas.exp().float()
        self.prediction_type = prediction_type

    def target_ema(self, step: int) -> float:
        return 0.0

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return 1 / sigma**2
        if self.prediction_type == "v_prediction":
            return (1 + sigma**2) / sigma**2
        return torch.ones_like(sigma)

    def __call__(self, model, x0: torch.Tensor, target=None, **cond) -> torch.Tensor:
        table = self.sigmas.to(x0.device)
        sigma = table[torch.randint(0, len(table), (x0.shape[0],), device=x0.device)].to(x0.dtype)
        noisy = x0 + S.append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        return (self.weight(sigma) * distance("l2", model(noisy, sigma, **cond), x0)).mean()


class ConsistencyDistillation:
    """Song et al. (2023), CD: with n uniform on the N-point Karras grid (ascending, sigma_1 = sigma_min),

        x_{n+1} = x0 + sigma_{n+1} z
        x_n     = one teacher ODE step from (x_{n+1}, sigma_{n+1}) to sigma_n      (no gradient)
        loss    = lambda(sigma_n, sigma_{n+1}) d( f(x_{n+1}, sigma_{n+1}),  f_target(x_n, sigma_n) )
    """

    def __init__(self, teacher, n_points: int = 18, solver: str = "heun", distance: str = "l2",
                 weighting: str = "uniform", target_mu: float = 0.95, sigma_min: float | None = None,
                 sigma_max: float | None = None, rho: float = S.RHO, huber_c: float | None = None):
        self.teacher = teacher
        self.solver, self.weighting, self.target_mu = solver, weighting, float(target_mu)
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance
        smin = teacher.sigma_min if sigma_min is None else sigma_min
        smax = teacher.sigma_max if sigma_max is None else sigma_max
        self.grid = S.karras_sigmas(n_points, smin, smax, rho).flip(0)  # ascending: grid[0] = sigma_min

    def target_ema(self, step: int) -> float:
        return self.target_mu

    def __call__(self, model, x0: torch.Tensor, target=None, **cond) -> torch.Tensor:
        grid = self.grid.to(device=x0.device, dtype=x0.dtype)
        n = S.uniform_index_pairs(len(grid), x0.shape[0], device=x0.device)
        s_n, s_np1 = grid[n], grid[n + 1]
        x_np1 = x0 + S.append_dims(s_np1, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            x_n = ode_step(self.teacher, x_np1, s_np1, s_n, solver=self.solver, **cond)
            f_target = (model if target is None else target)(x_n, s_n, **cond)
        f_online = model(x_np1, s_np1, **cond)
        if isinstance(self.distance, torch.nn.Module):
            self.distance.to(x0.device)
        d = self.distance(f_online, f_target)
        return (weighting(self.weighting, s_np1, s_n) * d).mean()
