"""Quantised frozen teachers (``teacher.quantize``): a latent teacher's network(s) held with weight-only int8 or
int4 linear layers through torchao (``quantize_`` with ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig``), and the
error that costs, measured before anything trains.

Why torchao: its weight-only configs are plain tensor subclasses that run on the CPU and on any GPU without a custom
build, and peft's LoRA layers wrap a quantised linear as they wrap a float one (the adapter itself stays in float);
bitsandbytes' nf4 needs its CUDA kernels (its CPU path is a slow fallback) and ties the teacher to its ``Linear4bit``
modules. Only the linear layers are quantised (convolutions, norms and embeddings keep their dtype): they hold
nearly all of a transformer's weights and most of a UNet's.

The error: the teacher's one-step denoising ``D(z_sigma, sigma)`` (guided as the recipe guides) on a few probe
batches (random unit-variance latents noised at sigmas spread over the schedule, the empty prompt), before and after,
as ``||D_q - D|| / ||D||`` over all probes. Only the outputs are kept, so no second copy of the network is held.
"""

from __future__ import annotations

import torch

QUANTIZE_MODES = ("", "int8", "int4")
PROBE_SIGMAS = (0.1, 0.5, 1.0, 2.0, 8.0)  # relative to the teacher's sigma_data: low to high noise


def check_quantize(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"teacher.quantize must be '' (none), 'int8' or 'int4' (torchao weight-only), got {mode!r}")
    return mode


def _config(mode: str):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise ImportError(f"teacher.quantize = {mode!r} needs torchao: pip install 'cmkit[quant]' (or torchao)") \
            from None
    return Int8WeightOnlyConfig(version=2) if mode == "int8" else Int4WeightOnlyConfig(group_size=32)


@torch.no_grad()
def _probe(teacher, batch: int, seed: int, guidance_scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    device = next(teacher.denoiser.parameters()).device
    cond = teacher.encode_prompt([""] * batch, guidance_scale=guidance_scale)
    out = []
    for s in PROBE_SIGMAS:
        sigma = float(s) * float(teacher.sigma_data)
        sigma = min(max(sigma, float(teacher.sigma_min)), float(teacher.sigma_max))
        z0 = torch.randn(batch, *teacher.sample_shape, generator=g)
        z = (z0 + sigma * torch.randn(z0.shape, generator=g)).to(device)
        out.append(teacher(z, torch.full((batch,), sigma, device=device), **cond).float().cpu())
    return out


def quantize_teacher(teacher, mode: str, guidance_scale: float = 1.0, batch: int = 2, seed: int = 0) -> dict:
    """Quantise the linear layers of ``teacher``'s denoiser in place (weight-only ``mode``, "int8" or "int4") and
    return ``{"mode", "layers", "relative_error"}``: the one-step denoising error against the unquantised teacher
    (module docstring)."""
    check_quantize(mode)
    if not mode:
        return {"mode": "", "layers": 0, "relative_error": 0.0}
    if not hasattr(teacher, "encode_prompt"):
        raise ValueError("teacher.quantize applies to latent text-to-image / video teachers (a pipeline folder); "
                         f"this teacher is a {type(teacher).__name__}: remove teacher.quantize")
    from torchao.quantization import quantize_

    config = _config(mode)
    before = _probe(teacher, batch, seed, guidance_scale)
    layers = [m for m in teacher.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    keep = {id(m) for m in layers if mode == "int4" and m.in_features % 32}  # int4 groups 32 inputs: others stay
    layers = [m for m in layers if id(m) not in keep]
    try:
        quantize_(teacher.denoiser, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and id(m) not in keep)
    except ImportError as e:  # int4's packed kernels (torchao's mslk dependency, CUDA)
        raise ImportError(f"teacher.quantize = {mode!r}: torchao cannot pack {mode} weights here ({e}); int4 needs "
                          "its CUDA kernels on a GPU: use 'int8' on this machine") from None
    teacher.denoiser.requires_grad_(False)
    after = _probe(teacher, batch, seed, guidance_scale)
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True))
    den = sum(float(b.pow(2).sum()) for b in before)
    return {"mode": mode, "layers": len(layers), "relative_error": (num / max(den, 1e-30)) ** 0.5}
