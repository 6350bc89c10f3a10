"""Training the latent autoencoder of a text-to-image teacher: ``||D(E(x)) - x||^2 + beta KL(q(z|x) || N(0, I))``
(Rombach et al. 2022 add perceptual and adversarial terms; at 32x32 the squared error alone reconstructs items and
colours, and the weights needed for LPIPS cannot be had offline)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..latent.autoencoder import VAETrainee, small_vae
from .base import BuildContext, ObjectiveConfig, register_objective


@dataclass
class VAEConfig(ObjectiveConfig):
    kind: str = "vae"
    sample_size: int = 32
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])   # one entry per level; each after the
    latent_channels: int = 4                                            # first halves the resolution
    layers_per_block: int = 1
    norm_num_groups: int = 16
    kl_weight: float = 1e-6


class VAELoss:
    def __init__(self, kl_weight: float):
        if kl_weight < 0:
            raise ValueError(f"objective.kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight

    def target_ema(self, step: int) -> float:
        return 0.0

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        recon, kl = model(x0)
        per_pixel = (recon.float() - x0.float()).square().mean()
        return per_pixel + self.kl_weight * kl.mean() / x0[0].numel()


@register_objective("vae", VAEConfig, job="train-teacher")
def build(cfg: VAEConfig, ctx: BuildContext):
    vae = small_vae(cfg.sample_size, tuple(cfg.channels), cfg.latent_channels, cfg.layers_per_block,
                    cfg.norm_num_groups)
    return VAETrainee(vae), VAELoss(cfg.kl_weight)
