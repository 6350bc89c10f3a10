"""Consistency training without a teacher: CT (Song et al. 2023) and iCT (Song & Dhariwal 2023), with their
curricula. Both draw one noise for a pair of adjacent levels of a Karras grid of N(k) points that grows with the
step k:

    x_{n+1} = x0 + sigma_{n+1} z,   x_n = x0 + sigma_n z,
    loss    = lambda(sigma_n, sigma_{n+1}) d( f(x_{n+1}, sigma_{n+1}), f_target(x_n, sigma_n) )
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core import RHO, append_dims, karras_ascending
from ..core.proposals import lognormal_index_pairs, lognormal_index_probs, uniform_index_pairs
from ..models import ConsistencyModel
from .base import BuildContext, LevelsConfig, paired_passes, register_objective
from .distances import WEIGHTINGS, make_distance

# ---- curricula ----------------------------------------------------------------------------------------------------


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
    raise ValueError(f"unknown objective.mu_variant {variant!r}; choose 'openai' or 'paper'")


def ict_num_points(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // k_prime), s1) + 1


# ---- configs ------------------------------------------------------------------------------------------------------


@dataclass
class CTConfig(LevelsConfig):
    kind: str = "ct"
    s0: int = 2                         # curriculum: grid points at the start ...
    s1: int = 150                       # ... and at the end
    mu0: float = 0.9                    # target EMA at the start
    mu_variant: str = "openai"          # mu(k) divides by N(k) - 1 ("openai") or N(k) ("paper")
    distance: str = "l2"
    huber_c: float | None = None
    weighting: str = "uniform"
    total_steps: int | None = None      # K of the curriculum (default: train.steps when the run starts)


@dataclass
class ICTConfig(LevelsConfig):
    kind: str = "ict"
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1                # the discretised lognormal over grid pairs
    p_std: float = 2.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None
    weighting: str = "inverse_gap"
    total_steps: int | None = None


# ---- objectives ---------------------------------------------------------------------------------------------------


class _GrowingGridTraining:
    """What CT and iCT share: the grid of this step, the pair draw (``pairs``), the loss."""

    def __init__(self, total_steps: int, s0: int, s1: int, distance, weighting: str, sigma_min: float,
                 sigma_max: float, rho: float = RHO, huber_c: float | None = None):
        if total_steps < 1 or not 1 <= s0 <= s1:
            raise ValueError(f"the curriculum needs total_steps >= 1 and 1 <= s0 <= s1, got total_steps="
                             f"{total_steps}, s0={s0}, s1={s1}")
        self.total, self.s0, self.s1 = int(total_steps), int(s0), int(s1)
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.weighting = WEIGHTINGS[weighting]
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance
        # (N, device, dtype) -> (grid, pair probabilities): only the current N is kept, N changes rarely
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def run_constants(self) -> dict:
        return {"total_steps": self.total}

    def num_points(self, step: int) -> int:
        raise NotImplementedError

    def grid(self, step: int) -> torch.Tensor:
        """The ascending grid at this step (grid[0] = sigma_min)."""
        return karras_ascending(self.num_points(step), self.sigma_min, self.sigma_max, self.rho)

    def _cached(self, step: int, x0: torch.Tensor):
        key = (self.num_points(step), x0.device, x0.dtype)
        if key not in self._grids:
            if isinstance(self.distance, torch.nn.Module):
                self.distance.to(x0.device)
            grid = self.grid(step).to(device=x0.device, dtype=x0.dtype)
            self._grids = {key: (grid, self.pair_table(grid))}
        return self._grids[key]

    def pair_table(self, grid: torch.Tensor):
        return None

    def pairs(self, grid, table, batch: int, device) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        grid, table = self._cached(step, x0)
        n = self.pairs(grid, table, x0.shape[0], x0.device)
        s_n, s_np1 = grid[n], grid[n + 1]
        z = torch.randn_like(x0)
        x_np1 = x0 + append_dims(s_np1, x0.ndim) * z
        x_n = x0 + append_dims(s_n, x0.ndim) * z
        f_online, f_target = paired_passes(model, target, x_np1, s_np1, x_n, s_n, **cond)
        return (self.weighting(s_np1, s_n) * self.distance(f_online, f_target)).mean()


class ConsistencyTraining(_GrowingGridTraining):
    """CT: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, n uniform, target EMA
    mu(k) = exp(s0 log mu0 / N(k)) ("paper") or / (N(k) - 1) ("openai", default)."""

    def __init__(self, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9, mu_variant: str = "openai",
                 distance="l2", weighting: str = "uniform", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = RHO, huber_c: float | None = None):
        super().__init__(total_steps, s0, s1, distance, weighting, sigma_min, sigma_max, rho, huber_c)
        self.mu0, self.mu_variant = mu0, mu_variant
        ct_target_mu(0, 1, self.s0, self.s1, mu0, mu_variant)  # rejects an unknown mu_variant now, not at step 1

    def num_points(self, step: int) -> int:
        return ct_num_points(step, self.total, self.s0, self.s1)

    def target_ema(self, step: int) -> float:
        return ct_target_mu(step, self.total, self.s0, self.s1, self.mu0, self.mu_variant)

    def pairs(self, grid, table, batch, device):
        return uniform_index_pairs(batch, len(grid), device=device)


class ImprovedConsistencyTraining(_GrowingGridTraining):
    """iCT: N(k) = min(s0 2^floor(k/K'), s1) + 1, n from the discretised lognormal (P_mean, P_std), target = the
    stop-gradient online network (mu = 0), shared dropout masks."""

    def __init__(self, total_steps: int, s0: int = 10, s1: int = 1280, p_mean: float = -1.1, p_std: float = 2.0,
                 distance="pseudo_huber", weighting: str = "inverse_gap", sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = RHO, huber_c: float | None = None):
        super().__init__(total_steps, s0, s1, distance, weighting, sigma_min, sigma_max, rho, huber_c)
        self.p_mean, self.p_std = p_mean, p_std

    def num_points(self, step: int) -> int:
        return ict_num_points(step, self.total, self.s0, self.s1)

    def target_ema(self, step: int) -> float:
        return 0.0

    def pair_table(self, grid):
        return lognormal_index_probs(grid, self.p_mean, self.p_std)

    def pairs(self, grid, table, batch, device):
        return lognormal_index_pairs(batch, table)


def _model(cfg: LevelsConfig, ctx: BuildContext) -> ConsistencyModel:
    if ctx.teacher is not None:
        raise ValueError(f"objective.kind {cfg.kind!r} trains without a teacher, but one is given; remove "
                         "teacher.path / --teacher, or use kind 'ect' to start from it")
    return ConsistencyModel(ctx.make_backbone(), cfg.sigma_min, cfg.sigma_max, cfg.sigma_data)


def _total(cfg, ctx: BuildContext) -> int:
    # K is fixed when a run starts: extending train.steps later must not rescale N(k) and mu(k)
    return ctx.resumed.get("total_steps") or cfg.total_steps or ctx.train_steps


@register_objective("ct", CTConfig, job="train")
def build_ct(cfg: CTConfig, ctx: BuildContext):
    """Consistency training (CT), no teacher."""
    return _model(cfg, ctx), ConsistencyTraining(_total(cfg, ctx), cfg.s0, cfg.s1, cfg.mu0, cfg.mu_variant,
                                                 ctx.distance or cfg.distance, cfg.weighting, cfg.sigma_min,
                                                 cfg.sigma_max, huber_c=cfg.huber_c)


@register_objective("ict", ICTConfig, job="train")
def build_ict(cfg: ICTConfig, ctx: BuildContext):
    """Improved consistency training (iCT), no teacher."""
    return _model(cfg, ctx), ImprovedConsistencyTraining(_total(cfg, ctx), cfg.s0, cfg.s1, cfg.p_mean, cfg.p_std,
                                                         ctx.distance or cfg.distance, cfg.weighting, cfg.sigma_min,
                                                         cfg.sigma_max, huber_c=cfg.huber_c)
