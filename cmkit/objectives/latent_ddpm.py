"""Training a latent text-to-image teacher: the DDPM loss on VAE latents, conditioned on prompt embeddings, with a
share of prompts dropped to the unconditional ``""`` (classifier-free guidance, Ho & Salimans 2022). The result is
saved as a diffusers ``StableDiffusionPipeline`` folder: this kind's VAE (a folder trained by kind ``vae``), a small
CLIP text encoder whose tokenizer is learnt over the training captions, the UNet and a DDIM scheduler.

The text encoder is frozen at its seeded initialisation, as SD's CLIP encoder is frozen: a fixed random encoder maps
each prompt to a distinct embedding sequence, and the UNet's cross-attention learns to read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..core.checks import in_range
from ..latent.autoencoder import latent_normalisation
from ..latent.builders import small_cond_unet
from ..latent.families.unet import LatentDenoiser, PromptEncoder
from ..latent.text_encoders import clip_tokenizer, learn_bpe, small_text_encoder
from .base import BuildContext, ObjectiveConfig, register_objective
from .ddpm import DDPMLoss


@dataclass
class LatentDDPMConfig(ObjectiveConfig):
    kind: str = "latent_ddpm"
    vae: str = ""                       # the AutoencoderKL folder (`cmkit train-teacher` with kind "vae")
    scaling_factor: float = 0.0         # latent scale; 0 = 1 / std of the training latents, measured at the start
    prompt_dropout: float = 0.1         # share of training prompts replaced by ""
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"    # epsilon | v_prediction
    unet_base: int = 48                 # UNet channels at the latent resolution (doubling per level)
    unet_levels: int = 2
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    text_hidden: int = 64               # CLIP text encoder width, depth, heads and token length
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 8


class LatentDDPMLoss(DDPMLoss):
    """DDPMLoss on latents drawn from the cached posteriors, with prompt dropout."""

    def __init__(self, den: LatentDenoiser, encoded, normalisation, prompt_dropout: float, prediction_type: str):
        super().__init__(den.log_sigmas, prediction_type)
        self.encoded, self.normalisation, self.p_drop = encoded, normalisation, prompt_dropout

    def batches(self, n: int, device):
        return self.encoded.batch(n, device, self.normalisation, self.p_drop)


def text_side(cfg: LatentDDPMConfig, bpe: dict, seed: int) -> PromptEncoder:
    tok = clip_tokenizer(bpe, max_length=cfg.max_length)
    enc = small_text_encoder(len(tok), cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.max_length, seed=seed)
    return PromptEncoder([enc.requires_grad_(False)], [tok]).eval()


@register_objective("latent_ddpm", LatentDDPMConfig, job="train-teacher")
def build(cfg: LatentDDPMConfig, ctx: BuildContext):
    from diffusers import AutoencoderKL, DDIMScheduler

    data = ctx.data
    if data is None or data.train_captions is None:
        raise ValueError("objective.kind 'latent_ddpm' trains on captioned images: set data.name = "
                         "'fashion_colours' or data.path to a caption folder")
    if not cfg.vae:
        raise ValueError("objective.vae is not set: train one with `cmkit train-teacher recipes/tiny-t2i-vae.toml` "
                         "and give its model folder")
    if not 0 <= cfg.prompt_dropout < 1:
        raise ValueError(f"objective.prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
    if not (Path(cfg.vae) / "config.json").is_file():
        raise FileNotFoundError(f"objective.vae {cfg.vae!r} is not an AutoencoderKL folder (no config.json); train "
                                "one with `cmkit train-teacher recipes/tiny-t2i-vae.toml` first")
    vae = AutoencoderKL.from_pretrained(cfg.vae).eval().requires_grad_(False)
    bpe = ctx.resumed.get("tokenizer") or learn_bpe(sorted(set(data.train_captions)))
    prompts = text_side(cfg, bpe, ctx.seed)
    encoded = ctx.encode_captions(vae, prompts)  # the latent cache the job layer hands in
    scale = ctx.resumed.get("scaling_factor") or cfg.scaling_factor or 1 / encoded.mean.std().item()
    in_range(scale, "the latent scaling factor (objective.scaling_factor, else 1 / std of the training latents)", 0,
             low_open=True, fix="check the VAE")
    vae.register_to_config(scaling_factor=scale)
    scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                              beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    latent = encoded.mean.shape[1:]
    unet = small_cond_unet(latent[-1], latent[0], cfg.unet_base, cfg.unet_levels, cfg.unet_layers_per_block,
                           cfg.text_hidden, cfg.unet_heads, norm_num_groups=math.gcd(cfg.unet_base, 32), seed=ctx.seed)
    den = LatentDenoiser(unet, scheduler)
    den.pipeline_parts = (vae, prompts, {})
    loss = LatentDDPMLoss(den, encoded, latent_normalisation(vae), cfg.prompt_dropout, cfg.prediction_type)
    loss.run_constants = {"scaling_factor": scale, "tokenizer": bpe}
    return den, loss
