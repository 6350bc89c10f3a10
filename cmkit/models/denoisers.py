"""Denoisers ``D(x, sigma, **cond) -> estimate of x_0`` in sigma space, whatever the teacher's native form.

Every teacher is wrapped here once; everything above (ODE, objectives, samplers) sees only a denoiser with
``sigma_min``, ``sigma_max`` and ``sample_shape`` attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..core import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, append_dims, as_batch_sigma, c_noise, edm_scalings
from .backbones import backbone_forward, sample_shape
from .folder import MODEL_KINDS, read_model_folder, write_model_folder
from .precond import Preconditioned


@runtime_checkable
class Denoiser(Protocol):
    """What every teacher looks like to cmkit."""

    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor: ...


@MODEL_KINDS.register("edm_denoiser")
class EDMDenoiser(Preconditioned):
    """EDM preconditioning around any backbone: ``D = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022)."""

    kind = "edm_denoiser"

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX):
        super().__init__(backbone, sigma_min, sigma_max, sigma_data)

    def scalings(self, sigma):
        return (*edm_scalings(sigma, self.sigma_data), c_noise(sigma))

    def save_pretrained(self, folder) -> Path:
        return write_model_folder(folder, self.backbone, {"kind": self.kind, "sigma_data": self.sigma_data,
                                                          "sigma_min": self.sigma_min, "sigma_max": self.sigma_max})

    @classmethod
    def from_pretrained(cls, folder) -> EDMDenoiser:
        backbone, meta = read_model_folder(folder, cls.kind)
        return cls(backbone, meta["sigma_data"], meta["sigma_min"], meta["sigma_max"])


class DiffusersDenoiser(nn.Module):
    """A diffusers VP / DDPM-family UNet as a sigma-space denoiser.

    With ``abar`` the scheduler's ``alphas_cumprod``: ``sigma = sqrt((1 - abar) / abar)``, the UNet sees
    ``x / sqrt(1 + sigma^2)`` (the VP sample) at the continuous timestep found by interpolating ``log sigma`` over the
    table, and its output (epsilon, v or x_0) is converted to x_0.
    """

    def __init__(self, unet: nn.Module, scheduler, prediction_type: str | None = None, clip_x0: float | None = None):
        super().__init__()
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod; "
                             "use a DDPM-family scheduler (DDPMScheduler, DDIMScheduler, ...)")
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; "
                             "expected epsilon, v_prediction or sample")
        self.clip_x0 = clip_x0
        # a zero-terminal-SNR table (rescale_betas_zero_snr) ends at abar = 0, sigma = inf; clamp as diffusers'
        # Euler and DPM-Solver schedulers do
        abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clamp_min(2.0**-24)
        table = ((1 - abar) / abar).sqrt()
        self.register_buffer("log_sigmas", table.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-1])
        self.sigma_data = SIGMA_DATA

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.unet)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep: linear interpolation of ``log sigma`` between table entries (clamped to the table)."""
        ls = self.log_sigmas
        log_s = sigma.to(torch.float64).log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo = hi - 1
        frac = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return lo + frac

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``sigma_to_t``: ``exp`` of ``log sigma`` interpolated at (fractional) timesteps."""
        ls = self.log_sigmas
        t = torch.as_tensor(t, dtype=torch.float64, device=ls.device).clamp(0, len(ls) - 1)
        lo = t.floor().long().clamp(max=len(ls) - 2)
        frac = t - lo
        return ((1 - frac) * ls[lo] + frac * ls[lo + 1]).exp()

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = as_batch_sigma(sigma, x)
        s = append_dims(sigma, x.ndim)
        scale = 1 / (1 + s**2).sqrt()  # sqrt(abar)
        out = backbone_forward(self.unet, x * scale, self.sigma_to_t(sigma).float(), **cond)
        return self.to_x0(x, s, out)

    def to_x0(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """The network's output (epsilon, v or x_0 of the VP sample ``x / sqrt(1 + s^2)``) as x_0."""
        if out.shape[1] == 2 * x.shape[1]:  # learned-variance UNets: the mean part comes first
            out = out[:, : x.shape[1]]
        scale = 1 / (1 + s**2).sqrt()
        if self.prediction_type == "epsilon":
            x0 = x - s * out
        elif self.prediction_type == "v_prediction":
            # x_t = a x0 + b eps, v = a eps - b x0  =>  x0 = a x_t - b v, with a = sqrt(abar), b = sqrt(1 - abar)
            x0 = scale * (x * scale) - (s * scale) * out
        else:
            x0 = out
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 and clip else x0

    def save_pretrained(self, folder) -> Path:
        from diffusers import DDPMPipeline

        folder = Path(folder)
        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(folder, safe_serialization=True)
        return folder
