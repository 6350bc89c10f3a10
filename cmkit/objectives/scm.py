"""Continuous-time consistency models in TrigFlow (sCM, Lu & Song 2024): sCT (no teacher) and sCD (a teacher's
PF-ODE). With ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sd^2 I)`` and the model ``f = cos(t) x_t - sin(t) sd F``:

    dx_t/dt = cos(t) z - sin(t) x0                           (sCT: the data pair)
            = (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin t   (sCD: the teacher's PF-ODE, D in sigma space)
    g       = -cos^2(t) (sd F^- - dx_t/dt) - r sin(t) cos(t) (x_t + sd dF^-/dt)   (= cos(t) df^-/dt at r = 1)
    g      <- g / (||g|| + c)
    loss    = e^{w_phi(t)} / D ||F_theta - F^- - g||^2 - w_phi(t)

``F^-`` is the stop-gradient network; ``dF^-/dt`` its total derivative along the trajectory, one JVP with tangents
``(sin t cos t dx_t/dt / sd, sin t cos t)`` (the factor sin t cos t keeps the JVP's output small). The cos(t) in g
is sCM's prior weighting ``1 / (sd tan t)`` times the ``sd sin t`` of the model's c_out. ``r`` grows from 0 to 1
over the first ``tangent_warmup`` steps; ``w_phi`` is a learnt log-weight of t (the objective's own parameters). t
comes from the proposal ``sd tan t = e^tau``, ``tau ~ N(P_mean, P_std^2)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..core import append_dims, trig_velocity_from_x0
from ..core.checks import finite_number, in_range
from ..core.proposals import trigflow_times
from ..models import TrigFlowConsistencyModel
from ..models.backbones import sinusoidal_embedding
from .base import BuildContext, LevelsConfig, register_objective, replaying_draws, unwrapped
from .students import levels_within_teacher
from .tangents import check_tangent_method, directional_derivative


@dataclass
class SCTConfig(LevelsConfig):
    kind: str = "sct"
    p_mean: float = -1.0                # proposal: log(sd tan t) ~ N(p_mean, p_std^2)
    p_std: float = 1.4
    tangent_warmup: int = 10000         # steps over which the tangent's second term is ramped in (0: none)
    tangent_norm_c: float = 0.1         # g / (||g|| + c)
    adaptive_weight: bool = True        # the learnt w_phi(t)
    weight_embed_dim: int = 128         # w_phi's Fourier features of c_noise(t)
    tangent: str = "jvp"                # jvp | jvp_math | finite_difference (backbones without forward-mode AD)
    fd_step: float = 1e-3               # the finite difference's step along the tangent


@dataclass
class SCDConfig(SCTConfig):
    kind: str = "scd"
    p_mean: float = -0.8
    p_std: float = 1.6


class AdaptiveWeight(nn.Module):
    """``w_phi(t)``: one linear layer on sinusoidal features of the network's time input, starting at 0 (weight 1)."""

    def __init__(self, embed_dim: int = 128):
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"objective.weight_embed_dim must be an even number >= 2, got {embed_dim}")
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t.float(), self.embed_dim)
        return self.linear(features.to(self.linear.weight.dtype))[:, 0]


def normalise_tangent(g: torch.Tensor, c: float) -> torch.Tensor:
    """``g / (||g|| + c)`` per sample (the norm over all of a sample's elements)."""
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / append_dims(norm + c, g.ndim)


