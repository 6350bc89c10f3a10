"""EDM teacher training (Karras et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import SIGMA_DATA, append_dims, edm_loss_weight
from ..core.proposals import lognormal_sigmas
from ..models import EDMDenoiser
from .base import BuildContext, LevelsConfig, register_objective
from .distances import l2


@dataclass
class EDMConfig(LevelsConfig):
    kind: str = "edm"
    p_mean: float = -1.2            # lognormal training noise levels
    p_std: float = 1.2


class EDMLoss:
    """``lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2`` with ``log sigma ~ N(P_mean, P_std^2)``."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def target_ema(self, step: int) -> float:
        return 0.0

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        sigma = lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, device=x0.device, dtype=x0.dtype)
        noisy = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        denoised = model(noisy, sigma, **cond)
        return (edm_loss_weight(sigma, self.sigma_data) * l2(denoised, x0)).mean()


@register_objective("edm", EDMConfig, job="train-teacher")
def build(cfg: EDMConfig, ctx: BuildContext):
    """EDM teacher: EDM preconditioning around the recipe's backbone, EDM's loss."""
    model = EDMDenoiser(ctx.make_backbone(), cfg.sigma_data, cfg.sigma_min, cfg.sigma_max)
    return model, EDMLoss(cfg.p_mean, cfg.p_std, cfg.sigma_data)
