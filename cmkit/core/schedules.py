"""Noise schedules as objects: each family's native time, its exact maps to and from sigma, its input scaling, and
the conversion of every model-output kind to x0, in one place.

Every schedule writes its noisy sample as ``x_n = a(sigma) x0 + b(sigma) eps`` with ``b / a = sigma``, so
``x_sigma = x_n / a`` is cmkit's sigma-space sample (``x_sigma = x0 + sigma eps``):

- VP / DDPM (a table of ``alphas_cumprod``): ``a = sqrt(abar) = 1 / sqrt(1 + sigma^2)``, ``b = sqrt(1 - abar)``;
  native time: the continuous timestep index (``log sigma`` interpolated over the table).
- Flow matching / rectified flow (SD3, Flux): ``x_t = (1 - t) x0 + t eps``: ``a = 1 - t``, ``b = t``,
  ``sigma = t / (1 - t)``; native time t in [0, 1]. Its velocity output ``v = eps - x0`` gives ``x0 = x_t - t v``.
- EDM: ``a = 1``, ``b = sigma``; native time sigma.
- TrigFlow: ``x_t = cos(t) x0 + sin(t) sigma_d eps``: ``a = cos t``, ``b = sigma_d sin t``, ``sigma = sigma_d tan t``.

Pure noise, ``sigma = inf`` (flow t = 1, where SD3's and Flux's pipelines start; a zero-terminal-SNR VP table's last
step), has no finite ``x_sigma``. There the sampler's state holds ``lim x_sigma / sigma = eps`` (the unit noise),
and ``to_native`` / ``from_native`` read it that way (``x_n = b(inf) eps``); every solver step is written so that a
step from sigma = inf needs only ``D`` there (see ``cmkit.solvers``).
"""

from __future__ import annotations

import math

import torch

from .scalings import SIGMA_DATA


