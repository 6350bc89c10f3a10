"""MeanFlow (Geng et al. 2025): a one-step generator trained on the average velocity of the flow
``z_t = (1 - t) x0 + t eps``. The average velocity from r to t, ``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``,
satisfies the MeanFlow identity (differentiate ``(t - r) u = int_r^t v`` in t)

    u(z_t, r, t) = v(z_t, t) - (t - r) (v d_z u + d_t u),

so the network regresses onto the right-hand side with its own stop-gradient derivatives (one JVP with tangents
``(v, 0, 1)`` on ``(z, r, t)``) and the conditional velocity ``v = eps - x0``:

    loss = sg(w) ||u_theta(z_t, r, t) - sg(u_tgt)||^2,   w = 1 / (||.||^2 + c)^p   (||.||^2: the mean over elements)

(t, r): two logit-normal draws, t the larger; a share ``1 - r_neq_t`` of pairs has r = t (plain flow matching).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core import SIGMA_DATA, SIGMA_MIN, append_dims
from ..core.checks import finite_number, in_range
from ..core.proposals import meanflow_times
from ..models import MeanFlowModel
from .base import BuildContext, ObjectiveConfig, register_objective, replaying_draws, unwrapped
from .tangents import check_tangent_method, directional_derivative


@dataclass
class MeanFlowConfig(ObjectiveConfig):
    kind: str = "meanflow"
    p_mean: float = -0.4                # t, r: sigmoid of N(p_mean, p_std^2)
    p_std: float = 1.0
    r_neq_t: float = 0.25               # share of pairs with r != t
    power: float = 1.0                  # adaptive loss weight 1 / (||delta||^2 + c)^p (0: plain squared L2)
    c: float = 1e-3
    tangent: str = "jvp"                # jvp | jvp_math | finite_difference
    fd_step: float = 1e-3
    sigma_max: float = 999.0            # sampling starts at flow time t = sigma_max / (1 + sigma_max)


def meanflow_target(u, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, method: str = "jvp",
                    fd_step: float = 1e-3, replay=None) -> torch.Tensor:
    """``v - (t - r) (v d_z u + d_t u)`` for ``u(z, r, t)``, the total derivative by one JVP (stop-gradient)."""
    _, dudt = directional_derivative(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), method, fd_step,
                                     replay or contextlib.nullcontext)
    return v - append_dims(t - r, z.ndim) * dudt.to(v.dtype)


def adaptive_l2(delta: torch.Tensor, power: float, c: float) -> torch.Tensor:
    """Per sample ``sg(w) ||delta||^2`` with ``w = 1 / (||delta||^2 + c)^p``, ``||.||^2`` the mean over elements: for
    p = 1 close to ``log(||delta||^2 + c)``'s gradient, which keeps large-error samples from dominating."""
    sq = delta.pow(2).flatten(1).mean(1)
    return (sq.detach() + c).pow(-power) * sq


class MeanFlowLoss:
    def __init__(self, p_mean: float = -0.4, p_std: float = 1.0, r_neq_t: float = 0.25, power: float = 1.0,
                 c: float = 1e-3, tangent: str = "jvp", fd_step: float = 1e-3):
        check_tangent_method(tangent, fd_step)
        if not power >= 0:
            raise ValueError(f"objective.power (the adaptive weight's p; 0 is plain squared L2) must be >= 0, "
                             f"got {power}")
        finite_number(p_mean, "objective.p_mean", "MeanFlow's is -0.4")
        if not 0 <= r_neq_t <= 1 or not c > 0 or not p_std > 0:
            raise ValueError(f"objective.r_neq_t must lie in [0, 1], objective.c and objective.p_std be > 0; "
                             f"got {r_neq_t}, {c}, {p_std}")
        self.p_mean, self.p_std, self.r_neq_t, self.power, self.c = p_mean, p_std, r_neq_t, power, c
        self.tangent, self.fd_step = tangent, fd_step

    def target_ema(self, step: int) -> float:
        return 0.0

    def times(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return meanflow_times(n, self.p_mean, self.p_std, self.r_neq_t, device=device)

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        r, t = (v.to(x0.dtype) for v in self.times(x0.shape[0], x0.device))
        eps = torch.randn_like(x0)
        z = append_dims(1 - t, x0.ndim) * x0 + append_dims(t, x0.ndim) * eps
        v = eps - x0
        net = target if target is not None else unwrapped(model)
        replay = replaying_draws(net, x0.device)
        u_tgt = meanflow_target(lambda zz, rr, tt: net(zz, raw_time=(rr, tt), **cond), z, r, t, v, self.tangent,
                                self.fd_step, replay)
        with replay():
            u = model(z, raw_time=(r, t), **cond)
        return adaptive_l2(u - u_tgt, self.power, self.c).mean()


@register_objective("meanflow", MeanFlowConfig, job="train")
def build(cfg: MeanFlowConfig, ctx: BuildContext):
    """MeanFlow: one- and few-step generation from a two-time average-velocity network, no teacher."""
    if ctx.teacher is not None:
        raise ValueError("objective.kind 'meanflow' trains without a teacher, but one is given; remove teacher.path")
    in_range(cfg.sigma_max, "objective.sigma_max", 0, low_open=True,
             fix="sampling starts at flow time sigma_max / (1 + sigma_max); MeanFlow's is 999")
    model = MeanFlowModel(ctx.make_backbone(), SIGMA_MIN, cfg.sigma_max, SIGMA_DATA)
    return model, MeanFlowLoss(cfg.p_mean, cfg.p_std, cfg.r_neq_t, cfg.power, cfg.c, cfg.tangent, cfg.fd_step)
