"""What the Stable Diffusion UNet families (SD 1.x / 2.x and SDXL) share: reading such a folder into a
``LatentDenoiser`` with CLIP prompt encoding, the checks that its parts belong together, and the grid of its
scheduler's discrete timesteps."""

from __future__ import annotations

import torch

from ..components import in_dtype, load_parts, present
from ..denoiser import LatentDenoiser, TextToImageModel
from ..family import PipelineFamily
from ..text_encoders import PromptEncoder

SPACINGS = ("leading", "trailing", "linspace")


class UNetFamily(PipelineFamily):
    """SD-style pipelines: a ``UNet2DConditionModel`` over a VP scheduler, CLIP text encoders, an ``AutoencoderKL``."""

    network = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    xl = False

    def load(self, path, index, dtype, clip_x0, load_kw):
        pairs = [(e, e.replace("text_encoder", "tokenizer")) for e in self.encoders]
        needed = ["unet", "vae", "scheduler", *[n for p in pairs for n in p]]
        missing = [c for c in needed if not present(index, c)]
        if missing:
            raise ValueError(f"{path} is a {self.name} folder without {', '.join(missing)}; a text-to-image "
                             f"teacher of this class needs {', '.join(needed)}")
        parts = load_parts(path, index, needed, load_kw)
        unet, vae = in_dtype(parts["unet"], dtype), in_dtype(parts["vae"], torch.float32)
        check_layout(path, unet, vae, self.xl)
        den = LatentDenoiser(unet, parts["scheduler"], clip_x0=clip_x0)
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", self.xl))
        prompts = PromptEncoder([in_dtype(parts[e], dtype) for e, _ in pairs], [parts[t] for _, t in pairs],
                                force_zeros, (size, size) if self.xl else None)
        config = {"pipeline": self.name, "force_zeros_for_empty_prompt": force_zeros}
        return TextToImageModel(den, vae.eval(), prompts.eval(), config)

    def default_image_size(self, model) -> int:
        return int(model.unet.config.sample_size) * model.vae_scale_factor

    def latent_shape(self, model, image_size: int) -> tuple[int, ...]:
        f = model.vae_scale_factor
        if image_size % f or image_size < f:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE's factor {f}")
        return (int(model.unet.config.in_channels), image_size // f, image_size // f)

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        return timestep_sigmas(model, steps, spacing)


def timestep_sigmas(model, steps: int, spacing: str | None = "trailing") -> list[float]:
    """The descending sigma grid of a ``steps``-step solve at the model's discrete timesteps, spaced as diffusers'
    ``timestep_spacing`` does ("trailing": the first step starts at the last training timestep, the right choice
    for few steps), ending at 0.

    ``None`` follows the model's own scheduler config as ``StableDiffusionPipeline`` runs it with ``DDIMScheduler``
    (which sets ``steps_offset=1``), ending where that DDIM ends (sigma 0 with ``set_alpha_to_one``, else the first
    table entry). That is step for step diffusers' DDIM whenever each step lands on the next listed timestep, as with
    "leading" spacing (SD's and SDXL's); diffusers' DDIM steps from t to ``t - T // steps`` whatever the spacing, so
    for "trailing" or "linspace" with ``T % steps != 0`` it is not a grid at all.
    """
    from diffusers import DDIMScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)} or None (the folder's)")
    over = {"timestep_spacing": spacing} if spacing is not None else {"steps_offset": 1}
    sched = DDIMScheduler.from_config(model.scheduler.config, **over)
    sched.set_timesteps(int(steps))
    sig = model.denoiser.t_to_sigma(sched.timesteps.to(torch.float64)).tolist()
    final = model.sigma_min if spacing is None and not sched.config.set_alpha_to_one else 0.0
    # a last timestep of 0 then ends where it starts: diffusers' final step there is the identity
    return sig + [final] if final < sig[-1] else sig


def check_layout(path, unet, vae, xl: bool) -> None:
    """One-line errors for UNet / VAE / layout combinations a text-to-image denoiser cannot run."""
    c = vae.config.latent_channels
    if unet.config.in_channels != c or unet.config.out_channels not in (c, 2 * c):
        raise ValueError(f"{path}: the UNet takes {unet.config.in_channels} channels and gives "
                         f"{unet.config.out_channels}, the VAE's latents have {c}; not a text-to-image layout cmkit "
                         "runs (inpainting and image-conditioned UNets are not supported)")
    if (unet.config.get("addition_embed_type") == "text_time") != xl:
        raise ValueError(f"{path}: the UNet {'expects' if not xl else 'lacks'} SDXL's pooled text embeddings and time "
                         f"ids but the folder {'has one' if not xl else 'has two'} text encoder"
                         f"{'' if not xl else 's'}; its components do not belong together")
