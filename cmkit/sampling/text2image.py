"""Sampling a latent text-to-image model: prompts -> conditioning -> a PF-ODE solve (or a consistency model's few
steps) over latents -> VAE decode. Grids come from the model's pipeline family (``model.grid``): an SD UNet's
discrete timesteps spaced as diffusers' schedulers space them, so a cmkit DDIM solve with the folder's own spacing is
step for step what ``StableDiffusionPipeline`` does with ``DDIMScheduler``; a flow transformer's shifted flow grid
from t = 1, so a cmkit Euler solve is step for step ``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

import torch

from ..latent.families.unet import timestep_sigmas as unet_timestep_sigmas
from ..latent.lcm import lcm_sampling_guidance
from ..solvers import ode_solve
from .samplers import _device_dtype, _to_device, eval_mode, per_sample_noise


def timestep_sigmas(model, steps: int, spacing: str | None = "trailing") -> list[float]:
    """The descending sigma grid of a ``steps``-step solve, as the model's pipeline family lays it out: for SD-style
    UNets the discrete timesteps spaced as diffusers' ``timestep_spacing`` does ("trailing", "leading", "linspace";
    ``None``: the folder's own DDIM grid); for flow-matching transformers (SD3, Flux) the folder's
    ``FlowMatchEulerDiscreteScheduler`` grid with its shift, from t = 1 (sigma = inf) to 0 (``None`` or
    "trailing")."""
    grid = getattr(model, "grid", None)
    if grid is None:  # a latent consistency model: its teacher's UNet table
        return unet_timestep_sigmas(model, steps, spacing)
    return grid(steps, spacing)


def _start_and_end(model, sig: list[float], latents: torch.Tensor):
    """The sigma-space start from the pipeline's starting latents (its native sample at ``sig[0]``; at sigma = inf
    the unit noise itself), and the map from the solve's end back to the native latents the VAE decodes."""
    sched = model.schedule
    s0 = torch.tensor(sig[0], dtype=torch.float64, device=latents.device)
    start = sched.from_native(latents.double(), s0).to(latents.dtype)
    s1 = torch.tensor(sig[-1], dtype=torch.float64, device=latents.device)
    return start, lambda x: sched.to_native(x.double(), s1).to(x.dtype)


def draw_latents(model, prompts, generator) -> torch.Tensor:
    """Unit-variance starting latents, one per prompt, drawn per sample from ``generator`` (as the pipelines draw
    them), on the denoiser's device and in its dtype."""
    device, dtype = _device_dtype(model.denoiser)
    n = 1 if isinstance(prompts, str) else len(prompts)
    return per_sample_noise(n, 1, model.sample_shape, generator, device, dtype)[0]


def _prepare(model, prompts, negative_prompts, guidance_scale, latents, generator, output):
    """What every text-to-image sampler starts from: the prompts' conditioning and unit-variance starting latents
    (given, or drawn per sample from ``generator``), on the denoiser's device and in its dtype."""
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device, dtype = _device_dtype(model.denoiser)
    cond = _to_device(model.encode_prompt(prompts, negative_prompts, guidance_scale), device)
    if latents is None:
        latents = draw_latents(model, prompts, generator)
    if tuple(latents.shape) != (len(prompts), *model.sample_shape):
        raise ValueError(f"latents of shape {tuple(latents.shape)} for {len(prompts)} prompts; expected "
                         f"{(len(prompts), *model.sample_shape)}")
    return cond, latents.to(device, dtype)


def solve_text_to_image(model, prompts, steps: int, solver: str, guidance_scale, negative_prompts=None,
                        latents=None, generator=None, spacing: str | None = "trailing", sigmas=None,
                        output: str = "image", return_nfe: bool = False):
    """The guided PF-ODE solve every ODE-sampled kind shares: prompts -> conditioning -> ``solver`` over the
    model's grid (or ``sigmas``) from its pipeline's starting latents -> VAE decode."""
    cond, latents = _prepare(model, prompts, negative_prompts, guidance_scale, latents, generator, output)
    sig = timestep_sigmas(model, steps, spacing) if sigmas is None else [float(s) for s in sigmas]
    x, to_native = _start_and_end(model, sig, latents)
    with eval_mode(model):
        x, nfe = ode_solve(model, x, sig, method=solver, return_nfe=True, **cond)
    z = to_native(x)  # the native sample diffusers decodes (the identity when ending at 0)
    out = model.decode(z) if output == "image" else z
    return (out, nfe) if return_nfe else out


@torch.no_grad()
def lcm_sample(model, prompts, steps: int | None = 4, guidance_scale: float | None = None, timesteps=None,
               negative_prompts=None, latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
               output: str = "image", return_nfe: bool = False, solver: str | None = None):
    """Images (or latents) from a latent consistency model in ``steps`` evaluations, or at explicit descending
    ``timesteps``, exactly as diffusers' ``LCMScheduler`` samples: evaluate ``f`` at each timestep, then re-noise to
    the next one, ``z <- f + sigma_next eps`` (in the VP sample, ``sqrt(abar') f + sqrt(1 - abar') eps``), with
    ``eps`` drawn from ``generator`` in the scheduler's order. ``guidance_scale`` goes to the guidance embedding
    (LCM; default 4) or to classifier-free guidance when above 1 (LCM-LoRA; default 1, its guidance is folded in).
    One-line errors for what an LCM would ignore: a ``solver``, a negative prompt it does not use, more steps than
    its schedule's ``num_ddim_timesteps``."""
    guidance_scale = lcm_sampling_guidance(model, steps, timesteps, guidance_scale, negative_prompts, solver)
    sched = model.lcm_scheduler()
    if timesteps is not None:
        sched.set_timesteps(timesteps=[int(t) for t in timesteps])
    elif steps is None or int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    else:
        sched.set_timesteps(int(steps))
    cond, latents = _prepare(model, prompts, negative_prompts, guidance_scale, latents, generator, output)
    device = latents.device
    sig = model.denoiser.t_to_sigma(sched.timesteps.to(torch.float64)).tolist()
    x = latents * (1 + sig[0] ** 2) ** 0.5
    passes = 0
    with eval_mode(model):
        for i, s in enumerate(sig):
            x = model(x, s, **cond)
            passes += model.passes(**cond)
            if i + 1 < len(sig):
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = x + sig[i + 1] * eps.to(device)
    out = model.decode(x) if output == "image" else x
    return (out, passes) if return_nfe else out


@torch.no_grad()
def flow_map_sample(model, prompts, steps: int, latents=None, generator=None, output: str = "image",
                    return_nfe: bool = False, times=None):
    """Images (or latents) from a flow-map student (``latent.flow_map``): jumps ``z_r = z_t - (t - r) u(z_t, r, t)``
    over its grid of ``steps`` steps (``model.grid``: ``FlowMapEulerDiscreteScheduler``'s) or the descending flow
    ``times`` given (from 1 to 0), from unit noise at t = 1; one network pass a jump."""
    cond, latents = _prepare(model, prompts, None, 1.0, latents, generator, output)
    ts = model.grid(steps) if times is None else [float(t) for t in times]
    if any(not b < a for a, b in zip(ts, ts[1:], strict=False)) or not 0 <= ts[-1] < ts[0] <= 1:
        raise ValueError(f"a flow-map sample's times must fall from at most 1 to at least 0, got {ts}")
    z, passes = latents, 0
    with eval_mode(model):
        for t, r in zip(ts, ts[1:], strict=False):
            z = model.jump(z, torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), **cond)
            passes += 1
    out = model.decode(z) if output == "image" else z
    return (out, passes) if return_nfe else out
