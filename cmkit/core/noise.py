"""Noise-level samplers the training objectives draw from (with torch's global generator unless one is given)."""

from __future__ import annotations

import torch


def uniform_index_pairs(n_points: int, batch: int, device=None, generator=None) -> torch.Tensor:
    """Indices ``n`` uniform on ``{0, ..., n_points - 2}``: the pair (n, n+1) of an ascending N-point grid."""
    if n_points < 2:
        raise ValueError(f"a grid for index pairs needs at least 2 points, got {n_points}")
    return torch.randint(0, n_points - 1, (batch,), device=device, generator=generator)


def lognormal_sigmas(batch: int, p_mean: float = -1.2, p_std: float = 1.2, device=None, generator=None) -> torch.Tensor:
    """EDM training noise levels: ``log sigma ~ N(p_mean, p_std^2)``."""
    z = torch.randn(batch, device=device, generator=generator)
    return (p_mean + p_std * z).exp()
