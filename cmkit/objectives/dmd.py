"""The distribution-matching pieces rCM (``latent_scm``) and DMD2 (``dmd2``) share: DMD's gradient with its
normalisation, the fake score's denoising loss, and a student's sample from its own few-step sampling.

DMD (Yin et al. 2024): with ``G`` a generated x0 noised to ``x = G + s eps``, the reverse KL's gradient in ``G`` is the
fake score minus the real score, in x0 form ``D_fake(x, s) - D_real(x, s)``, normalised per sample by
``mean|G - D_real(x, s)|``; written as the loss ``||G - sg(G - grad)||^2 / D``, whose gradient in ``G`` is
``2 grad / D``.
"""

from __future__ import annotations

import math

import torch

from ..core import append_dims


def dmd_loss(g: torch.Tensor, x_fake: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """Per sample ``||G - sg(G - grad)||^2 / D`` with ``grad = (x_fake - x_real) / mean|G - x_real|``: its gradient
    in ``G`` is ``2 grad / D``."""
    with torch.no_grad():
        scale = (g - x_real).abs().flatten(1).mean(1).clamp_min(1e-5)
        grad = (x_fake - x_real) / append_dims(scale, g.ndim)
    return (g - (g - grad).detach()).pow(2).flatten(1).mean(1)


def fake_denoising_loss(fake_x0: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_data: float):
    """Per sample: the fake score's denoising loss on generated ``x0`` noised to ``sigma``, ``1 / sin^2 t`` weighted
    (``sin^2 t = sigma^2 / (sigma_data^2 + sigma^2)``: epsilon-prediction's weighting, in x0 form)."""
    inv_sin2 = append_dims((sigma_data**2 + sigma**2) / sigma**2, x0.ndim)
    return ((x0 - fake_x0).pow(2) * inv_sin2).flatten(1).mean(1)


def student_sample(net, z0: torch.Tensor, cond: dict, no_grad_steps: int, sigma_start: float, next_sigma,
                   start_scale: float | None = None):
    """``(x, sigma)`` after ``no_grad_steps`` consistency steps (denoise, re-noise with fresh noise) of ``net`` from
    pure noise at ``sigma_start`` (inf: the state is the unit noise itself; else the noise times ``start_scale``,
    by default ``sigma_start``); ``next_sigma(i, sigma)`` gives the level the ``i``-th step re-noises to."""
    n = z0.shape[0]
    sigma = torch.full((n,), sigma_start, device=z0.device, dtype=z0.dtype)
    eps = torch.randn_like(z0)
    x = eps if math.isinf(sigma_start) else (sigma_start if start_scale is None else start_scale) * eps
    for i in range(no_grad_steps):
        with torch.no_grad():
            x0 = net(x, sigma, **cond)
        sigma = next_sigma(i, sigma)
        x = x0 + append_dims(sigma, z0.ndim) * torch.randn_like(z0)
    return x, sigma
