"""Latent consistency distillation (LCM, Luo et al. 2023) of a text-to-image teacher, and LCM-LoRA (Luo et al.
2023b), which trains only a LoRA adapter on the teacher's own UNet.

Per sample: a skipping-step pair of the teacher's discrete timesteps, ``t_n = (n + 1) k - 1`` and
``t_{n-1} = max(t_n - k, 0)`` with ``k = num_train_timesteps / num_ddim_timesteps``; a guidance ``w ~ U[w_min,
w_max]`` (LCM's convention: the guidance scale is ``1 + w``); ``z_n = z_0 + sigma_n eps``; one guided teacher DDIM
step in sigma space,

    x0_w = D_uncond + (1 + w) (D_cond - D_uncond),    z_{n-1} = x0_w + (sigma_{n-1} / sigma_n) (z_n - x0_w),

and the loss ``d(f_theta(z_n, t_n, w), f_target(z_{n-1}, t_{n-1}, w))`` with ``f`` as ``LCMFunction`` (the scalings
``LCMScheduler`` samples with). The target network is an EMA of the student (LCM: 0.95) or, at ``target_ema = 0``, the
student itself under stop-gradient (LCM-LoRA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core import append_dims
from ..core.checks import finite_number, in_range
from ..core.proposals import uniform_indices
from ..latent.autoencoder import latent_normalisation
from ..latent.denoiser import TextToImageModel
from ..latent.families.unet import LatentDenoiser
from ..latent.lcm import LatentConsistencyModel, LCMFunction, student_unet
from .base import BuildContext, GuidedLatentBatches, ObjectiveConfig, encoded_captions, register_objective
from .distances import make_distance
from .students import LoRAKeys, lora_spec


@dataclass
class LCMConfig(ObjectiveConfig):
    kind: str = "lcm"
    num_ddim_timesteps: int = 50        # the skipping-step solver's grid (k = num_train_timesteps / this)
    w_min: float = 3.0                  # guidance w ~ U[w_min, w_max], guidance scale 1 + w (LCM's convention)
    w_max: float = 15.0
    w_embedding_dim: int = 256          # the student UNet's guidance embedding (time_cond_proj_dim)
    timestep_scaling: float = 10.0      # LCMScheduler's boundary-condition timestep scaling
    distance: str = "l2"                # l2 | huber (elementwise pseudo-Huber, as LCM's script)
    huber_c: float = 0.001
    target_ema: float = 0.95            # 0: the student itself under stop-gradient
    teacher_layout: str = "any"         # "sd" | "sdxl" | "any": what the recipe was written for (checked)


@dataclass
class LCMLoRAConfig(LoRAKeys, LCMConfig):
    kind: str = "lcm_lora"
    w_embedding_dim: int = 0            # LCM-LoRA keeps the teacher's UNet as it is: no guidance embedding
    target_ema: float = 0.0
    lora_rank: int = 64
    lora_alpha: float = 64.0


def elementwise_huber(x, y, c: float):
    """LCM's pseudo-Huber, per element then averaged: ``mean(sqrt((x - y)^2 + c^2) - c)`` per sample."""
    return ((x - y).float().pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


def check_config(cfg: LCMConfig) -> None:
    """One-line errors for values an LCM run cannot train with, before anything is loaded or encoded (NaN fails
    every comparison, so each check is written to refuse it)."""
    finite_number(cfg.w_max, "objective.w_max", "the largest guidance scale drawn (LCM's 15)")
    if not 0 <= cfg.w_min <= cfg.w_max:
        raise ValueError(f"objective.w_min ({cfg.w_min}) must be >= 0 and <= objective.w_max ({cfg.w_max})")
    in_range(cfg.timestep_scaling, "objective.timestep_scaling", 0, low_open=True, fix="LCM's is 10")
    if not 0 <= cfg.target_ema < 1:
        raise ValueError(f"objective.target_ema must lie in [0, 1) (0: the student itself under stop-gradient; "
                         f"LCM's 0.95), got {cfg.target_ema}")
    in_range(cfg.huber_c, "objective.huber_c", 0, low_open=True, fix="LCM's is 0.001")
    if not cfg.num_ddim_timesteps >= 1:
        raise ValueError(f"objective.num_ddim_timesteps must be >= 1 and divide the teacher's timesteps (LCM's "
                         f"50), got {cfg.num_ddim_timesteps}")
    if cfg.w_embedding_dim < 0:
        raise ValueError(f"objective.w_embedding_dim must be >= 0, got {cfg.w_embedding_dim}")


class LatentConsistencyDistillation(GuidedLatentBatches):
    def __init__(self, teacher: LatentDenoiser, encoded, normalisation, cfg: LCMConfig, lora: bool = False):
        check_config(cfg)
        table = teacher.log_sigmas.exp().float()
        num_train = len(table)
        if not 1 <= cfg.num_ddim_timesteps <= num_train or num_train % cfg.num_ddim_timesteps:
            raise ValueError(f"objective.num_ddim_timesteps must divide the teacher's {num_train} timesteps, got "
                             f"{cfg.num_ddim_timesteps}")
        self.k = num_train // cfg.num_ddim_timesteps
        self.t_n = torch.arange(1, cfg.num_ddim_timesteps + 1) * self.k - 1
        self.sigmas, self.teacher, self.cfg, self.lora = table, teacher, cfg, lora
        self.encoded, self.normalisation = encoded, normalisation
        self.distance = (lambda x, y: elementwise_huber(x, y, cfg.huber_c)) if cfg.distance == "huber" \
            else make_distance(cfg.distance)

    def __call__(self, model, z0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        n, dev = z0.shape[0], z0.device
        if self.sigmas.device != dev:  # moved once, not every step
            self.sigmas, self.t_n = self.sigmas.to(dev), self.t_n.to(dev)
        t = self.t_n[uniform_indices(n, len(self.t_n)).to(dev)]  # drawn on the CPU generator, then moved
        s_hi, s_lo = self.sigmas[t].to(z0.dtype), self.sigmas[(t - self.k).clamp_min(0)].to(z0.dtype)
        z_hi = z0 + append_dims(s_hi, z0.ndim) * torch.randn_like(z0)
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(n, device=dev)
        student = {k: v for k, v in cond.items() if not k.startswith("negative")}
        student["guidance_scale"] = 1 + w
        # the no-grad passes first: their transient activations are then never held beside the student's, which
        # the backward pass needs (the same numbers in either order; a lower peak in this one)
        with torch.no_grad():
            with self._teacher_weights():
                x0 = self.teacher(z_hi, s_hi, **cond, guidance_scale=1 + w)
            r = append_dims(s_lo / s_hi, z0.ndim)
            z_lo = x0 + r * (z_hi - x0)
            tgt = (model if target is None else target)(z_lo, s_lo, **student)
        online = model(z_hi, s_hi, **student)
        return self.distance(online.float(), tgt.float()).mean()

    def _teacher_weights(self):
        """LCM-LoRA: the teacher is the student's own UNet with its adapters switched off for the pass."""
        if not self.lora:
            return contextlib.nullcontext()
        unet = self.teacher.unet

        @contextlib.contextmanager
        def off():
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        return off()


def _prepare(cfg: LCMConfig, ctx: BuildContext):
    teacher = ctx.teacher
    if not isinstance(teacher, TextToImageModel) or teacher.family.student != "lcm":
        raise ValueError(f"objective.kind {cfg.kind!r} distils a text-to-image teacher with an SD / SDXL UNet (a "
                         "diffusers SD / SDXL folder or cmkit:tiny-t2i); the teacher given is not one (a flow "
                         "teacher: use kind 'flow_cd' or 'flow_cd_lora')")
    layout = "sdxl" if teacher.prompt_encoder.xl else "sd"
    if cfg.teacher_layout not in ("any", "sd", "sdxl"):
        raise ValueError(f"objective.teacher_layout must be 'sd', 'sdxl' or 'any', got {cfg.teacher_layout!r}")
    if cfg.teacher_layout not in ("any", layout):
        raise ValueError(f"this recipe is for an {cfg.teacher_layout.upper()} teacher but the teacher given has the "
                         f"{layout.upper()} layout; use the recipe written for it")
    encoded = encoded_captions(cfg.kind, ctx, teacher)
    return teacher, encoded, latent_normalisation(teacher.vae)


def lcm_student(teacher: TextToImageModel, ctx: BuildContext, num_ddim_timesteps: int, timestep_scaling: float,
                w_embedding_dim: int = 0, lora: dict | None = None) -> LatentConsistencyModel:
    """A latent consistency model of a UNet teacher: a student UNet (the teacher's, plus a guidance embedding of
    ``w_embedding_dim`` when > 0) trained in full, or (``lora``: rank, alpha, targets) a LoRA adapter on the
    teacher's own UNet, whose base with the adapter off stays the teacher."""
    from ..latent.lcm import add_lora

    if lora is None:
        den = LatentDenoiser(student_unet(teacher.unet, w_embedding_dim or None), teacher.scheduler)
        return LatentConsistencyModel(LCMFunction(den, timestep_scaling), teacher, num_ddim_timesteps,
                                      base=ctx.teacher_path)
    if w_embedding_dim:
        raise ValueError("objective.w_embedding_dim must be 0 for a LoRA student: the adapter leaves the UNet's "
                         "inputs as they are")
    if not ctx.teacher_path:
        raise ValueError("a LoRA student records its base teacher for loading the adapter later; give it by path "
                         "(teacher.path or --teacher)")
    add_lora(teacher.unet, lora["rank"], lora["alpha"], lora["targets"])
    return LatentConsistencyModel(LCMFunction(teacher.denoiser, timestep_scaling), teacher, num_ddim_timesteps,
                                  lora=True, base=ctx.teacher_path)


@register_objective("lcm", LCMConfig, job="distill", teacher="required")
def build(cfg: LCMConfig, ctx: BuildContext):
    """LCM: a student UNet (the teacher's, plus a guidance embedding) trained in full."""
    check_config(cfg)
    teacher, encoded, norm = _prepare(cfg, ctx)
    model = lcm_student(teacher, ctx, cfg.num_ddim_timesteps, cfg.timestep_scaling, cfg.w_embedding_dim)
    return model, LatentConsistencyDistillation(teacher.denoiser, encoded, norm, cfg)


@register_objective("lcm_lora", LCMLoRAConfig, job="distill", teacher="required")
def build_lora(cfg: LCMLoRAConfig, ctx: BuildContext):
    """LCM-LoRA: a LoRA adapter on the teacher's UNet; the base with adapters off is the teacher."""
    check_config(cfg)
    if cfg.target_ema != 0:
        raise ValueError("objective.target_ema must be 0 for lcm_lora: the adapter's target is itself under "
                         "stop-gradient (a copy would need a second UNet)")
    if cfg.w_embedding_dim:
        raise ValueError("objective.w_embedding_dim must be 0 for lcm_lora: the adapter leaves the UNet's inputs "
                         "as they are")
    teacher, encoded, norm = _prepare(cfg, ctx)
    model = lcm_student(teacher, ctx, cfg.num_ddim_timesteps, cfg.timestep_scaling,
                        lora=lora_spec(cfg, teacher))
    return model, LatentConsistencyDistillation(teacher.denoiser, encoded, norm, cfg, lora=True)