def _t(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.double()


class NoiseSchedule:
    """The base: ``alpha(sigma)``, ``beta(sigma)`` (finite at sigma = inf), the native-time maps, and the output
    conversions that follow from ``x_n = a x0 + b eps``."""

    kind = "schedule"
    outputs: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def beta(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time(self, sigma) -> torch.Tensor:
        """The schedule's native time of ``sigma``."""
        raise NotImplementedError

    def sigma(self, time) -> torch.Tensor:
        """The sigma of a native time (the inverse of ``time``)."""
        raise NotImplementedError

    def to_native(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The sigma-space state as the network's input ``x_n`` (at sigma = inf the state holds eps)."""
        a, b = self.alpha(sigma), self.beta(sigma)
        return torch.where(torch.isinf(sigma), x * b, x * a)

    def from_native(self, x_n: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_native``: ``x_n / a`` (``x_n / b`` at sigma = inf)."""
        a, b = self.alpha(sigma), self.beta(sigma)
        return torch.where(torch.isinf(sigma), x_n / b, x_n / a)

    def to_x0(self, output_kind: str, x_n: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 from a network output of ``output_kind`` at the native sample ``x_n`` (``sigma`` broadcastable)."""
        a, b = self.alpha(sigma), self.beta(sigma)
        if output_kind == "epsilon":
            return (x_n - b * out) / a            # undefined at sigma = inf, as for the network itself
        if output_kind == "v_prediction":       # v = a eps - b x0  =>  a x_n - b v = (a^2 + b^2) x0
            return (a * x_n - b * out) / (a * a + b * b)
        if output_kind == "sample":
            return out
        if output_kind in self.outputs:
            return self._other_x0(output_kind, x_n, sigma, out)
        raise ValueError(f"a {self.kind} schedule converts {', '.join(self.outputs)} outputs, not {output_kind!r}")

    def _other_x0(self, output_kind, x_n, sigma, out):
        raise NotImplementedError


class VPSchedule(NoiseSchedule):
    """A DDPM table ``alphas_cumprod`` (abar): ``sigma = sqrt((1 - abar) / abar)``; native time the continuous
    timestep, linear in ``log sigma`` between table entries (clamped to the table)."""

    kind = "vp"

    def __init__(self, alphas_cumprod):
        # a zero-terminal-SNR table (rescale_betas_zero_snr) ends at abar = 0, sigma = inf; the timestep map clamps
        # its last entry as diffusers' Euler and DPM-Solver schedulers do
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp_min(2.0**-24)
        self.log_sigmas = ((1 - abar) / abar).sqrt().log()

    def alpha(self, sigma):
        return 1 / (1 + sigma**2).sqrt()

    def beta(self, sigma):
        return 1 / (1 + sigma.pow(-2)).sqrt()

    def time(self, sigma) -> torch.Tensor:
        ls = self.log_sigmas.to(_t(sigma).device)
        log_s = _t(sigma).to(torch.float64).log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo = hi - 1
        return lo + (log_s - ls[lo]) / (ls[hi] - ls[lo])

    def sigma(self, time) -> torch.Tensor:
        ls = self.log_sigmas
        t = torch.as_tensor(time, dtype=torch.float64, device=ls.device).clamp(0, len(ls) - 1)
        lo = t.floor().long().clamp(max=len(ls) - 2)
        frac = t - lo
        return ((1 - frac) * ls[lo] + frac * ls[lo + 1]).exp()


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow ``x_t = (1 - t) x0 + t eps``: ``sigma = t / (1 - t)``, ``t = sigma / (1 + sigma)`` (t = 1 at
    sigma = inf). The shift of a pipeline's grid (``shift_times``, ``flux_mu``) moves where its steps land, not
    what the network sees: the network takes t itself (times ``num_train_timesteps`` in SD3's convention)."""

    kind = "flow"
    outputs = ("epsilon", "v_prediction", "sample", "flow")

    def alpha(self, sigma):
        # 1 - t, computed without the cancellation of 1 - t near t = 1: at sigma 1e6 (a UniPC grid's first point,
        # t = 1 - 1e-6) t's float32 rounding alone is 3% of 1 - t
        return 1 / (1 + sigma)

    def beta(self, sigma):
        return self.time(sigma)

    def time(self, sigma) -> torch.Tensor:
        s = _t(sigma)
        return 1 / (1 + 1 / s)  # = s / (1 + s), and exactly 1 at s = inf (0 at s = 0)

    def sigma(self, time) -> torch.Tensor:
        t = _t(time)
        return t / (1 - t)      # inf at t = 1

    def _other_x0(self, output_kind, x_n, sigma, out):
        # the velocity dx_t/dt = eps - x0 of the flow ODE (what SD3's and Flux's transformers predict)
        return x_n - self.time(sigma) * out


class EDMSchedule(NoiseSchedule):
    """EDM: the sample is ``x_sigma`` itself (``a = 1``); native time sigma."""

    kind = "edm"

    def alpha(self, sigma):
        return torch.ones_like(sigma)

    def beta(self, sigma):
        return sigma

    def to_native(self, x, sigma):
        return x

    def from_native(self, x_n, sigma):
        return x_n

    def time(self, sigma):
        return _t(sigma)

    def sigma(self, time):
        return _t(time)


class TrigFlowSchedule(NoiseSchedule):
    """TrigFlow (sCM): ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2)``: ``sigma = sigma_d tan t``."""

    kind = "trigflow"

    def __init__(self, sigma_data: float = SIGMA_DATA):
        self.sigma_data = float(sigma_data)

    def alpha(self, sigma):
        return torch.cos(self.time(sigma))

    def beta(self, sigma):
        return self.sigma_data * torch.sin(self.time(sigma))

    def time(self, sigma):
        return torch.atan(_t(sigma) / self.sigma_data)

    def sigma(self, time):
        return self.sigma_data * torch.tan(_t(time))


def shift_times(t, shift: float) -> torch.Tensor:
    """SD3's static shift of flow times, as ``FlowMatchEulerDiscreteScheduler`` applies it:
    ``shift t / (1 + (shift - 1) t)`` (in sigma space: sigma times ``shift``)."""
    t = _t(t)
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the number of image tokens, as diffusers'
    ``calculate_shift``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def mu_shift_times(t, mu: float) -> torch.Tensor:
    """The exponential time shift Flux applies with ``mu``: ``e^mu / (e^mu + (1/t - 1))`` (sigma times ``e^mu``)."""
    t = _t(t)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def schedule_of(scheduler) -> NoiseSchedule:
    """The noise schedule a diffusers scheduler object (or its config) describes: a table of ``alphas_cumprod``
    is VP, a ``FlowMatch*`` scheduler is flow matching. (Read by duck typing; core imports no diffusers.)"""
    if isinstance(scheduler, NoiseSchedule):
        return scheduler
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return VPSchedule(scheduler.alphas_cumprod)
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchSchedule()
    raise ValueError(f"scheduler {type(scheduler).__name__} is neither a DDPM-family scheduler (alphas_cumprod) nor "
                     "a flow-matching one (FlowMatchEulerDiscreteScheduler, ...); cmkit reads those two")
