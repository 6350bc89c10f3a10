"""Latent consistency models (Luo et al. 2023) in cmkit's sigma space, with the parameterisation diffusers'
``LCMScheduler`` samples, so an exported model samples unchanged:

    f(z, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t, w),    z_t = z / sqrt(1 + sigma^2) (the VP sample),
    c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2),  c_out = s t / sqrt((s t)^2 + sigma_d^2),  s = timestep_scaling,

with t the teacher's (continuous) timestep of sigma and sigma_d = 0.5. A full LCM takes the guidance ``w`` through
the UNet's guidance embedding (``time_cond_proj_dim``; the pipeline convention ``w = guidance_scale - 1``); an
LCM-LoRA has none and is sampled with plain (usually no) classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core import append_dims, as_batch_sigma
from ..core.checks import check_guidance, in_range, positive_int
from ..core.digests import weights_digest
from ..core.files import atomic_dir
from ..models.folder import META_FILE, MODEL_KINDS, read_meta
from .denoiser import LatentDenoiserView, TextToImageModel
from .families.unet import LatentDenoiser
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

LCM_SIGMA_DATA = 0.5


def lcm_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = LCM_SIGMA_DATA):
    """``(c_skip, c_out)`` at timesteps ``t``, as ``LCMScheduler.get_scalings_for_boundary_condition_discrete``."""
    st = t * timestep_scaling
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


def student_unet(teacher_unet, time_cond_proj_dim: int | None):
    """The student's UNet: the teacher's config (plus a guidance embedding of ``time_cond_proj_dim`` when given) and
    the teacher's weights. The new embedding's projection starts at zero, so the student starts as the teacher."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    if time_cond_proj_dim:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"the student UNet does not take the teacher's weights (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]})")
    if time_cond_proj_dim:
        torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


class LCMFunction(torch.nn.Module):
    """The consistency function ``f(z, sigma, **cond)`` of a latent consistency model around a ``LatentDenoiser``
    (whose UNet is the student's). ``guidance_scale`` goes to the guidance embedding when the UNet has one (as
    ``guidance_scale - 1``), else to ordinary classifier-free guidance."""

    def __init__(self, denoiser: LatentDenoiser, timestep_scaling: float = 10.0):
        super().__init__()
        self.denoiser = denoiser
        self.timestep_scaling = float(timestep_scaling)

    def passes(self, **cond) -> int:
        return self.denoiser.passes(**cond)

    def forward(self, z: torch.Tensor, sigma, **cond) -> torch.Tensor:
        den = self.denoiser
        sigma = as_batch_sigma(sigma, z)
        x0 = den(z, sigma, **cond)
        c_skip, c_out = lcm_scalings(den.sigma_to_t(sigma), self.timestep_scaling)
        s = append_dims(sigma, z.ndim)
        return append_dims(c_skip.to(z.dtype), z.ndim) * (z / (1 + s**2).sqrt()) + \
            append_dims(c_out.to(z.dtype), z.ndim) * x0


