"""DDPM teacher training (Ho et al. 2020), saved as a diffusers UNet2DModel + DDPMScheduler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ..core import append_dims
from ..core.proposals import uniform_indices
from ..models import DiffusersDenoiser
from .base import BuildContext, ObjectiveConfig, register_objective
from .distances import l2


@dataclass
class DDPMConfig(ObjectiveConfig):
    kind: str = "ddpm"
    num_train_timesteps: int = 1000     # the DDPMScheduler the teacher is saved with
    beta_schedule: str = "linear"       # linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"    # epsilon | v_prediction | sample


class DDPMLoss:
    """t uniform over the scheduler's table, and the loss in the network's own target space written through x0
    (so the trainer still only sees a denoiser):

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
        if self.sigmas.device != x0.device:
            self.sigmas = self.sigmas.to(x0.device)
        sigma = self.sigmas[uniform_indices(x0.shape[0], len(self.sigmas), device=x0.device)].to(x0.dtype)
        noisy = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        return (self.weight(sigma) * l2(model(noisy, sigma, **cond), x0)).mean()


@register_objective("ddpm", DDPMConfig, job="train-teacher")
def build(cfg: DDPMConfig, ctx: BuildContext):
    """DDPM teacher: a diffusers UNet2DModel with a DDPMScheduler, the DDPM loss."""
    backbone = ctx.make_backbone()
    if not isinstance(backbone, UNet2DModel):
        raise ValueError("objective.kind 'ddpm' saves a diffusers UNet2DModel teacher; set model.backbone = 'unet'")
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                              prediction_type=cfg.prediction_type, clip_sample=False)
    den = DiffusersDenoiser(backbone, scheduler)
    return den, DDPMLoss(den.log_sigmas, cfg.prediction_type)
