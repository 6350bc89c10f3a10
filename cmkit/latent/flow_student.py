"""Few-step students of flow-matching teachers (SD3, Flux), parameterised so the teacher's own pipeline samples them
unchanged: the student is the teacher's transformer (a copy, or the same one with a LoRA adapter) predicting a
velocity ``v_s``, and its consistency function is the flow denoiser itself,

    f(x_t, t) = x_t - t v_s(x_t, t),        f(x, 0) = x exactly,

so ``FlowMatchEulerDiscreteScheduler``'s step ``x_t + (t' - t) v_s = (1 - t') f + t' eps_hat`` is a deterministic
multistep consistency sample (sampler ``euler``), and ``FlowMatchLCMScheduler``'s ``(1 - t') f + t' eps_new`` the
re-noising one (sampler ``consistency``, cmkit's solver of that name). Guidance is folded in: the student takes no
negative prompt and samples at ``guidance_scale = 1`` (one pass a step); a Flux-dev student's guidance embedding is
fed 1.

``FlowConsistencyModel`` holds the student denoiser (the only part that trains; an adapter's weights alone for a LoRA
student) and shares the teacher's VAE and prompt encoder, never copying or checkpointing them; it is saved as a
pipeline folder of the teacher's class with ``cmkit.json`` beside it, or as the LoRA file the pipeline's
``load_lora_weights`` reads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from ..core.checks import check_guidance, positive_int
from ..core.digests import weights_digest
from ..core.files import atomic_dir
from ..models.folder import META_FILE, MODEL_KINDS, read_meta
from .denoiser import LatentDenoiserView, TextToImageModel
from .students import (
    SharedPartsStudent,
    check_base_hash,
    check_kind,
    check_lora_config,
    load_adapter,
    restore_size,
    size_meta,
    write_lora_student,
)

# the student's sampler -> the scheduler its export samples with: deterministic, or re-noising with fresh noise
SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler", "consistency": "FlowMatchLCMScheduler"}


def add_transformer_lora(transformer, rank: int, alpha: float, targets) -> None:
    """A peft LoRA adapter on a diffusers transformer; only the adapter's weights train."""
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise ValueError(f"objective.lora_rank must be >= 1 and objective.lora_alpha > 0, got {rank}, {alpha}")
    names = {n for n, _ in transformer.named_modules()}
    if not any(n == t or n.endswith("." + t) for t in targets for n in names):
        raise ValueError(f"none of objective.lora_targets {list(targets)} names a module of the transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights="gaussian"))
    for p in transformer.parameters():  # the adapter trains in float32 on a base held in bf16 / fp16
        if p.requires_grad:
            p.data = p.data.float()


@MODEL_KINDS.register("flow_cm")
class FlowConsistencyModel(SharedPartsStudent, LatentDenoiserView, nn.Module):
    """A few-step student of a flow teacher with the pipeline it samples in (see the module docstring).
    ``steps``: the step count it was distilled for (its default); ``guidance_scale``: the teacher guidance folded
    in (recorded); ``sampler``: the scheduler its export samples with."""

    kind = "flow_cm"

    def __init__(self, denoiser, parts: TextToImageModel, steps: int = 4, guidance_scale: float = 1.0,
                 sampler: str = "euler", lora: bool = False, base: str | None = None):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"a flow student's sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        sched = parts.family.student_scheduler(parts, denoiser.scheduler)
        if sched is not denoiser.scheduler:
            # it samples, and so trains, on its own scheduler's times (float ones where a Wan teacher's UniPC hands
            # its network whole ones); the teacher's denoiser, whose network a LoRA student shares, keeps its own
            denoiser = copy.copy(denoiser)
            denoiser.scheduler = sched
        self.denoiser = denoiser
        self.__dict__["parts"] = parts
        self.steps, self.guidance_scale, self.sampler = int(steps), float(guidance_scale), sampler
        self.lora, self.base = bool(lora), base

    # --- the consistency function: the student's flow denoiser, unguided
    def forward(self, z, sigma, guidance_scale=1.0, **cond):
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        return self.denoiser(z, sigma, guidance_scale=1.0, **pos)

    def passes(self, **cond) -> int:
        return 1

    # --- the rest of the teacher's pipeline

    @property
    def scheduler(self):
        """The scheduler it samples over and exports with: its family's for students
        (``PipelineFamily.student_scheduler``; the teacher's own by default)."""
        return self.family.student_scheduler(self.parts, self.denoiser.scheduler)

    def fresh_noise(self, like):
        """The re-noising sampler's noise, in its pipeline's latent layout (``PipelineFamily.fresh_noise``)."""
        return self.family.fresh_noise(self, like)

    def grid(self, steps: int, spacing=None) -> list[float]:
        return self.family.grid(self, int(steps), spacing)

    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale: float = 1.0) -> dict:
        if negative_prompts is not None:
            raise ValueError("a guidance-folded student takes no negative prompt (it samples at guidance_scale=1)")
        return self.parts.encode_prompt(prompts, None, 1.0)

    def decode(self, latents):
        return self.parts.decode(latents)

    def encode(self, images):
        return self.parts.encode(images)

    # --- files
    def student_scheduler(self):
        """The scheduler the export samples with: the teacher's grid, deterministic or re-noising."""
        import inspect

        import diffusers

        cls = getattr(diffusers, SAMPLERS[self.sampler])
        takes = inspect.signature(cls.__init__).parameters  # the keys only the other class has are left behind
        return cls.from_config({k: v for k, v in self.scheduler.config.items() if k in takes})

    def meta(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "guidance_scale": self.guidance_scale, "sampler": self.sampler,
                "sample_at_guidance_scale": 1.0, "lora": self.lora, "base": self.base,
                "pipeline": self.parts.config["pipeline"], "base_hash": weights_digest(self.parts),
                **size_meta(self.parts)}

    def save_pretrained(self, folder) -> Path:
        meta = self.meta()
        with atomic_dir(folder) as tmp:
            if self.lora:
                write_lora_student(self.parts, self.network, tmp, meta)
            else:
                den = copy.copy(self.denoiser)
                den.scheduler = self.student_scheduler()
                # guidance_folded: a family whose pipeline has a flag for a guidance-distilled model sets it
                config = {**self.parts.config, "guidance_folded": True}
                TextToImageModel(den, self.parts.vae, self.parts.prompt_encoder, config).save_pretrained(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder, base=None) -> FlowConsistencyModel:
        """A student pipeline folder, or a LoRA student on its base teacher (``base``: a loaded
        ``TextToImageModel``, or by default the folder or hub id recorded when it was trained)."""
        meta = read_meta(folder) or {}
        check_kind(folder, meta, cls.kind)
        kw = {k: meta[k] for k in ("steps", "guidance_scale", "sampler") if k in meta}
        where = Path(folder) / META_FILE
        if "steps" in kw:  # 2.5 is not run as 2
            positive_int(kw["steps"], f"{where}: steps", "export the student again")
        if "guidance_scale" in kw:
            check_guidance(kw["guidance_scale"], f"{where}: guidance_scale")
        if not meta.get("lora"):
            model = TextToImageModel.from_pretrained(str(folder))
            restore_size(folder, meta, model)
            return cls(model.denoiser, model, base=meta.get("base"), **kw)
        given = base is not None
        if not given and not meta.get("base"):
            raise ValueError(f"{Path(folder) / META_FILE} records no base teacher; pass the one it was trained on "
                             "as base=")
        if not given:
            base = TextToImageModel.open(meta["base"])
            restore_size(folder, meta, base)
        made_for, given_class = meta.get("pipeline"), base.config.get("pipeline")
        if made_for and made_for != given_class:
            raise ValueError(f"{Path(folder)} is a LoRA of a {made_for} teacher; its base here is a {given_class}: "
                             f"load it on the {made_for} it was trained on")
        lc = meta.get("lora_config")
        if not (isinstance(lc, dict) and {"r", "lora_alpha", "target_modules"} <= set(lc)):
            raise ValueError(f"{Path(folder) / META_FILE} lacks lora_config's r, lora_alpha and target_modules; "
                             "export the LoRA student again")
        check_lora_config(Path(folder) / META_FILE, lc)
        add_transformer_lora(base.network, lc["r"], lc["lora_alpha"], lc["target_modules"])
        model = cls(base.denoiser, base, lora=True, base=meta.get("base"), **kw)
        model.load_lora(folder)
        check_base_hash(folder, meta, base, given, "LoRA student")
        return model

    def load_lora(self, folder) -> None:
        """Read the LoRA file into this model's adapter (``students.load_adapter``'s checks)."""
        load_adapter(self.network, folder, "transformer", "transformer")
