"""Training a flow-matching teacher (rectified flow, SD3's recipe): ``x_t = (1 - t) x0 + t eps``, the network
predicts the velocity ``v = eps - x0``, loss ``||v_hat - v||^2`` with t logit-normal (``sigmoid(m + s n)``) and
then shifted as SD3's scheduler shifts its training table (``shift t / (1 + (shift - 1) t)``), unit weight, and a
share of prompts dropped to ``""`` for classifier-free guidance.

In sigma space (``x_sigma = x_t / (1 - t)``, ``sigma = t / (1 - t)``) the denoiser's ``D = x_t - t v_hat``, so
``D - x0 = t (v - v_hat)`` and the loss is ``||D - x0||^2 / t^2``: the trainer still sees only a denoiser.

Two targets: a latent SD3 teacher (``objective.vae`` set: an ``SD3Transformer2DModel`` on the VAE's latents, two
seeded-and-frozen CLIP encoders with projection whose tokenizer is learnt over the captions, no T5, saved as a
``StableDiffusion3Pipeline`` folder), or a pixel network (``objective.vae`` empty: the recipe's backbone, a diffusers
``UNet2DModel``, over a ``FlowMatchEulerDiscreteScheduler``, saved as a ``unet/`` + ``scheduler/`` folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.checks import finite_number, in_range
from ..core.proposals import logit_normal_times
from ..latent.autoencoder import latent_normalisation
from ..latent.builders import small_sd3_transformer
from ..latent.families.sd3 import sd3_text_side
from ..latent.text_encoders import learn_bpe
from .base import BuildContext, ObjectiveConfig, register_objective
from .distances import l2


@dataclass
class FlowMatchingConfig(ObjectiveConfig):
    kind: str = "flow_matching"
    vae: str = ""                   # latent teacher: the AutoencoderKL folder (or "cmkit:tiny-t2i/vae"); "": pixels
    prompt_dropout: float = 0.1     # share of training prompts replaced by "" (latent teachers)
    logit_mean: float = 0.0         # t = shift(sigmoid(logit_mean + logit_std n)), SD3's logit-normal
    logit_std: float = 1.0
    shift: float = 3.0              # the scheduler's static shift (SD3's 3.0), in training and in the saved scheduler
    num_train_timesteps: int = 1000
    layers: int = 4                 # SD3Transformer2DModel: joint blocks, heads, head width, patch size
    heads: int = 2
    head_dim: int = 32
    text_hidden: int = 64           # each CLIP encoder's width, depth, heads, token length and projection
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 8
    projection_dim: int = 32
    max_sequence_length: int = 256  # the zero tokens a T5-less SD3 pipeline appends (its default)


class FlowMatchingLoss:
    """``||D - x0||^2 / t^2 = ||v_hat - v||^2`` at logit-normal, shifted t (see the module docstring)."""

    def __init__(self, shift: float, logit_mean: float, logit_std: float):
        self.shift, self.mean, self.std = float(shift), float(logit_mean), float(logit_std)

    def target_ema(self, step: int) -> float:
        return 0.0

    def times(self, n: int, device) -> torch.Tensor:
        return logit_normal_times(n, self.mean, self.std, self.shift, 1e-5, device=device)  # sigma finite at both ends

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        t = self.times(x0.shape[0], x0.device).to(x0.dtype)
        sigma = t / (1 - t)
        noisy = x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * torch.randn_like(x0)
        return (l2(model(noisy, sigma, **cond), x0) / t**2).mean()


class LatentFlowMatchingLoss(FlowMatchingLoss):
    """On latents drawn from the cached posteriors, with prompt dropout; the T5-less encoding's identical zero
    tokens cut to one (``SD3PromptEncoder.collapsed``: exact, and an order of magnitude less work)."""

    def __init__(self, cfg: FlowMatchingConfig, encoded, normalisation, prompts):
        super().__init__(cfg.shift, cfg.logit_mean, cfg.logit_std)
        self.encoded, self.normalisation, self.prompts = encoded, normalisation, prompts
        self.p_drop = cfg.prompt_dropout

    def batches(self, n: int, device):
        z, cond = self.encoded.batch(n, device, self.normalisation, self.p_drop)
        return z, self.prompts.collapsed(cond)


def _check(cfg: FlowMatchingConfig) -> None:
    if not 0 <= cfg.prompt_dropout < 1:
        raise ValueError(f"objective.prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
    in_range(cfg.shift, "objective.shift", 0, low_open=True, fix="SD3's is 3.0")
    finite_number(cfg.logit_mean, "objective.logit_mean", "SD3's is 0.0")
    in_range(cfg.logit_std, "objective.logit_std", 0, low_open=True, fix="SD3's is 1.0")


def _scheduler(cfg: FlowMatchingConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)


def _latent_vae(cfg: FlowMatchingConfig):
    from diffusers import AutoencoderKL

    from ..core.assets import resolve

    path = resolve(cfg.vae)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"objective.vae {cfg.vae!r} is not an AutoencoderKL folder (no config.json); train "
                                "one with `cmkit train-teacher recipes/tiny-t2i-vae.toml` or use 'cmkit:tiny-t2i/vae'")
    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


def _build_latent(cfg: FlowMatchingConfig, ctx: BuildContext):
    from ..latent.families.sd3 import SD3Denoiser

    data = ctx.data
    if data is None or data.train_captions is None:
        raise ValueError("objective.kind 'flow_matching' with objective.vae trains on captioned images: set "
                         "data.name = 'fashion_colours' or data.path to a caption folder")
    vae = _latent_vae(cfg)
    bpe = ctx.resumed.get("tokenizer") or learn_bpe(sorted(set(data.train_captions)))
    prompts = sd3_text_side(bpe, cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.max_length,
                            cfg.projection_dim, cfg.max_sequence_length, ctx.seed)
    encoded = ctx.encode_captions(vae, prompts)  # the latent cache the job layer hands in
    # SD3's normalisation: (z - shift_factor) * scaling_factor, measured to zero mean and unit variance
    shift = ctx.resumed.get("shift_factor", encoded.mean.mean().item())
    scale = ctx.resumed.get("scaling_factor") or 1 / (encoded.mean - shift).std().item()
    in_range(scale, "the latent scale (1 / std of the training latents)", 0, low_open=True, fix="check the VAE")
    finite_number(shift, "the latent shift (mean of the training latents)", "check the VAE")
    vae.register_to_config(scaling_factor=scale, shift_factor=shift, latents_mean=None, latents_std=None)
    c, h, _ = encoded.mean.shape[1:]
    tr = small_sd3_transformer(h, c, cfg.layers, cfg.heads, cfg.head_dim, 2 * cfg.text_hidden, 2 * cfg.projection_dim,
                               seed=ctx.seed)
    den = SD3Denoiser(tr, _scheduler(cfg))
    den.pipeline_parts = (vae, prompts, {"pipeline": prompts.pipeline})
    loss = LatentFlowMatchingLoss(cfg, encoded, latent_normalisation(vae), prompts)
    loss.run_constants = {"scaling_factor": scale, "shift_factor": shift, "tokenizer": bpe}
    return den, loss


@register_objective("flow_matching", FlowMatchingConfig, job="train-teacher")
def build(cfg: FlowMatchingConfig, ctx: BuildContext):
    """Flow-matching teacher: a latent SD3 pipeline (``objective.vae`` set) or a pixel UNet2DModel."""
    from diffusers import UNet2DModel

    from ..models import DiffusersDenoiser

    _check(cfg)
    if cfg.vae:
        return _build_latent(cfg, ctx)
    backbone = ctx.make_backbone()
    if not isinstance(backbone, UNet2DModel):
        raise ValueError("objective.kind 'flow_matching' on pixels trains a diffusers UNet2DModel; set "
                         "model.backbone = 'unet' (or objective.vae for a latent SD3 teacher)")
    return DiffusersDenoiser(backbone, _scheduler(cfg)), FlowMatchingLoss(cfg.shift, cfg.logit_mean, cfg.logit_std)
