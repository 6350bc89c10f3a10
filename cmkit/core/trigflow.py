"""Continuous-time parameterisations and their exact maps to and from sigma space.

TrigFlow (Lu & Song 2024): ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``. Writing
``z = sigma_d eps`` gives ``x_t = cos(t) (x0 + sigma_d tan(t) eps) = cos(t) x_sigma`` with ``sigma = sigma_d tan t``:
the same noisy sample, scaled. Its consistency model ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)``
is, in sigma space, ``f = cos^2(t) x_sigma - sigma_d sin(t) F(cos(t) x_sigma / sigma_d, t)``: EDM's c_skip and c_in
(``cos^2 t = sd^2 / (sigma^2 + sd^2)``, ``cos(t) / sd = 1 / sqrt(sigma^2 + sd^2)``) and c_out = ``-sd sin t``.

Flow matching (MeanFlow, Geng et al. 2025): ``z_t = (1 - t) x0 + t eps``, ``t in [0, 1]``, so
``z_t = (1 - t) x_sigma`` with ``sigma = t / (1 - t)``.

The maps between these times and sigma are the schedules' own (``TrigFlowSchedule``, ``FlowMatchSchedule`` in
``schedules.py``, exact at sigma = 0 and sigma = inf); the functions here name them.

The networks' time inputs are the times themselves: TrigFlow's t in [0, pi/2] (sCM's c_noise(t) = t), and MeanFlow's
t and t - r in [0, 1]. The continuous-time objectives train on the network's derivative in t (a JVP), and a time
input scaled up for sinusoidal embeddings puts high frequencies into that derivative: measured on 1-D Gaussian data
with the exact teacher (sCD, 1500 steps), a scale of 1 or 10 converged (one-step RMS error 0.02 / 0.05 of the exact
map), 100 and 2000/pi (DDPM's 0..1000) did not move from the start (0.56). MeanFlow on the S-curve: one-step sliced
W2 0.059 with scale 1 against 0.38 with 1000. (The same reason sCM gives for leaving 250 log(sigma), whose
derivative 250 / (sin t cos t) blows up at both ends.)
"""

from __future__ import annotations

import math

import torch

from .scalings import SIGMA_DATA
from .schedules import FlowMatchSchedule, TrigFlowSchedule

_FLOW = FlowMatchSchedule()


def sigma_to_trig(sigma, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """TrigFlow time ``t = arctan(sigma / sigma_d)`` (pi/2 at sigma = inf): ``TrigFlowSchedule.time``."""
    return TrigFlowSchedule(sigma_data).time(sigma)


def trig_to_sigma(t, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Sigma of TrigFlow time t in (0, pi/2): ``sigma = sigma_d tan t`` (``TrigFlowSchedule.sigma``), refusing times
    outside that interval."""
    t = torch.as_tensor(t)
    return TrigFlowSchedule(sigma_data).sigma(check_trig_times(t if t.is_floating_point() else t.double()))


def trig_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """TrigFlow's consistency model in sigma space, ``(c_skip, c_out, c_in)`` at TrigFlow time t:
    ``(cos^2 t, -sigma_d sin t, cos(t) / sigma_d)``, so ``f(x_sigma, 0) = x_sigma`` exactly."""
    cos, sin = torch.cos(t), torch.sin(t)
    return cos * cos, -sigma_data * sin, cos / sigma_data


def check_trig_times(t: torch.Tensor, what: str = "TrigFlow time t") -> torch.Tensor:
    """Refuse times outside (0, pi/2) in one line (t = pi/2 is pure noise, sigma = inf)."""
    inside = (t > 0) & (t < math.pi / 2)
    if not bool(inside.all()):
        bad = t[~inside].flatten()[0].item()
        raise ValueError(f"{what} must lie in (0, pi/2), got {bad}")
    return t


def trig_velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The PF-ODE velocity ``dx_t/dt`` at ``x_t`` given the denoised estimate ``x0``: with ``z = (x_t - cos t x0) /
    sin t`` along the trajectory, ``dx_t/dt = cos t z - sin t x0 = (cos t x_t - x0) / sin t``."""
    return (torch.cos(t) * x_t - x0) / torch.sin(t)


def sigma_to_flow(sigma) -> torch.Tensor:
    """Flow-matching time ``t = sigma / (1 + sigma)``, exactly 1 at sigma = inf and 0 at 0:
    ``FlowMatchSchedule.time``."""
    return _FLOW.time(sigma)


def flow_to_sigma(t) -> torch.Tensor:
    """Sigma of flow-matching time t: ``sigma = t / (1 - t)`` (inf at t = 1): ``FlowMatchSchedule.sigma``."""
    return _FLOW.sigma(t)
