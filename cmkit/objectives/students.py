"""The consistency model a teacher-started objective trains (CD, ECT), built from the teacher."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import ConsistencyModel, DenoiserConsistencyModel, DiffusersDenoiser
from .base import BuildContext, LevelsConfig


def levels_within_teacher(cfg: LevelsConfig, teacher) -> tuple[float, float]:
    """The config's sigma range, cut to what the teacher covers."""
    return max(cfg.sigma_min, teacher.sigma_min), min(cfg.sigma_max, teacher.sigma_max)


def student_from_teacher(cfg: LevelsConfig, ctx: BuildContext, wrap_vp: bool) -> ConsistencyModel:
    """A student that starts from the teacher's weights. An EDM teacher's backbone is copied into the boundary
    parameterisation; a VP (diffusers DDPM) teacher is wrapped whole (``DenoiserConsistencyModel``, so the student
    starts out as the teacher) where ``wrap_vp`` or ``model.student = "teacher"``, else its UNet is copied."""
    if ctx.student not in ("edm", "teacher"):
        raise ValueError(f"model.student must be 'edm' or 'teacher', got {ctx.student!r}")
    teacher = ctx.teacher
    if teacher is None:
        raise ValueError(f"objective.kind {cfg.kind!r} starts from a teacher: pass --teacher PATH or set teacher.path")
    sigma_min, sigma_max = levels_within_teacher(cfg, teacher)
    wrap = isinstance(teacher, DiffusersDenoiser) and (wrap_vp or ctx.student == "teacher")
    cls = DenoiserConsistencyModel if wrap else ConsistencyModel
    return cls.from_teacher(teacher, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=cfg.sigma_data)


def latent_teacher(cfg, ctx: BuildContext, flow: bool = False):
    """The run's teacher, refused in one line unless it is a latent text-to-image one (``flow``: a flow-matching
    one) of the pipeline the recipe names (``objective.teacher_pipeline``, "any" for every one)."""
    from ..latent.denoiser import TextToImageModel

    teacher = ctx.teacher
    if not isinstance(teacher, TextToImageModel) or flow and teacher.family.student != "flow_cm":
        what = ("a flow-matching teacher (SD3, Flux, Wan, ... pipeline folders, or cmkit:tiny-sd3)" if flow else
                "a text-to-image teacher (a diffusers SD / SDXL / SD3 / Flux / Wan folder, cmkit:tiny-t2i or "
                "cmkit:tiny-sd3)")
        raise ValueError(f"objective.kind {cfg.kind!r} distils {what}; the teacher given is not one"
                         + (" (for SD / SDXL UNets use kind 'lcm' or 'latent_scd')" if flow else ""))
    if cfg.teacher_pipeline not in ("any", teacher.family.name):
        raise ValueError(f"this recipe is for a {cfg.teacher_pipeline} teacher but the teacher given is a "
                         f"{teacher.family.name}; use the recipe written for it")
    return teacher


@dataclass
class LoRAKeys:
    """The ``[objective]`` keys of a LoRA student's adapter (LCM-LoRA, flow CD, sCD and rCM alike)."""
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=list)  # empty: the teacher family's (PipelineFamily.lora_targets)


def lora_spec(cfg: LoRAKeys, teacher) -> dict:
    """A LoRA student's adapter: the config's rank and alpha, and its ``lora_targets`` or, where the recipe names
    none, the teacher family's (``PipelineFamily.lora_targets``)."""
    teacher.family.check_lora(teacher)
    targets = list(cfg.lora_targets) or list(teacher.family.lora_targets)
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": targets}