def add_lora(unet, rank: int, alpha: float, targets: list[str]) -> None:
    """A LoRA adapter (peft, through diffusers' integration) on ``unet``; only the adapter's weights train."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"objective.lora_rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"objective.lora_alpha must be > 0, got {alpha}")
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
    if not any(t in names or any(n.endswith("." + t) for n in names) for t in targets):
        raise ValueError(f"none of objective.lora_targets {targets} names a module of the UNet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    for p in unet.parameters():  # the adapter trains in float32 on a base held in bf16 / fp16
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(unet) -> dict:
    """The adapter's weights in peft's key layout (``...to_q.lora_A.weight``), which ``pipe.load_lora_weights``
    reads whole. (diffusers' older ``lora.down`` / ``lora.up`` layout loses the attention projections in
    diffusers 0.42: a test found 16 of 48 adapter matrices loaded.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


@MODEL_KINDS.register("lcm")
class LatentConsistencyModel(SharedPartsStudent, LatentDenoiserView, nn.Module):
    """A distilled latent consistency model with the pipeline it samples in: ``fn`` (an ``LCMFunction``, the only
    part that trains) and the teacher's VAE and prompt encoder (``parts``, a ``TextToImageModel``, shared and never
    copied or checkpointed). ``lora``: ``fn``'s UNet is the teacher's with a LoRA adapter, and only the adapter is
    saved and checkpointed.

    Saved as a diffusers pipeline folder with ``LCMScheduler`` (LCM) or as ``pytorch_lora_weights.safetensors``
    (LCM-LoRA), with ``cmkit.json`` beside it."""

    kind = "lcm"

    def __init__(self, fn: LCMFunction, parts, num_ddim_timesteps: int = 50, lora: bool = False,
                 base: str | None = None, base_hash: str | None = None):
        super().__init__()
        self.fn = fn
        self.__dict__["parts"] = parts
        self.num_ddim_timesteps, self.lora, self.base = int(num_ddim_timesteps), bool(lora), base
        # the base's weights hash: None = ``parts`` is the base (hashed when saved); "" = not known (an older folder)
        self.base_hash = base_hash

    # --- the consistency function
    def forward(self, z, sigma, **cond):
        return self.fn(z, sigma, **cond)

    def passes(self, **cond) -> int:
        return self.fn.passes(**cond)

    @property
    def denoiser(self) -> LatentDenoiser:
        return self.fn.denoiser

    def lcm_scheduler(self):
        """The ``LCMScheduler`` this model samples with: the teacher's table, this model's boundary scalings and
        skipping-step grid."""
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(self.denoiser.scheduler.config, timestep_scaling=self.fn.timestep_scaling,
                                        original_inference_steps=self.num_ddim_timesteps)

    # --- the rest of a pipeline (the teacher's)

    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale: float = 1.0) -> dict:
        return self.parts.encode_prompt(prompts, negative_prompts, guidance_scale)

    def decode(self, latents):
        return self.parts.decode(latents)

    def encode(self, images):
        return self.parts.encode(images)

    # --- files
    def save_pretrained(self, folder) -> Path:
        meta = {"kind": self.kind, "lora": self.lora, "timestep_scaling": self.fn.timestep_scaling,
                "num_ddim_timesteps": self.num_ddim_timesteps, "base": self.base,
                # the base's weights (the teacher, its adapter left out), so a base that changed since is noticed
                "base_hash": self.base_hash if self.base_hash is not None else weights_digest(self.parts),
                **size_meta(self.parts)}
        if self.lora:
            return self._save_lora(folder, meta)
        den = LatentDenoiser(self.unet, self.lcm_scheduler())
        with atomic_dir(folder) as tmp:
            TextToImageModel(den, self.parts.vae, self.parts.prompt_encoder, self.parts.config).save_pretrained(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    def _save_lora(self, folder, meta: dict) -> Path:
        with atomic_dir(folder) as tmp:
            write_lora_student(self.parts, self.unet, tmp, meta)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder, base=None) -> LatentConsistencyModel:
        """An LCM pipeline folder, or an LCM-LoRA folder on its base teacher (``base``: a loaded
        ``TextToImageModel``, or by default the folder or hub id recorded when it was trained, refused in one line
        if its weights changed since)."""
        meta = read_meta(folder) or {}
        check_kind(folder, meta, cls.kind)
        if not meta.get("lora"):
            model = TextToImageModel.from_pretrained(str(folder))
            if not isinstance(model.denoiser, LatentDenoiser):
                raise ValueError(f"{folder} is a {model.config.get('pipeline')} folder, not an LCM (an SD / SDXL "
                                 "UNet pipeline with LCMScheduler); open it with cmkit.load_teacher")
            sched = model.scheduler.config
            meta = {"timestep_scaling": sched.get("timestep_scaling", 10.0),
                    "num_ddim_timesteps": sched.get("original_inference_steps", 50), **meta}
            check_lcm_meta(folder, meta)
            restore_size(folder, meta, model)
            fn = LCMFunction(model.denoiser, meta["timestep_scaling"])
            return cls(fn, model, meta["num_ddim_timesteps"], base=meta.get("base"),
                       base_hash=meta.get("base_hash", ""))
        check_lcm_meta(folder, meta, lora=True)
        base, given = lora_base(folder, meta, base)
        if not given:
            restore_size(folder, meta, base)
        cfg = meta["lora_config"]
        add_lora(base.unet, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
        model = cls(LCMFunction(base.denoiser, meta["timestep_scaling"]), base, meta["num_ddim_timesteps"],
                    lora=True, base=meta.get("base"), base_hash=meta.get("base_hash"))
        model.load_lora(folder)
        check_base_hash(folder, meta, base, given, "LCM-LoRA")
        return model

    def load_lora(self, folder) -> None:
        """Read ``pytorch_lora_weights.safetensors`` into this model's adapter (``students.load_adapter``: refused
        in one line where it cannot be read, holds a text-encoder LoRA's tensors, non-finite values, tensors that do
        not fit this base UNet, or only part of the adapter)."""
        load_adapter(self.unet, folder, "unet", "UNet")


def check_lcm_meta(folder, meta: dict, lora: bool = False) -> None:
    """One-line errors for an LCM folder's ``cmkit.json`` without the keys an LCM-LoRA needs, or with values an LCM
    cannot sample with."""
    path = Path(folder) / META_FILE
    need = ("timestep_scaling", "num_ddim_timesteps") + (("lora_config",) if lora else ())
    missing = [k for k in need if k not in meta]
    cfg = meta.get("lora_config")
    if lora and not missing and not (isinstance(cfg, dict) and {"r", "lora_alpha", "target_modules"} <= set(cfg)):
        missing = ["lora_config's r, lora_alpha and target_modules"]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (an LCM{'-LoRA' if lora else ''} folder records them "
                         "when saved); export the model folder again")
    in_range(meta["timestep_scaling"], f"{path}: timestep_scaling", 0, low_open=True, fix="export it again")
    positive_int(meta["num_ddim_timesteps"], f"{path}: num_ddim_timesteps", fix="export it again")
    if lora:
        check_lora_config(path, cfg)


def lora_base(folder, meta: dict, base):
    """The base teacher of an LCM-LoRA folder (``base`` when given, else the one it records) and whether it was
    given; one-line errors where there is none or it is not an SD / SDXL text-to-image teacher."""
    given = base is not None
    if not given:
        if not meta.get("base"):
            raise ValueError(f"{Path(folder) / META_FILE} records no base teacher; pass the teacher it was trained "
                             "on as base=")
        base = TextToImageModel.open(meta["base"])
    if not isinstance(base, TextToImageModel) or not isinstance(base.denoiser, LatentDenoiser):
        what = meta.get("base") if not given else type(base).__name__
        raise ValueError(f"{folder}: the base {what!r} is not a text-to-image teacher with an SD / SDXL UNet; an "
                         "LCM-LoRA applies to the teacher it was trained on")
    return base, given


# the guidance scale an LCM samples at when none is given: one with a guidance embedding (trained on scales
# 1 + w, w in [w_min, w_max]) at 4, as ``cmkit generate`` and the benchmark sample it; an LCM-LoRA, which folds the
# teacher's guidance in, unguided (guidance on top of it costs two passes a step and over-saturates)
EMBEDDED_GUIDANCE = 4.0


def lcm_sampling_guidance(model, steps, timesteps, guidance_scale, negative_prompts, solver) -> float:
    """The guidance scale ``lcm_sample`` uses (``None``: the model's default, above), after one-line errors for
    what an LCM would silently ignore or cannot do: a solver (an LCM takes its own ``LCMScheduler`` steps), a
    negative prompt it does not use (a guidance embedding, or no guidance), more steps or timesteps than its
    skipping-step schedule (``num_ddim_timesteps``) has, a guidance scale that is not a finite number >= 1, and a
    model that is not an LCM."""
    if not isinstance(model, LatentConsistencyModel):
        raise ValueError(f"lcm_sample samples a latent consistency model (cmkit.load_model of an LCM / LCM-LoRA "
                         f"folder), got a {type(model).__name__}; sample a teacher with text_to_image")
    if solver is not None:
        raise ValueError(f"an LCM samples with its own LCMScheduler steps, not a solver ({solver!r}); drop --solver "
                         "(it is for teachers)")
    n = model.num_ddim_timesteps
    count = len(timesteps) if timesteps is not None else positive_int(steps, "steps")
    if isinstance(count, int) and count > n:
        raise ValueError(f"{count} steps is more than this LCM's schedule of {n} timesteps (num_ddim_timesteps, "
                         f"fixed in training); use --steps 1 to {n}")
    embeds = model.denoiser.embeds_guidance
    w = lcm_default_guidance(model) if guidance_scale is None else guidance_scale
    check_guidance(w)
    if negative_prompts is not None and (embeds or not torch.is_tensor(w) and float(w) <= 1):
        why = "takes guidance through its embedding" if embeds else "samples unguided at guidance 1"
        raise ValueError(f"this LCM {why} and would ignore the negative prompt; drop --negative-prompt"
                         + ("" if embeds else ", or give a guidance scale above 1"))
    return w


def lcm_default_guidance(model) -> float:
    """The guidance scale an LCM samples at when none is given (``EMBEDDED_GUIDANCE`` through a guidance embedding;
    1 for an LCM-LoRA, which folds its teacher's guidance in)."""
    return EMBEDDED_GUIDANCE if model.denoiser.embeds_guidance else 1.0
