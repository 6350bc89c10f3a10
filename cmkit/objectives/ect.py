"""Easy consistency tuning, ECT (Geng et al. 2024): fine-tuning a model initialised from a diffusion teacher."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core import append_dims
from ..core.proposals import lognormal_sigmas
from .base import BuildContext, LevelsConfig, paired_passes, register_objective
from .distances import make_distance
from .students import levels_within_teacher, student_from_teacher


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0) -> torch.Tensor:
    """ECT's paired level r = max(t (1 - n(t) / q^(stage + 1)), 0) with n(t) = 1 + 8 sigmoid(-t): the gap shrinks
    by a factor q every stage. Computed in float64 so that late stages' tiny gaps t - r do not round to zero."""
    t64 = t.double()
    n = 1 + 8 * torch.sigmoid(-t64)
    return (t64 * (1 - n / q ** (stage + 1))).clamp_min(0)


@dataclass
class ECTConfig(LevelsConfig):
    kind: str = "ect"
    q: float = 2.0                      # the gap t - r shrinks by q each stage
    stage_steps: int = 1000             # steps per stage (d)
    p_mean: float = -1.1                # lognormal t
    p_std: float = 2.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None


class EasyConsistencyTuning:
    """Continuous pairs: t ~ lognormal(P_mean, P_std) (clamped to the model's range), r = max(t (1 - n(t) /
    q^(stage + 1)), 0), n(t) = 1 + 8 sigmoid(-t), stage = floor(k / d). One noise draw and one dropout mask for both
    passes:

        loss = 1 / (t - r) d( f(x0 + t z, t), sg f(x0 + r z, r) ),   and f(., r) := x0 where r < sigma_min.
    """

    MIN_GAP = 1e-3  # relative: t - r >= MIN_GAP t, so late stages cannot divide by a vanishing gap

    def __init__(self, q: float = 2.0, stage_steps: int = 1000, p_mean: float = -1.1, p_std: float = 2.0,
                 distance="pseudo_huber", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 huber_c: float | None = None):
        if q <= 1:
            raise ValueError(f"objective.q must be > 1, got {q}")
        if stage_steps < 1:
            raise ValueError(f"objective.stage_steps must be >= 1, got {stage_steps}")
        self.q, self.stage_steps, self.p_mean, self.p_std = q, int(stage_steps), p_mean, p_std
        # the stage at which the largest gap (n(t) ~ 1) reaches MIN_GAP: later stages would change nothing
        self.max_stage = max(0, math.ceil(math.log(1 / self.MIN_GAP) / math.log(q)) - 1)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.distance = make_distance(distance, huber_c) if isinstance(distance, str) else distance
        self._distance_device = None

    def target_ema(self, step: int) -> float:
        return 0.0

    def stage(self, step: int) -> int:
        return min(step // self.stage_steps, self.max_stage)

    def __call__(self, model, x0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        if isinstance(self.distance, torch.nn.Module) and self._distance_device != x0.device:
            self.distance.to(x0.device)
            self._distance_device = x0.device
        t = lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, self.sigma_min * 1.0001, self.sigma_max,
                             device=x0.device, dtype=x0.dtype)
        r = torch.minimum(ect_r(t, self.stage(step), self.q), t.double() * (1 - self.MIN_GAP))
        at_boundary = r < self.sigma_min
        gap = (t.double() - torch.where(at_boundary, torch.zeros_like(r), r)).to(x0.dtype)
        r = r.to(x0.dtype)
        r_safe = torch.where(at_boundary, torch.full_like(r, self.sigma_min), r)
        z = torch.randn_like(x0)
        x_t = x0 + append_dims(t, x0.ndim) * z
        x_r = x0 + append_dims(r_safe, x0.ndim) * z
        f_online, f_target = paired_passes(model, target, x_t, t, x_r, r_safe, **cond)
        f_target = torch.where(append_dims(at_boundary, x0.ndim), x0, f_target)
        return (self.distance(f_online, f_target) / gap).mean()


@register_objective("ect", ECTConfig, job="train", teacher="required")
def build(cfg: ECTConfig, ctx: BuildContext):
    """Easy consistency tuning (ECT), starting from a teacher's weights."""
    # ECT needs a student that starts out as the teacher: a VP teacher is wrapped whole
    model = student_from_teacher(cfg, ctx, wrap_vp=True)
    sigma_min, sigma_max = levels_within_teacher(cfg, ctx.teacher)
    return model, EasyConsistencyTuning(cfg.q, cfg.stage_steps, cfg.p_mean, cfg.p_std, ctx.distance or cfg.distance,
                                        sigma_min, sigma_max, cfg.huber_c)
