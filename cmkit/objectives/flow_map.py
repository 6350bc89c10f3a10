"""Flow-map distillation of a flow-matching teacher (SD3, Flux, Wan, ...): MeanFlow's identity (``objectives.meanflow``)
along the teacher's *guided* flow instead of the data's conditional one. The student ``u(z_t, r, t)``
(``latent.flow_map``: initialised so that ``u(z, t, t)`` is the teacher's velocity) regresses onto

    u_tgt = v_w(z_t, t) - (t - r) (v_w d_z u + d_t u),     loss = sg(w) ||u(z_t, r, t) - sg(u_tgt)||^2

(``meanflow_target``, ``adaptive_l2``), with ``v_w`` the teacher's classifier-free-guided velocity at a scale
``w ~ U[w_min, w_max]`` (flow CD's draw; folded in: the student samples at guidance 1), the total derivative by one JVP
with tangents ``(v_w, 0, 1)`` on ``(z, r, t)`` (``objective.tangent``: jvp | jvp_math | finite_difference), (t, r)
drawn as MeanFlow draws them (a share ``1 - r_neq_t`` with r = t) and ``z_t = (1 - t) z0 + t eps`` from the cached
latents. Where pixel MeanFlow learns the average of the data's conditional flow ``eps - x0`` (whose average over the
data is the marginal flow), this learns the average of the teacher's own ODE, whose jumps then land where the
teacher's guided sampler would.

``flow_map_lora``: the same loss on a LoRA adapter (``lora_rank`` / ``lora_alpha`` / ``lora_targets``, the family's by
default) over the teacher's own weights, with the r-embedding (a Wan student's ``delta_embedder``) trained in full
beside it; the teacher's pass runs with the adapter off, and the export is the merged, whole student folder (an
``AnyFlowPipeline`` has no base folder of the teacher's class to load a LoRA onto).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core import append_dims
from ..core.checks import finite_number, in_range
from ..latent.autoencoder import latent_normalisation
from ..latent.flow_map import FlowMapModel, teacher_shift
from ..latent.students import adapters_off
from .base import (
    BuildContext,
    GuidedLatentBatches,
    ObjectiveConfig,
    encoded_captions,
    register_objective,
    replaying_draws,
    unwrapped,
)
from .meanflow import MeanFlowLoss, adaptive_l2, meanflow_target
from .students import LoRAKeys, latent_teacher, lora_spec


@dataclass
class FlowMapConfig(ObjectiveConfig):
    kind: str = "flow_map"
    p_mean: float = -0.4                # t, r: sigmoid of N(p_mean, p_std^2), as MeanFlow draws them
    p_std: float = 1.0
    r_neq_t: float = 0.25               # share of pairs with r != t
    power: float = 1.0                  # adaptive loss weight 1 / (||delta||^2 + c)^p (0: plain squared L2)
    c: float = 1e-3
    tangent: str = "jvp"                # jvp | jvp_math | finite_difference
    fd_step: float = 1e-4               # the transformers see 1000 t through unit-frequency sinusoids: a small step
    w_min: float = 4.0                  # the teacher's guidance scale w ~ U[w_min, w_max] (1: none)
    w_max: float = 4.0
    gate_value: float = 0.25            # a Wan student's AnyFlow mix of the t and r embeddings
    sample_steps: int = 4               # the step count recorded as the student's default
    target_ema: float = 0.0             # the JVP's network: 0, the student itself under stop-gradient
    teacher_pipeline: str = "any"       # the pipeline class the recipe was written for (checked), or "any"


def guided_velocity(teacher, z_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond: dict) -> torch.Tensor:
    """The teacher's guided flow velocity ``v_w(z_t, t) = (z_t - D_w) / t`` at flow time ``t`` in (0, 1), through
    its sigma-space denoiser (``x_sigma = z_t / (1 - t)``, ``sigma = t / (1 - t)``)."""
    a = append_dims(1 - t, z_t.ndim)
    cond = {k: v for k, v in cond.items() if k != "guidance_scale"}  # w is the scale
    x0 = teacher(z_t / a, t / (1 - t), guidance_scale=w, **cond)
    return (z_t - x0.to(z_t.dtype)) / append_dims(t, z_t.ndim)


class FlowMapDistillation(GuidedLatentBatches):
    """The loss of the module docstring. ``velocity(z_t, t, w, cond)``: the instantaneous velocity of the flow the
    student learns (the teacher's guided one; a closed form in tests)."""

    def __init__(self, velocity, cfg: FlowMapConfig, encoded=None, normalisation=None):
        self.mf = MeanFlowLoss(cfg.p_mean, cfg.p_std, cfg.r_neq_t, cfg.power, cfg.c, cfg.tangent, cfg.fd_step)
        self.velocity, self.cfg, self.encoded, self.normalisation = velocity, cfg, encoded, normalisation

    def pairs(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, t)``, MeanFlow's draw."""
        return self.mf.times(n, device)

    def __call__(self, model, z0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        n, c = z0.shape[0], self.cfg
        r, t = (v.to(z0.dtype) for v in self.pairs(n, z0.device))
        z = append_dims(1 - t, z0.ndim) * z0 + append_dims(t, z0.ndim) * torch.randn_like(z0)
        w = c.w_min + (c.w_max - c.w_min) * torch.rand(n, device=z0.device)
        with torch.no_grad():
            v = self.velocity(z, t, w, cond).to(z0.dtype)
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        net = target if target is not None else unwrapped(model)
        replay = replaying_draws(net, z0.device)
        u_tgt = meanflow_target(lambda zz, rr, tt: net(zz, rr, tt, **pos), z, r, t, v, c.tangent, c.fd_step, replay)
        with replay():
            u = model(z, r, t, **pos)
        return adaptive_l2(u - u_tgt.to(u.dtype), c.power, c.c).mean()


def _check(cfg: FlowMapConfig, teacher) -> None:
    finite_number(cfg.w_max, "objective.w_max", "the largest guidance scale drawn")
    if not 1 <= cfg.w_min <= cfg.w_max:
        raise ValueError(f"objective.w_min ({cfg.w_min}) must be >= 1 and <= objective.w_max ({cfg.w_max})")
    if isinstance(cfg.sample_steps, bool) or not isinstance(cfg.sample_steps, int) or cfg.sample_steps < 1:
        raise ValueError(f"objective.sample_steps must be an integer >= 1, got {cfg.sample_steps!r}")
    if cfg.target_ema != 0:
        raise ValueError("objective.target_ema must be 0 for flow_map: the identity's derivative is the student's "
                         "own under stop-gradient, as MeanFlow's")
    in_range(cfg.gate_value, "objective.gate_value", 0, 1, low_open=True, fix="AnyFlow's is 0.25")


@dataclass
class FlowMapLoRAConfig(LoRAKeys, FlowMapConfig):
    kind: str = "flow_map_lora"


def _build(cfg: FlowMapConfig, ctx: BuildContext, lora: bool):
    import copy

    teacher = latent_teacher(cfg, ctx, flow=True)
    _check(cfg, teacher)
    MeanFlowLoss(cfg.p_mean, cfg.p_std, cfg.r_neq_t, cfg.power, cfg.c, cfg.tangent, cfg.fd_step)  # its checks, first
    spec = lora_spec(cfg, teacher) if lora else None
    if not lora:
        teacher.denoiser.requires_grad_(False)
    network = teacher.family.flow_map_network(teacher, cfg.gate_value, spec)
    encoded = encoded_captions(cfg.kind, ctx, teacher)
    # the teacher's velocity at float times (a Wan folder's UniPC hands its network whole ones): its students' grid
    den = copy.copy(teacher.denoiser)
    den.scheduler = teacher.family.student_scheduler(teacher, teacher.denoiser.scheduler)
    model = FlowMapModel(network, teacher, steps=cfg.sample_steps, guidance_scale=(cfg.w_min + cfg.w_max) / 2,
                         shift=teacher_shift(teacher), base=ctx.teacher_path, lora=lora)
    shared = lora and bool(getattr(teacher.network, "peft_config", None))  # the adapter sits on the teacher's own

    def velocity(z, t, w, cond):
        with adapters_off(teacher.network) if shared else contextlib.nullcontext():  # the teacher's pass: none
            return guided_velocity(den, z, t, w, cond)

    return model, FlowMapDistillation(velocity, cfg, encoded, latent_normalisation(teacher.vae))


@register_objective("flow_map", FlowMapConfig, job="distill", teacher="required")
def build(cfg: FlowMapConfig, ctx: BuildContext):
    """Flow-map distillation: an any-step student u(z_t, r, t) of a flow teacher's guided flow (MeanFlow's identity)."""
    return _build(cfg, ctx, lora=False)


@register_objective("flow_map_lora", FlowMapLoRAConfig, job="distill", teacher="required")
def build_lora(cfg: FlowMapLoRAConfig, ctx: BuildContext):
    """A flow-map student as a LoRA adapter (and its r-embedding) on the teacher's own weights, exported merged."""
    return _build(cfg, ctx, lora=True)

