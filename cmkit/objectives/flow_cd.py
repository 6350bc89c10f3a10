"""Consistency distillation of a flow-matching teacher (SD3, Flux): LCM's recipe carried over to flow time, with a
student the teacher's own pipeline samples unchanged (``latent.flow_student``).

Per sample: an adjacent pair of the teacher's own pipeline grid (``num_grid_steps`` steps, from t = 1, sigma = inf,
to 0), ``sigma_hi > sigma_lo``; ``x_hi = z0 + sigma_hi eps`` (the unit noise eps itself at sigma = inf); one guided
teacher step of ``objective.solver`` (Euler: the pipeline's own step), with the guidance scale ``w ~ U[w_min,
w_max]`` (SD3: classifier-free guidance, two passes; Flux-dev: its guidance embedding, one pass); and

    loss = d(f_theta(x_hi, sigma_hi), f_target(x_lo, sigma_lo)),    f(x, sigma) = x_t - t v(x_t, t),

with ``f(x, 0) = x`` exactly at the end of the grid. The student takes no guidance input: the guidance is folded in
and it samples at ``guidance_scale = 1``. The target is an EMA of the student or, at ``target_ema = 0``, the student
itself under stop-gradient. ``flow_cd_lora`` trains a LoRA adapter on the teacher's own transformer and switches it
off for the teacher's pass, so one transformer is held.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..core import append_dims
from ..core.checks import finite_number
from ..core.proposals import uniform_index_pairs
from ..latent.autoencoder import latent_normalisation
from ..latent.denoiser import TextToImageModel
from ..latent.flow_student import FlowConsistencyModel, add_transformer_lora
from ..latent.students import adapters_off
from ..solvers import SOLVERS, ode_step, step_solvers
from .base import BuildContext, GuidedLatentBatches, ObjectiveConfig, encoded_captions, register_objective
from .distances import make_distance
from .students import LoRAKeys, latent_teacher, lora_spec


@dataclass
class FlowCDConfig(ObjectiveConfig):
    kind: str = "flow_cd"
    num_grid_steps: int = 25           # the teacher's pipeline grid the adjacent pairs are drawn from
    solver: str = "euler"              # the teacher's step (any cmkit step solver)
    w_min: float = 4.0                 # guidance scale w ~ U[w_min, w_max], the pipeline's convention (1: none)
    w_max: float = 4.0
    distance: str = "l2"               # l2 | huber (elementwise pseudo-Huber, as LCM's script)
    huber_c: float = 0.001
    target_ema: float = 0.95           # 0: the student itself under stop-gradient
    sample_steps: int = 4              # the step count recorded as the student's default
    sampler: str = "euler"             # what the export samples with: euler (deterministic) | consistency (re-noising)
    teacher_pipeline: str = "any"      # the pipeline class the recipe was written for (checked), or "any"


@dataclass
class FlowCDLoRAConfig(LoRAKeys, FlowCDConfig):
    kind: str = "flow_cd_lora"
    target_ema: float = 0.0


def pseudo_huber(x, y, c: float):
    return ((x - y).float().pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


class FlowConsistencyDistillation(GuidedLatentBatches):
    def __init__(self, teacher: TextToImageModel, encoded, cfg: FlowCDConfig, lora: bool = False):
        self.grid = torch.tensor(teacher.grid(cfg.num_grid_steps, None), dtype=torch.float64)
        self.teacher, self.encoded, self.cfg, self.lora = teacher, encoded, cfg, lora
        self.normalisation = latent_normalisation(teacher.vae)
        self.distance = (lambda x, y: pseudo_huber(x, y, cfg.huber_c)) if cfg.distance == "huber" \
            else make_distance(cfg.distance)

    def pairs(self, n: int, device, dtype):
        """Adjacent (sigma_hi, sigma_lo) of the teacher's grid, one per sample."""
        if self.grid.device != device:  # moved once, not every step
            self.grid = self.grid.to(device)
        i = uniform_index_pairs(n, len(self.grid)).to(device)  # drawn on the CPU generator, then moved
        return self.grid[i].to(dtype), self.grid[i + 1].to(dtype)

    def __call__(self, model, z0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        n = z0.shape[0]
        s_hi, s_lo = self.pairs(n, z0.device, z0.dtype)
        eps = torch.randn_like(z0)
        x_hi = torch.where(append_dims(torch.isinf(s_hi), z0.ndim), eps, z0 + append_dims(s_hi, z0.ndim) * eps)
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(n, device=z0.device)
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        with torch.no_grad():  # before the student's pass: as in LCM, a lower peak with the same numbers
            with self._teacher_weights():
                x_lo = ode_step(self.teacher, x_hi, s_hi, s_lo, solver=self.cfg.solver, **cond, guidance_scale=w)
            tgt = (model if target is None else target)(x_lo, s_lo, **pos)
        online = model(x_hi, s_hi, **pos)
        return self.distance(online.float(), tgt.float()).mean()

    def _teacher_weights(self):
        """A LoRA student: the teacher is the student's own transformer with its adapter switched off."""
        return adapters_off(self.teacher.network) if self.lora else contextlib.nullcontext()


def _prepare(cfg: FlowCDConfig, ctx: BuildContext):
    teacher = latent_teacher(cfg, ctx, flow=True)
    if cfg.solver not in SOLVERS or SOLVERS[cfg.solver].step is None:
        raise ValueError(f"objective.solver must be a step solver ({', '.join(step_solvers())}), got {cfg.solver!r}")
    finite_number(cfg.w_max, "objective.w_max", "the largest guidance scale drawn")
    if not 1 <= cfg.w_min <= cfg.w_max:
        raise ValueError(f"objective.w_min ({cfg.w_min}) must be >= 1 and <= objective.w_max ({cfg.w_max})")
    if cfg.num_grid_steps < 1 or cfg.sample_steps < 1:
        raise ValueError("objective.num_grid_steps and objective.sample_steps must be >= 1")
    if not 0 <= cfg.target_ema < 1:
        raise ValueError(f"objective.target_ema must be in [0, 1), got {cfg.target_ema}")
    if cfg.distance == "huber" and not cfg.huber_c > 0:
        raise ValueError(f"objective.huber_c must be > 0, got {cfg.huber_c}")
    return teacher, encoded_captions(cfg.kind, ctx, teacher)


def flow_student(teacher: TextToImageModel, ctx: BuildContext, steps: int, guidance_scale: float,
                 lora: dict | None = None, sampler: str = "euler") -> FlowConsistencyModel:
    """The few-step student of a flow teacher: a full copy of its transformer, or (``lora``: rank, alpha, targets)
    a LoRA adapter on the teacher's own, whose base with the adapter off stays the teacher."""
    if lora is None:
        student = copy.deepcopy(teacher.denoiser).float().requires_grad_(True)  # trained in float32 whatever the
        # teacher is held in
        teacher.denoiser.requires_grad_(False)
        return FlowConsistencyModel(student, teacher, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                    base=ctx.teacher_path)
    if not ctx.teacher_path:
        raise ValueError("a LoRA student records its base teacher for loading the adapter later; give it by path "
                         "(teacher.path or --teacher)")
    add_transformer_lora(teacher.network, lora["rank"], lora["alpha"], lora["targets"])
    return FlowConsistencyModel(teacher.denoiser, teacher, lora=True, steps=steps, guidance_scale=guidance_scale,
                                sampler=sampler, base=ctx.teacher_path)


@register_objective("flow_cd", FlowCDConfig, job="distill", teacher="required")
def build(cfg: FlowCDConfig, ctx: BuildContext):
    """Consistency distillation of a flow teacher: a full copy of its transformer, initialised from it."""
    teacher, encoded = _prepare(cfg, ctx)
    model = flow_student(teacher, ctx, cfg.sample_steps, (cfg.w_min + cfg.w_max) / 2, sampler=cfg.sampler)
    return model, FlowConsistencyDistillation(teacher, encoded, cfg)


@register_objective("flow_cd_lora", FlowCDLoRAConfig, job="distill", teacher="required")
def build_lora(cfg: FlowCDLoRAConfig, ctx: BuildContext):
    """A LoRA adapter on the flow teacher's own transformer; the base with the adapter off is the teacher."""
    teacher, encoded = _prepare(cfg, ctx)
    if cfg.target_ema != 0:
        raise ValueError("objective.target_ema must be 0 for flow_cd_lora: the adapter's target is itself under "
                         "stop-gradient (a copy would need a second transformer)")
    model = flow_student(teacher, ctx, cfg.sample_steps, (cfg.w_min + cfg.w_max) / 2,
                         lora_spec(cfg, teacher), cfg.sampler)
    return model, FlowConsistencyDistillation(teacher, encoded, cfg, lora=True)
