"""Latent autoencoders: the VAE side of a latent text-to-image model. Encoding and decoding with a folder's
``scaling_factor`` / ``shift_factor`` (``z = (E(x) - shift) * scale``, as diffusers' pipelines do), always in float32
(half-precision SD VAEs overflow), and a small ``AutoencoderKL`` with its training wrapper for the shipped teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn


def _factors(vae) -> tuple[float, float]:
    cfg = vae.config
    return float(cfg.scaling_factor), float(cfg.get("shift_factor") or 0.0)


def vae_encode(vae, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
    """Images in [-1, 1] -> model latents ``(mean - shift) * scale`` (or a posterior sample with ``sample``)."""
    scale, shift = _factors(vae)
    dist = vae.encode(images.to(device=vae.device, dtype=torch.float32)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z - shift) * scale


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images in [-1, 1] (not clamped: diffusers' pipelines clamp when they post-process)."""
    scale, shift = _factors(vae)
    return vae.decode(latents.to(device=vae.device, dtype=torch.float32) / scale + shift).sample


def small_vae(sample_size: int = 32, channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4,
              layers_per_block: int = 1, norm_num_groups: int = 16) -> AutoencoderKL:
    """A small ``AutoencoderKL``: ``len(channels) - 1`` halvings, so 32x32 RGB with three levels -> 8x8 latents."""
    if len(channels) < 1 or min(channels) < 1 or any(c % norm_num_groups for c in channels):
        raise ValueError(f"vae channels {list(channels)} must be positive multiples of norm_num_groups "
                         f"{norm_num_groups}")
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels),
                         layers_per_block=layers_per_block, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=1.0)


class VAETrainee(nn.Module):
    """What the trainer trains for a VAE: ``forward(x) -> (reconstruction, KL per sample)`` with the posterior
    sampled, and ``save_pretrained`` writing the diffusers ``AutoencoderKL`` folder. The latent scale (the
    ``scaling_factor`` that brings latents to unit variance) is measured later, on the data the UNet trains on."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        return recon, dist.kl()

    def save_pretrained(self, folder) -> Path:
        self.vae.save_pretrained(folder, safe_serialization=True)
        return Path(folder)
