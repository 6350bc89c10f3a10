"""Training a flow-matching teacher (rectified flow, SD3's recipe): ``x_t = (1 - t) x0 + t eps``, the network
predicts the velocity ``v = eps - x0``, loss ``||v_hat - v||^2`` with t logit-normal (``sigmoid(m + s n)``) and
then shifted as SD3's scheduler shifts its training table (``shift t / (1 + (shift - 1) t)``), unit weight, and a
share of prompts dropped to ``""`` for classifier-free guidance.

In sigma space (``x_sigma = x_t / (1 - t)``, ``sigma = t / (1 - t)``) the denoiser's ``D = x_t - t v_hat``, so
``D - x0 = t (v - v_hat)`` and the loss is ``||D - x0||^2 / t^2``: the trainer still sees only a denoiser.

Two targets: a latent SD3 teacher (``objective.vae`` set: an ``SD3Transformer2DModel`` on the VAE's latents, two
seeded-and-frozen CLIP encoders with projection whose tokenizer is learnt over the captions, no T5, saved as a
``StableDiffusion3Pipeline`` folder), or a pixel network (``objective.vae`` empty: the recipe's backbone, a diffusers
``UNet2DModel``, over a ``FlowMatchEulerDiscreteScheduler``, saved as a ``unet/`` + ``scheduler/`` folder). With
``objective.pipeline = "WanPipeline"`` (and ``objective.vae`` an ``AutoencoderKLWan``), a Wan text-to-video teacher
on captioned clips (``data.num_frames``), the same loss over 5-D latents, saved as a ``WanPipeline`` folder.
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
    max_sequence_length: int = 0    # prompt tokens: SD3's zero tokens of its absent T5 (0: its 256), Wan's (0: 512)
    pipeline: str = ""              # "": the SD3 teacher above; "WanPipeline": a Wan text-to-video teacher on clips


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
        collapse = getattr(self.prompts, "collapsed", None)  # SD3's; Wan's UMT5 tokens pass through the text MLP
        return z, cond if collapse is None else collapse(cond)


def _check(cfg: FlowMatchingConfig) -> None:
    if not 0 <= cfg.prompt_dropout < 1:
        raise ValueError(f"objective.prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
    in_range(cfg.shift, "objective.shift", 0, low_open=True, fix="SD3's is 3.0")
    finite_number(cfg.logit_mean, "objective.logit_mean", "SD3's is 0.0")
    in_range(cfg.logit_std, "objective.logit_std", 0, low_open=True, fix="SD3's is 1.0")
    if cfg.pipeline not in ("", "WanPipeline"):
        raise ValueError(f"objective.pipeline must be '' (an SD3 teacher) or 'WanPipeline' (a Wan video teacher), "
                         f"got {cfg.pipeline!r}")
    if cfg.pipeline and not cfg.vae:
        raise ValueError(f"objective.pipeline {cfg.pipeline!r} trains on a VAE's latents: set objective.vae to an "
                         "AutoencoderKLWan folder")


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
                            cfg.projection_dim, cfg.max_sequence_length or 256, ctx.seed)
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


def _wan_vae(cfg: FlowMatchingConfig):
    from diffusers import AutoencoderKLWan

    from ..core.assets import resolve
    from ..latent.families.wan import WanVAE

    path = resolve(cfg.vae)
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"objective.vae {cfg.vae!r} is not an AutoencoderKLWan folder (no config.json); give "
                                "a Wan folder's vae/ (or a saved AutoencoderKLWan)")
    return WanVAE(AutoencoderKLWan.from_pretrained(path).eval().requires_grad_(False))


def _build_wan(cfg: FlowMatchingConfig, ctx: BuildContext):
    """A Wan 2.1 text-to-video teacher: a small ``WanTransformer3DModel`` (``layers`` / ``heads`` / ``head_dim``) on
    the clips' latents of the ``AutoencoderKLWan`` at ``objective.vae`` (normalised per channel by its own
    ``latents_mean`` / ``latents_std``, as the pipeline does), prompts through a seeded, frozen tiny UMT5 at Wan's
    512 tokens; saved as a ``WanPipeline`` folder with a ``FlowMatchEulerDiscreteScheduler`` (``objective.shift``)."""
    from ..latent.families import wan

    if ctx.encode_captions is None:  # clips are streamed from their files: no train_captions in memory
        raise ValueError("objective.pipeline 'WanPipeline' trains on captioned clips: set data.path to a folder of "
                         ".mp4 / .webm clips with captions and data.num_frames")
    vae = _wan_vae(cfg)
    # a prompt length below the pipeline's 512 is recorded with the folder (sample_size.json) and sampled at
    prompts = wan.tiny_wan_text_side(ctx.seed, cfg.max_sequence_length or wan.MAX_TOKENS).requires_grad_(False)
    encoded = ctx.encode_captions(vae, prompts)  # the latent cache the job layer hands in
    if encoded.mean.ndim != 5:
        raise ValueError(f"objective.pipeline 'WanPipeline' trains on clips, but the data gave latents of shape "
                         f"{tuple(encoded.mean.shape[1:])}; set data.num_frames (1 + a multiple of 4, e.g. 9)")
    tr = wan.small_wan_transformer(encoded.mean.shape[1], cfg.layers, cfg.heads, cfg.head_dim, wan.TINY_TEXT_DIM,
                                   seed=ctx.seed)
    den = wan.WanDenoiser(tr, _scheduler(cfg))
    # the size trained at, saved with the folder (WanPipeline's own default is 81 frames of 480x832)
    _, f, h, w = encoded.mean.shape[1:]
    c = vae.config
    size = {"height": h * c.scale_factor_spatial, "width": w * c.scale_factor_spatial,
            "num_frames": 1 + (f - 1) * c.scale_factor_temporal}
    den.pipeline_parts = (vae, prompts, {"pipeline": wan.PIPELINE, **size, "sample_size": True})
    return den, LatentFlowMatchingLoss(cfg, encoded, latent_normalisation(vae), prompts)


@register_objective("flow_matching", FlowMatchingConfig, job="train-teacher")
def build(cfg: FlowMatchingConfig, ctx: BuildContext):
    """Flow-matching teacher: a latent SD3 pipeline (``objective.vae`` set) or a pixel UNet2DModel."""
    from diffusers import UNet2DModel

    from ..models import DiffusersDenoiser

    _check(cfg)
    if cfg.pipeline == "WanPipeline":
        return _build_wan(cfg, ctx)
    if cfg.vae:
        return _build_latent(cfg, ctx)
    backbone = ctx.make_backbone()
    if not isinstance(backbone, UNet2DModel):
        raise ValueError("objective.kind 'flow_matching' on pixels trains a diffusers UNet2DModel; set "
                         "model.backbone = 'unet' (or objective.vae for a latent SD3 teacher)")
    return DiffusersDenoiser(backbone, _scheduler(cfg)), FlowMatchingLoss(cfg.shift, cfg.logit_mean, cfg.logit_std)
