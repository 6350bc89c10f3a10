"""Every set of scalings in sigma space, each as ``(c_skip, c_out, c_in)``: EDM's preconditioning and the
consistency-model boundary scalings; the network's time input c_noise; the EDM loss weight; and the two helpers
that broadcast per-sample noise levels."""

from __future__ import annotations

import torch

SIGMA_DATA = 0.5

# Every network cmkit builds (EDM teachers and consistency models alike) sees its noise level as
# c_noise = 250 log(sigma), the value openai's code and diffusers' CMStochasticIterativeScheduler use. One convention
# means a student initialised from an EDM teacher's weights starts with a time embedding that means the right thing
# (a VP/DDPM teacher's UNet was trained on timestep indices instead: copying it still helps CD, but less).
C_NOISE_SCALE = 250.0


def _float(sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma)
    return sigma if sigma.is_floating_point() else sigma.float()


def boundary_scalings(sigma, sigma_min: float = 0.002, sigma_data: float = SIGMA_DATA):
    """Consistency-model scalings ``(c_skip, c_out, c_in)`` with ``c_skip(sigma_min) = 1`` and ``c_out(sigma_min) = 0``.

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)
    c_out  = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)
    """
    sigma = _float(sigma)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning (Karras et al. 2022, Table 1): ``(c_skip, c_out, c_in)``.

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2)
    """
    sigma = _float(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def c_noise(sigma) -> torch.Tensor:
    """The network's time input: ``250 log(sigma)`` (see ``C_NOISE_SCALE``)."""
    return C_NOISE_SCALE * torch.log(torch.as_tensor(sigma))


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``: unit effective weight across levels."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad a per-sample tensor with singleton dims so it broadcasts against an ``ndim``-dim batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """A float or 0-/1-D tensor of noise levels as a shape ``(batch,)`` tensor on ``x``'s device and dtype."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or have shape ({x.shape[0]},), got shape {tuple(s.shape)}")
    return s