def adaptive_weighted_loss(sq_err: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """Per sample ``e^w / D ||.||^2 - w`` from the summed squared error ``sq_err``."""
    return torch.exp(w) / dim * sq_err - w


def scm_tangent(net, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, sigma_data: float, r: float = 1.0,
                method: str = "jvp", fd_step: float = 1e-3, replay=None, **cond):
    """``(F^-, g)`` with g the unnormalised tangent (``cos(t) df^-/dt`` at r = 1); ``net(x, raw_time=t)`` is F."""
    replay = replay or contextlib.nullcontext
    sc1 = torch.sin(t) * torch.cos(t)
    cos, sc = append_dims(torch.cos(t), x_t.ndim), append_dims(sc1, x_t.ndim)
    f_minus, dfdt = directional_derivative(lambda x, tt: net(x, raw_time=tt, **cond), (x_t / sigma_data, t),
                                           (sc * dxdt / sigma_data, sc1), method, fd_step, replay)
    if f_minus is None:  # finite difference: the primal is one more pass
        with torch.no_grad(), replay():
            f_minus = net(x_t / sigma_data, raw_time=t, **cond)
    g = -cos * cos * (sigma_data * f_minus - dxdt) - r * (sc * x_t + sigma_data * dfdt)
    return f_minus, g


class SCMLoss(nn.Module):
    """sCT / sCD (module docstring). ``teacher`` None: sCT."""

    def __init__(self, sigma_data: float, sigma_min: float, sigma_max: float, teacher=None, p_mean: float = -1.0,
                 p_std: float = 1.4, tangent_warmup: int = 10000, tangent_norm_c: float = 0.1,
                 adaptive_weight: bool = True, weight_embed_dim: int = 128, tangent: str = "jvp",
                 fd_step: float = 1e-3):
        super().__init__()
        check_tangent_method(tangent, fd_step)
        # written so that NaN fails each check (NaN passes every `x < 0` test, and trains nothing but skipped steps)
        if not tangent_warmup >= 0:
            raise ValueError(f"objective.tangent_warmup must be >= 0, got {tangent_warmup}")
        in_range(tangent_norm_c, "objective.tangent_norm_c", 0, fix="sCM's is 0.1")
        in_range(p_std, "objective.p_std", 0, low_open=True, fix="sCT's is 1.4, sCD's 1.6")
        finite_number(p_mean, "objective.p_mean", "sCT's is -1.0, sCD's -0.8")
        self.__dict__["teacher"] = teacher  # not a submodule: never optimised, never checkpointed
        self.sd, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.warmup, self.c, self.tangent, self.fd_step = tangent_warmup, tangent_norm_c, tangent, fd_step
        self.weight = AdaptiveWeight(weight_embed_dim) if adaptive_weight else None

    def target_ema(self, step: int) -> float:
        return 0.0

    def times(self, n: int, device) -> torch.Tensor:
        return trigflow_times(n, self.p_mean, self.p_std, self.sd, self.sigma_min, self.sigma_max, device=device)

    def velocity(self, x_t, x0, z, t, **cond) -> torch.Tensor:
        cos, sin = (append_dims(v, x_t.ndim) for v in (torch.cos(t), torch.sin(t)))
        if self.teacher is None:
            return cos * z - sin * x0
        with torch.no_grad():
            return trig_velocity_from_x0(x_t, self.teacher(x_t / cos, self.sd * torch.tan(t), **cond),
                                         append_dims(t, x_t.ndim))

    def forward(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        t = self.times(x0.shape[0], x0.device).to(x0.dtype)
        z = self.sd * torch.randn_like(x0)
        x_t = append_dims(torch.cos(t), x0.ndim) * x0 + append_dims(torch.sin(t), x0.ndim) * z
        dxdt = self.velocity(x_t, x0, z, t, **cond)
        net = target if target is not None else unwrapped(model)
        replay = replaying_draws(net, x0.device)
        r = min(1.0, step / self.warmup) if self.warmup else 1.0
        f_minus, g = scm_tangent(net, x_t, t, dxdt, self.sd, r, self.tangent, self.fd_step, replay, **cond)
        g = normalise_tangent(g, self.c).to(x0.dtype)
        with replay():
            f_online = model(x_t / self.sd, raw_time=t, **cond)
        sq = (f_online - f_minus.to(x0.dtype) - g).pow(2).flatten(1).sum(1)
        dim = x0[0].numel()
        if self.weight is None:
            return (sq / dim).mean()
        return adaptive_weighted_loss(sq, self.weight(t), dim).mean()


def _scm(cfg: SCTConfig, ctx: BuildContext, teacher, sigma_min: float, sigma_max: float):
    model = TrigFlowConsistencyModel(ctx.make_backbone(), sigma_min, sigma_max, cfg.sigma_data)
    return model, SCMLoss(cfg.sigma_data, sigma_min, sigma_max, teacher, cfg.p_mean, cfg.p_std, cfg.tangent_warmup,
                          cfg.tangent_norm_c, cfg.adaptive_weight, cfg.weight_embed_dim, cfg.tangent, cfg.fd_step)


@register_objective("sct", SCTConfig, job="train")
def build_sct(cfg: SCTConfig, ctx: BuildContext):
    """Continuous-time consistency training in TrigFlow (sCT), no teacher."""
    if ctx.teacher is not None:
        raise ValueError("objective.kind 'sct' trains without a teacher, but one is given; remove teacher.path / "
                         "--teacher, or use kind 'scd'")
    return _scm(cfg, ctx, None, cfg.sigma_min, cfg.sigma_max)


@register_objective("scd", SCDConfig, job="distill", teacher="required")
def build_scd(cfg: SCDConfig, ctx: BuildContext):
    """Continuous-time consistency distillation in TrigFlow (sCD): the tangent follows the teacher's PF-ODE."""
    if ctx.teacher is None:
        raise ValueError("objective.kind 'scd' distils a teacher: pass --teacher PATH or set teacher.path")
    return _scm(cfg, ctx, ctx.teacher, *levels_within_teacher(cfg, ctx.teacher))
