"""Training objectives. Each is a small class whose ``__call__`` reads like its paper's equation.

Layer 4. Uniform signature: ``objective(model, x0, target=None, step=0, **cond) -> scalar loss``, where ``model``
is the network being trained (a denoiser for teachers, a consistency model otherwise), ``target`` the target network
(None: the stop-gradient online network) and ``step`` the optimiser step (for curricula). ``target_ema(step)`` gives the target's EMA rate mu at a step
(0 means no separate target network is kept). Randomness comes from torch's global generator, which the trainer
seeds once per step, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math

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

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
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

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
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

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
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


def _paired_passes(model, target, x_hi, s_hi, x_lo, s_lo, **cond):
    """``(f_online(x_hi, s_hi), f_target(x_lo, s_lo))`` with the target pass under no_grad and both passes
    drawing the same dropout masks (iCT): the target pass runs on a forked RNG state, the online pass then
    starts from the same state."""
    devices = [x_hi.device] if x_hi.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        f_target = (model if target is None else target)(x_lo, s_lo, **cond)
    return model(x_hi, s_hi, **cond), f_target


class ConsistencyTraining:
    """Consistency training without a teacher: the pair shares one noise draw,

        x_{n+1} = x0 + sigma_{n+1} z,   x_n = x0 + sigma_n z,
        loss    = lambda(sigma_n, sigma_{n+1}) d( f(x_{n+1}, sigma_{n+1}), f_target(x_n, sigma_n) )

    on a Karras grid of N(k) points that grows with the step k.

    variant "ct"  (Song et al. 2023): N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, n uniform,
                  target EMA mu(k) = exp(s0 log mu0 / N(k)) ("paper") or / (N(k) - 1) ("openai", default).
    variant "ict" (Song & Dhariwal 2023): N(k) = min(s0 2^floor(k/K'), s1) + 1, n from the discretised lognormal
                  (P_mean, P_std), target = stop-gradient online network (mu = 0), shared dropout masks.
    """

    def __init__(self, variant: str = "ict", total_steps: int = 400_000, s0: int | None = None,
                 s1: int | None = None, mu0: float = 0.9, mu_variant: str = "openai", p_mean: float = -1.1,
                 p_std: float = 2.0, distance: str = "pseudo_huber", weighting: str | None = None,
                 sigma_min: float = S.SIGMA_MIN, sigma_max: float = S.SIGMA_MAX, rho: float = S.RHO,
                 huber_c: float | None = None):
        if variant not in ("ct", "ict"):
            raise ValueError(f"unknown consistency-training variant {variant!r}; choose 'ct' or 'ict'")
        self.variant, self.total = variant, int(total_steps)
        self.s0 = s0 if s0 is not None else (2 if variant == "ct" else 10)
        self.s1 = s1 if s1 is not None else (150 if variant == "ct" else 1280)
        self.mu0, self.mu_variant, self.p_mean, self.p_std = mu0, mu_variant, p_mean, p_std
        self.weighting = weighting or ("uniform" if variant == "ct" else "inverse_gap")
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        S.ct_target_mu(0, 1, self.s0, self.s1, mu0, mu_variant)  # rejects an unknown mu_variant now, not at step 1

    def num_points(self, step: int) -> int:
        if self.variant == "ct":
            return S.ct_num_points(step, self.total, self.s0, self.s1)
        return S.ict_num_points(step, self.total, self.s0, self.s1)

    def target_ema(self, step: int) -> float:
        if self.variant == "ict":
            return 0.0
        return S.ct_target_mu(step, self.total, self.s0, self.s1, self.mu0, self.mu_variant)

    def grid(self, step: int) -> torch.Tensor:
        """The ascending grid at this step (grid[0] = sigma_min)."""
        return S.karras_sigmas(self.num_points(step), self.sigma_min, self.sigma_max, self.rho).flip(0)

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        grid = self.grid(step).to(device=x0.device, dtype=x0.dtype)
        if self.variant == "ct":
            n = S.uniform_index_pairs(len(grid), x0.shape[0], device=x0.device)
        else:
            probs = S.lognormal_index_probs(grid, self.p_mean, self.p_std).to(x0.device)
            n = torch.multinomial(probs, x0.shape[0], replacement=True)
        s_n, s_np1 = grid[n], grid[n + 1]
        z = torch.randn_like(x0)
        x_np1 = x0 + S.append_dims(s_np1, x0.ndim) * z
        x_n = x0 + S.append_dims(s_n, x0.ndim) * z
        f_online, f_target = _paired_passes(model, target, x_np1, s_np1, x_n, s_n, **cond)
        if isinstance(self.distance, torch.nn.Module):
            self.distance.to(x0.device)
        return (weighting(self.weighting, s_np1, s_n) * self.distance(f_online, f_target)).mean()


class EasyConsistencyTuning:
    """ECT (Geng et al. 2024), fine-tuning a model initialised from a diffusion teacher's weights, with continuous
    pairs: t ~ lognormal(P_mean, P_std) (clamped to the model's range), r = max(t (1 - n(t) / q^(stage + 1)), 0),
    n(t) = 1 + 8 sigmoid(-t), stage = floor(k / d). One noise draw and one dropout mask for both passes:

        loss = 1 / (t - r) d( f(x0 + t z, t), sg f(x0 + r z, r) ),   and f(., r) := x0 where r < sigma_min.
    """

    MIN_GAP = 1e-3  # relative: t - r >= MIN_GAP t, so late stages cannot divide by a vanishing gap

    def __init__(self, q: float = 2.0, stage_steps: int = 1000, p_mean: float = -1.1, p_std: float = 2.0,
                 distance: str = "pseudo_huber", sigma_min: float = S.SIGMA_MIN, sigma_max: float = S.SIGMA_MAX,
                 huber_c: float | None = None):
        if q <= 1:
            raise ValueError(f"ECT's q must be > 1, got {q}")
        self.q, self.stage_steps, self.p_mean, self.p_std = q, max(1, int(stage_steps)), p_mean, p_std
        # the stage at which the largest gap (n(t) ~ 1) reaches MIN_GAP: later stages would change nothing
        self.max_stage = max(0, math.ceil(math.log(1 / self.MIN_GAP) / math.log(q)) - 1)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance

    def target_ema(self, step: int) -> float:
        return 0.0

    def stage(self, step: int) -> int:
        return min(step // self.stage_steps, self.max_stage)

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        t = S.lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, device=x0.device)
        t = t.clamp(self.sigma_min * 1.0001, self.sigma_max).to(x0.dtype)
        r = torch.minimum(S.ect_r(t, self.stage(step), self.q), t.double() * (1 - self.MIN_GAP))
        at_boundary = r < self.sigma_min
        gap = (t.double() - torch.where(at_boundary, torch.zeros_like(r), r)).to(x0.dtype)
        r = r.to(x0.dtype)
        r_safe = torch.where(at_boundary, torch.full_like(r, self.sigma_min), r)
        z = torch.randn_like(x0)
        x_t = x0 + S.append_dims(t, x0.ndim) * z
        x_r = x0 + S.append_dims(r_safe, x0.ndim) * z
        f_online, f_target = _paired_passes(model, target, x_t, t, x_r, r_safe, **cond)
        f_target = torch.where(S.append_dims(at_boundary, x0.ndim), x0, f_target)
        if isinstance(self.distance, torch.nn.Module):
            self.distance.to(x0.device)
        return (self.distance(f_online, f_target) / gap).mean()
