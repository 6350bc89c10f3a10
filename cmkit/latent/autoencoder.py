"""Latent autoencoders: the VAE side of a latent text-to-image model. Encoding and decoding with a folder's
normalisation (``z = (E(x) - shift) * scale``, or SDXL's per-channel ``latents_mean`` / ``latents_std``, as
diffusers' pipelines do), always in float32 (half-precision SD VAEs overflow), and a small ``AutoencoderKL`` with its
training wrapper for the shipped teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..core.files import atomic_dir


def latent_normalisation(vae) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(offset, scale)`` with ``z_model = (z_vae - offset) * scale``: per-channel ``latents_mean`` /
    ``latents_std`` where the folder has them (SDXL's convention: ``scale = scaling_factor / latents_std``), else
    ``shift_factor`` (0 if absent) and ``scaling_factor``."""
    cfg = vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        view = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        return view(mean), float(cfg.scaling_factor) / view(std)
    return float(cfg.get("shift_factor") or 0.0), float(cfg.scaling_factor)


def _float32(vae):
    """The VAE runs in float32 whatever the rest of the model runs in (half-precision SD VAEs overflow)."""
    if vae.dtype != torch.float32:
        vae.to(torch.float32)
    return vae


def _on(v, like: torch.Tensor):
    return v.to(like.device) if torch.is_tensor(v) else v


def vae_encode(vae, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
    """Images in [-1, 1] -> model latents (the posterior mean, or a sample with ``sample``), in float32."""
    vae = _float32(vae)
    offset, scale = latent_normalisation(vae)
    dist = vae.encode(images.to(device=vae.device, dtype=torch.float32)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z - _on(offset, z)) * _on(scale, z)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> images in [-1, 1], float32 (not clamped: diffusers' pipelines clamp when they
    post-process)."""
    vae = _float32(vae)
    z = latents.to(device=vae.device, dtype=torch.float32)
    offset, scale = latent_normalisation(vae)
    return vae.decode(z / _on(scale, z) + _on(offset, z)).sample


class VAEView(nn.Module):
    """A family's VAE that is not read as an ``AutoencoderKL`` (a frame axis, patchified batch-norm latents, a
    deterministic encoder), held as ``.vae`` (what its pipeline is given) and shown to cmkit's VAE code as one: a
    subclass presents ``config``, ``encode(x).latent_dist`` and ``decode(z).sample`` in the latent space the
    network sees; ``dtype`` and ``device`` are the held VAE's."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device


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
        with atomic_dir(folder) as tmp:  # a full disk names the folder and leaves the previous one intact
            self.vae.save_pretrained(tmp, safe_serialization=True)
        return Path(folder)
