"""Training a Wan video autoencoder (diffusers' ``AutoencoderKLWan``, a causal 3-D VAE) on clips, as the tiny video
teacher's first stage: ``||D(E(x)) - x||^2 + beta KL(q(z|x) || N(0, I))``, the loss the image VAE trains with
(``objective.kind = "vae"``), over ``(B, 3, F, H, W)`` clips.

Two things are Wan's own:

- **Clip windows.** The encoder reads a clip as its first frame, then chunks of frames, each chunk downsampled in
  time with a cache of the previous one's features; so a window of ``clip_frames`` (1 + a multiple of the temporal
  factor) drawn at random from each longer clip trains the same causal path at a fraction of the cost, and the
  saved VAE encodes the full clips.
- **Latent statistics.** ``WanPipeline`` normalises latents per channel by the VAE config's ``latents_mean`` /
  ``latents_std`` (the teacher then sees unit-variance latents). They are measured here while training: a running
  average (rate ``stats_rate`` per step) of each channel's mean and second moment over the sampled latents, kept
  as buffers (so checkpoints and resume carry them) and written into the saved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.files import atomic_dir
from .base import BuildContext, ObjectiveConfig, register_objective
from .vae import VAELoss


@dataclass
class WanVAEConfig(ObjectiveConfig):
    kind: str = "wan_vae"
    base_dim: int = 16
    z_dim: int = 8
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one entry per level; each after the first
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True])  # halves H and W; True: and F
    num_res_blocks: int = 1
    clip_frames: int = 5          # the window trained on (0: whole clips); 1 + a multiple of the temporal factor
    kl_weight: float = 1e-6
    stats_rate: float = 0.99      # the running latent statistics' rate per step
    logvar_init: float = -8.0     # the posterior's log-variance at the start (its bias): see small_wan_vae


def small_wan_vae(cfg: WanVAEConfig, seed: int = 0):
    """A seeded ``AutoencoderKLWan`` (no attention inside the levels; the middle block's own) whose config states
    the factors ``WanPipeline`` reads (``scale_factor_spatial`` / ``scale_factor_temporal``). Its posterior starts
    nearly deterministic (log-variance ``logvar_init``): at the default 0, unit noise on latents of size ~0.4 taught
    the decoder to ignore them before the encoder could say anything (the loss stayed at the all-black one)."""
    from diffusers import AutoencoderKLWan

    if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
        raise ValueError(f"objective.temperal_downsample has {len(cfg.temperal_downsample)} entries for "
                         f"{len(cfg.dim_mult)} levels; give one per downsampling (len(dim_mult) - 1)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                               num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                               temperal_downsample=list(cfg.temperal_downsample),
                               scale_factor_spatial=2 ** (len(cfg.dim_mult) - 1),
                               scale_factor_temporal=2 ** sum(bool(t) for t in cfg.temperal_downsample))
    with torch.no_grad():
        vae.quant_conv.bias[cfg.z_dim:] = float(cfg.logvar_init)  # quant_conv gives (mean, log-variance)
    return vae


class WanVAETrainee(nn.Module):
    """``forward(clips) -> (reconstruction, window, KL per sample)`` on a random window of each batch, with the
    latent statistics updated; ``save_pretrained`` writes the ``AutoencoderKLWan`` folder with them."""

    def __init__(self, vae, clip_frames: int, stats_rate: float):
        super().__init__()
        self.vae, self.clip_frames, self.stats_rate = vae, int(clip_frames), float(stats_rate)
        z = vae.config.z_dim
        self.register_buffer("latent_mean", torch.zeros(z, dtype=torch.float64))
        self.register_buffer("latent_square", torch.ones(z, dtype=torch.float64))

    def window(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        if not self.clip_frames or self.clip_frames >= frames:
            return x
        start = int(torch.randint(0, frames - self.clip_frames + 1, ()))
        return x[:, :, start: start + self.clip_frames]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.window(x)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample()
        if self.training:
            with torch.no_grad():  # E[z] and E[z^2] per channel, over the batch, frames and positions
                dims = [d for d in range(z.ndim) if d != 1]
                r = 1.0 - self.stats_rate
                self.latent_mean.lerp_(z.double().mean(dims), r)
                self.latent_square.lerp_(z.double().square().mean(dims), r)
        return self.unclamped_decode(z), x, dist.kl()

    def unclamped_decode(self, z: torch.Tensor) -> torch.Tensor:
        """``AutoencoderKLWan.decode`` (frame by frame through its causal cache) without its final clamp to [-1, 1]:
        trained through the clamp, an output below -1 has no gradient, and the black background (-1, three quarters
        of the toy clips) pushes every pixel there; a 1,600-step run ended reconstructing the background alone
        (MSE 0.108 against 0.097 for all black). The saved VAE decodes with the clamp, as the pipeline does."""
        vae = self.vae
        vae.clear_cache()
        x, frames = vae.post_quant_conv(z), []
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            frames.append(vae.decoder(x[:, :, i: i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=i == 0))
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        vae.clear_cache()
        return out

    def latent_stats(self) -> tuple[list[float], list[float]]:
        std = (self.latent_square - self.latent_mean.square()).clamp_min(1e-12).sqrt()
        return self.latent_mean.tolist(), std.tolist()

    def save_pretrained(self, folder) -> Path:
        mean, std = self.latent_stats()
        self.vae.register_to_config(latents_mean=mean, latents_std=std)
        with atomic_dir(folder) as tmp:  # a full disk names the folder and leaves the previous one intact
            self.vae.save_pretrained(tmp, safe_serialization=True)
        return Path(folder)


class WanVAELoss(VAELoss):
    """The image VAE's loss (its checks), on the window the trainee drew."""

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        recon, window, kl = model(x0)
        return (recon.float() - window.float()).square().mean() + self.kl_weight * kl.mean() / window[0].numel()


@register_objective("wan_vae", WanVAEConfig, job="train-teacher")
def build(cfg: WanVAEConfig, ctx: BuildContext):
    shape = tuple(getattr(ctx.data, "sample_shape", ()) or ())
    if len(shape) != 4 or shape[0] != 3:
        raise ValueError(f"objective.kind 'wan_vae' trains on RGB clips (3, F, H, W); the data gives samples of shape "
                         f"{shape}: use data.name = 'moving_fashion' or a set of clips")
    vae = small_wan_vae(cfg, ctx.seed)
    tf, sf = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    frames = cfg.clip_frames or shape[1]
    for what, n, k in (("objective.clip_frames (or the clips' frame count)", frames - 1, tf),
                       ("the clips' frame count", shape[1] - 1, tf)):
        if n % k:
            raise ValueError(f"{what} {n + 1} is not 1 + a multiple of the VAE's temporal factor {k}")
    if shape[2] % sf or shape[3] % sf:
        raise ValueError(f"clips of {shape[2]}x{shape[3]} do not divide by the VAE's spatial factor {sf}")
    if not 0 <= cfg.stats_rate < 1:
        raise ValueError(f"objective.stats_rate must be in [0, 1), got {cfg.stats_rate}")
    return WanVAETrainee(vae, cfg.clip_frames, cfg.stats_rate), WanVAELoss(cfg.kl_weight)
