"""One preconditioning for every network cmkit wraps: ``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.

EDM denoisers and consistency models differ only in their ``scalings(sigma)`` (as k-diffusion's wrappers do); a new
parameterisation is a subclass with its own ``scalings``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import append_dims, as_batch_sigma
from .backbones import backbone_forward, sample_shape


class Preconditioned(nn.Module):
    def __init__(self, backbone: nn.Module, sigma_min: float, sigma_max: float, sigma_data: float):
        super().__init__()
        self.backbone = backbone
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at per-sample noise levels ``sigma`` (shape (batch,))."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.backbone)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = as_batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        f = backbone_forward(self.backbone, append_dims(c_in, x.ndim) * x, c_noise, **cond)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f
