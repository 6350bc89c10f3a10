"""Sampling a latent text-to-image model: prompts -> conditioning -> a PF-ODE solve (or a consistency model's few
steps) over latents -> VAE decode. Grids come from the model's discrete timesteps, spaced as diffusers' schedulers
space them, so a cmkit DDIM solve with the folder's own spacing is step for step what ``StableDiffusionPipeline``
does with ``DDIMScheduler``."""

from __future__ import annotations

import torch

from ..solvers import ode_solve
from .samplers import _device_dtype, eval_mode, per_sample_noise

SPACINGS = ("leading", "trailing", "linspace")


def timestep_sigmas(model, steps: int, spacing: str | None = "trailing") -> list[float]:
    """The descending sigma grid of a ``steps``-step solve at the model's discrete timesteps, spaced as diffusers'
    ``timestep_spacing`` does ("trailing": the first step starts at the last training timestep, the right choice
    for few steps); ``None`` follows the model's own scheduler config, ending where its DDIM would (sigma 0 with
    ``set_alpha_to_one``, else the first table entry). Other spacings end at 0."""
    from diffusers import DDIMScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)} or None (the folder's)")
    config = model.scheduler.config
    over = {} if spacing is None else {"timestep_spacing": spacing}
    sched = DDIMScheduler.from_config(config, **over)
    sched.set_timesteps(int(steps))
    sig = model.denoiser.t_to_sigma(sched.timesteps.to(torch.float64)).tolist()
    final = model.sigma_min if spacing is None and not config.get("set_alpha_to_one", True) else 0.0
    return sig + [final]


@torch.no_grad()
def text_to_image(model, prompts, steps: int = 25, solver: str = "ddim", guidance_scale: float = 5.0,
                  negative_prompts=None, latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  spacing: str | None = "trailing", sigmas=None, output: str = "image", return_nfe: bool = False):
    """Images in [-1, 1] (``output="latent"``: latents) for ``prompts`` from a text-to-image teacher, solving the
    guided PF-ODE with ``solver`` (any cmkit solver or torchdiffeq method) over ``timestep_sigmas(steps, spacing)``
    or explicit ``sigmas``. ``latents``: unit-variance starting noise, one per prompt (as diffusers pipelines take
    it); by default drawn per sample from ``generator``. With ``return_nfe`` also the network passes (a guided
    evaluation counts two)."""
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device, dtype = _device_dtype(model.denoiser)
    cond = model.encode_prompt(prompts, negative_prompts, guidance_scale)
    if latents is None:
        latents = per_sample_noise(len(prompts), 1, model.sample_shape, generator, device, dtype)[0]
    if tuple(latents.shape) != (len(prompts), *model.sample_shape):
        raise ValueError(f"latents of shape {tuple(latents.shape)} for {len(prompts)} prompts; expected "
                         f"{(len(prompts), *model.sample_shape)}")
    sig = timestep_sigmas(model, steps, spacing) if sigmas is None else [float(s) for s in sigmas]
    x = latents.to(device, dtype) * (1 + sig[0] ** 2) ** 0.5  # the VP start sqrt(abar) x = noise, in sigma space
    with eval_mode(model):
        x, nfe = ode_solve(model, x, sig, method=solver, return_nfe=True, **cond)
    z = x / (1 + sig[-1] ** 2) ** 0.5  # back to the VP sample diffusers decodes (identity when ending at 0)
    out = model.decode(z) if output == "image" else z
    return (out, nfe) if return_nfe else out
