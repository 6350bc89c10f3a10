"""Latent consistency models (Luo et al. 2023) in cmkit's sigma space, with the parameterisation diffusers'
``LCMScheduler`` samples, so an exported model samples unchanged:

    f(z, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t, w),    z_t = z / sqrt(1 + sigma^2) (the VP sample),
    c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2),  c_out = s t / sqrt((s t)^2 + sigma_d^2),  s = timestep_scaling,

with t the teacher's (continuous) timestep of sigma and sigma_d = 0.5. A full LCM takes the guidance ``w`` through
the UNet's guidance embedding (``time_cond_proj_dim``; the pipeline convention ``w = guidance_scale - 1``); an
LCM-LoRA has none and is sampled with plain (usually no) classifier-free guidance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core import append_dims, as_batch_sigma
from ..core.files import atomic_dir
from ..models.folder import META_FILE, MODEL_KINDS, read_meta
from .denoiser import LatentDenoiser, LatentDenoiserView, TextToImageModel, guidance_embedding  # noqa: F401

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


def lora_state_dict(unet) -> dict:
    """The adapter's weights in peft's key layout (``...to_q.lora_A.weight``), which ``pipe.load_lora_weights``
    reads whole. (diffusers' older ``lora.down`` / ``lora.up`` layout loses the attention projections in
    diffusers 0.42: a test found 16 of 48 adapter matrices loaded.)"""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


@MODEL_KINDS.register("lcm")
class LatentConsistencyModel(LatentDenoiserView, nn.Module):
    """A distilled latent consistency model with the pipeline it samples in: ``fn`` (an ``LCMFunction``, the only
    part that trains) and the teacher's VAE and prompt encoder (``parts``, a ``TextToImageModel``, shared and never
    copied or checkpointed). ``lora``: ``fn``'s UNet is the teacher's with a LoRA adapter, and only the adapter is
    saved and checkpointed.

    Saved as a diffusers pipeline folder with ``LCMScheduler`` (LCM) or as ``pytorch_lora_weights.safetensors``
    (LCM-LoRA), with ``cmkit.json`` beside it."""

    kind = "lcm"

    def __init__(self, fn: LCMFunction, parts, num_ddim_timesteps: int = 50, lora: bool = False,
                 base: str | None = None):
        super().__init__()
        self.fn = fn
        self.__dict__["parts"] = parts
        self.num_ddim_timesteps, self.lora, self.base = int(num_ddim_timesteps), bool(lora), base

    def __deepcopy__(self, memo):
        """Copies (EMAs, the target network, the exported copy) share the teacher's parts instead of copying them.
        An LCM-LoRA's function lives in the teacher's UNet, so its copies share that too: it keeps no EMA or target
        network (``build_lora`` refuses them)."""
        memo[id(self.parts)] = self.parts
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

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

    # --- checkpoints hold what trains
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if "lora_" in k} if self.lora else full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.lora:
            return super().load_state_dict(state_dict, strict, assign)
        own = set(self.state_dict())
        if set(state_dict) != own:
            raise ValueError("the LoRA weights do not fit this adapter (other rank, targets or base UNet)")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # --- files
    def save_pretrained(self, folder) -> Path:
        meta = {"kind": self.kind, "lora": self.lora, "timestep_scaling": self.fn.timestep_scaling,
                "num_ddim_timesteps": self.num_ddim_timesteps, "base": self.base}
        if self.lora:
            return self._save_lora(folder, meta)
        den = LatentDenoiser(self.unet, self.lcm_scheduler())
        with atomic_dir(folder) as tmp:
            TextToImageModel(den, self.parts.vae, self.parts.prompt_encoder, self.parts.config).save_pretrained(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    def _save_lora(self, folder, meta: dict) -> Path:
        import diffusers

        pipe_cls = diffusers.StableDiffusionXLPipeline if self.parts.prompt_encoder.xl else \
            diffusers.StableDiffusionPipeline
        adapter = self.unet.peft_config["default"]
        meta["lora_config"] = {"r": adapter.r, "lora_alpha": adapter.lora_alpha,
                               "target_modules": sorted(adapter.target_modules)}
        with atomic_dir(folder) as tmp:
            pipe_cls.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(self.unet), safe_serialization=True)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder, base=None) -> LatentConsistencyModel:
        """An LCM pipeline folder, or an LCM-LoRA folder on its base teacher (``base``: a loaded
        ``TextToImageModel``, or by default the folder or hub id recorded when it was trained)."""
        from ..models.loading import load_teacher

        meta = read_meta(folder) or {}
        if not meta.get("lora"):
            model = TextToImageModel.from_pretrained(str(folder))
            fn = LCMFunction(model.denoiser, meta.get("timestep_scaling",
                                                      model.scheduler.config.get("timestep_scaling", 10.0)))
            steps = meta.get("num_ddim_timesteps", model.scheduler.config.get("original_inference_steps", 50))
            return cls(fn, model, steps, base=meta.get("base"))
        base = base if base is not None else load_teacher(meta["base"])
        add_lora(base.unet, meta["lora_config"]["r"], meta["lora_config"]["lora_alpha"],
                 meta["lora_config"]["target_modules"])
        model = cls(LCMFunction(base.denoiser, meta["timestep_scaling"]), base, meta["num_ddim_timesteps"],
                    lora=True, base=meta.get("base"))
        model.load_lora(folder)
        return model

    def load_lora(self, folder) -> None:
        """Read ``pytorch_lora_weights.safetensors`` into this model's adapter (one-line error if it does not fit)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(Path(folder) / LORA_FILE)
        state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        try:
            result = set_peft_model_state_dict(self.unet, state)
        except RuntimeError:  # tensors of other shapes
            result = type("Mismatch", (), {"unexpected_keys": list(state)})()
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected or not state:
            raise ValueError(f"{folder}/{LORA_FILE} does not fit this base UNet ({len(unexpected)} of its "
                             f"{len(state)} tensors have no place here); it was trained on another base")


LORA_FILE = "pytorch_lora_weights.safetensors"
