"""Denoisers ``D(x, sigma, **cond) -> estimate of x_0`` in sigma space, whatever the teacher's native form.

Every teacher is wrapped here once; everything above (ODE, objectives, samplers) sees only a denoiser with
``sigma_min``, ``sigma_max`` and ``sample_shape`` attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..core import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    FlowMatchSchedule,
    append_dims,
    as_batch_sigma,
    c_noise,
    edm_scalings,
    schedule_of,
)
from ..core.files import atomic_dir
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
    """A diffusers network over a VP / DDPM-family or a flow-matching scheduler, as a sigma-space denoiser.

    The scheduler's noise schedule (``core.schedule_of``) gives everything: the network sees the native sample
    ``x_n = a(sigma) x_sigma`` (VP: ``x / sqrt(1 + sigma^2)``; flow: ``x / (1 + sigma)``) at its native timestep
    (VP: the continuous index found by interpolating ``log sigma`` over the table; flow: ``t`` times
    ``num_train_timesteps``, as SD3's pipeline passes it), and its output (epsilon, v, x_0 or, for flow schedulers,
    the velocity ``eps - x0``) is converted to x_0. At sigma = inf (a flow solve's start) the state holds the unit
    noise (``core.schedules``).
    """

    def __init__(self, unet: nn.Module, scheduler, prediction_type: str | None = None, clip_x0: float | None = None):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.schedule = schedule_of(scheduler)
        flow = isinstance(self.schedule, FlowMatchSchedule)
        default = "flow" if flow else "epsilon"
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", default) or default
        if self.prediction_type not in self.schedule.outputs:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; expected "
                             f"{', '.join(self.schedule.outputs)}")
        self.clip_x0 = clip_x0
        self.sigma_data = SIGMA_DATA
        if flow:
            n = int(scheduler.config.get("num_train_timesteps", 1000))
            self.timestep_scale = float(n)
            # the smallest training time after the static shift, as the scheduler lists it; the largest is t = 1
            # (sigma = inf); karras-style grids use sigma at t = 1 - 1/n instead
            self.sigma_min = float(self.schedule.sigma(torch.tensor(float(scheduler.sigma_min), dtype=torch.float64)))
            self.sigma_max = float(self.schedule.sigma(torch.tensor(1 - 1 / n, dtype=torch.float64)))
        else:
            self.timestep_scale = 1.0
            self.register_buffer("log_sigmas", self.schedule.log_sigmas, persistent=False)
            self.sigma_min, self.sigma_max = (float(v) for v in self.schedule.log_sigmas[[0, -1]].exp())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.unet)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's timestep of ``sigma`` (VP: the continuous table index; flow: ``num_train_timesteps t``)."""
        return self.schedule.time(sigma) * self.timestep_scale

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``sigma_to_t``."""
        return self.schedule.sigma(torch.as_tensor(t, dtype=torch.float64) / self.timestep_scale)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = as_batch_sigma(sigma, x)
        s = append_dims(sigma, x.ndim)
        out = backbone_forward(self.unet, self.schedule.to_native(x, s), self.sigma_to_t(sigma).float(), **cond)
        return self.to_x0(x, s, out)

    def to_x0(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """The network's output at the native sample of ``x`` (sigma space, noise level ``s``) as x_0."""
        if out.shape[1] == 2 * x.shape[1]:  # learned-variance UNets: the mean part comes first
            out = out[:, : x.shape[1]]
        x0 = self.schedule.to_x0(self.prediction_type, self.schedule.to_native(x, s), s, out)
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 and clip else x0

    def save_pretrained(self, folder) -> Path:
        from diffusers import DDPMPipeline

        folder = Path(folder)
        with atomic_dir(folder) as tmp:  # a full disk names the folder and leaves the previous one intact
            DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(tmp, safe_serialization=True)
        return folder
