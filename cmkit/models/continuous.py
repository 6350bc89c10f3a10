"""Continuous-time consistency models, each a ``ConsistencyModel`` in sigma space so that sampling, editing, export
and benchmarks take them unchanged:

- ``TrigFlowConsistencyModel`` (sCM, Lu & Song 2024): ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)``
  with ``x_t = cos(t) x_sigma``, ``sigma = sigma_d tan t`` (``core.trigflow``).
- ``MeanFlowModel`` (Geng et al. 2025): a two-time network ``u(z, r, t)``, the average velocity of the flow
  ``z_t = (1 - t) x0 + t eps`` from r to t, so ``z_r = z_t - (t - r) u(z_t, r, t)``; in sigma space
  ``z_t = x_sigma / (1 + sigma)``, ``t = sigma / (1 + sigma)``. Its steps are jumps along the flow (no re-noising).

Both take ``raw_time=`` in ``forward`` to return the bare network in its own units (TrigFlow's F at ``(x_t / sd, t)``,
MeanFlow's u at ``(z, (r, t))``): the training objectives call it that way through a DDP wrapper and take its JVP.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import (
    SIGMA_DATA,
    SIGMA_MIN,
    append_dims,
    as_batch_sigma,
    flow_to_sigma,
    sigma_to_flow,
    sigma_to_trig,
    trig_scalings,
)
from .backbones import backbone_forward, takes_second_time, two_time_forward
from .consistency import ConsistencyModel
from .folder import MODEL_KINDS


@MODEL_KINDS.register("trigflow_consistency_model")
class TrigFlowConsistencyModel(ConsistencyModel):
    """sCM's parameterisation: ``(c_skip, c_out, c_in) = (cos^2 t, -sd sin t, cos(t) / sd)`` at
    ``t = arctan(sigma / sd)``, time input t itself (see ``core.trigflow``); ``f(x, 0) = x`` exactly."""

    kind = "trigflow_consistency_model"

    def scalings(self, sigma):
        t = sigma_to_trig(sigma, self.sigma_data)
        return (*trig_scalings(t, self.sigma_data), t)

    def forward(self, x: torch.Tensor, sigma=None, raw_time: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if raw_time is not None:  # F(x / sd, t): x is already x_t / sigma_d
            return backbone_forward(self.backbone, x, raw_time, **cond)
        return super().forward(x, sigma, **cond)

    def trig_f(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """``f(x_t, t)`` in TrigFlow units (x_t = cos(t) x_sigma)."""
        cos, sin = (append_dims(v, x_t.ndim) for v in (torch.cos(t), torch.sin(t)))
        return cos * x_t - sin * self.sigma_data * self(x_t / self.sigma_data, raw_time=t, **cond)


@MODEL_KINDS.register("meanflow_model")
class MeanFlowModel(ConsistencyModel):
    """MeanFlow's average-velocity network as a flow map in sigma space; ``forward(x, sigma)`` jumps to sigma = 0."""

    kind = "meanflow_model"
    deterministic_steps = True   # samplers chain ``flow`` instead of re-noising

    def __init__(self, backbone: nn.Module, sigma_min: float = SIGMA_MIN, sigma_max: float = 999.0,
                 sigma_data: float = SIGMA_DATA, default_sigmas: dict | None = None):
        if not takes_second_time(backbone):
            raise ValueError(f"MeanFlow needs a backbone with two time inputs, got a one-time "
                             f"{type(backbone).__name__}; set model.times = 2")
        super().__init__(backbone, sigma_min, sigma_max, sigma_data, default_sigmas)

    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """``u(z, r, t)``; the network sees ``t`` and ``t - r`` (see ``core.trigflow``)."""
        return two_time_forward(self.backbone, z, t, t - r, **cond)

    def forward(self, x: torch.Tensor, sigma=None, raw_time=None, **cond) -> torch.Tensor:
        if raw_time is not None:  # u(z, r, t) with raw_time = (r, t)
            return self.average_velocity(x, *raw_time, **cond)
        return self.flow(x, sigma, 0.0, **cond)

    def flow(self, x: torch.Tensor, sigma_from, sigma_to=0.0, **cond) -> torch.Tensor:
        """``x_{sigma_to}`` from ``x_{sigma_from}``: ``z_r = z_t - (t - r) u(z_t, r, t)`` with ``z = x / (1 + sigma)``.
        At sigma_from = 0, t = r = 0 and the jump is the identity exactly."""
        s_from, s_to = as_batch_sigma(sigma_from, x), as_batch_sigma(sigma_to, x)
        t, r = sigma_to_flow(s_from), sigma_to_flow(s_to)
        z = x / append_dims(1 + s_from, x.ndim)
        z_r = z - append_dims(t - r, x.ndim) * self.average_velocity(z, r, t, **cond)
        return append_dims(1 + s_to, x.ndim) * z_r

    def karras_schedule(self, steps: int) -> list[float]:
        """MeanFlow's own schedule: flow times evenly spaced from t_max down (2 steps: t_max, t_max / 2)."""
        t_max = sigma_to_flow(torch.tensor(self.sigma_max, dtype=torch.float64))
        return flow_to_sigma(t_max * (1 - torch.arange(steps, dtype=torch.float64) / steps)).tolist()
