"""Samplers: consistency-model one-step / multistep sampling and teacher ODE baselines.

Each sample's noise comes from its own stream (seeded in order from the caller's generator), so sample i
gets the same noise whatever ``num`` is, and results are reproducible from a generator.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..core import check_sigmas
from ..core.memory import check_fits, sampling_bytes
from ..models import num_classes_of
from ..solvers import ode_solve


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _to_device(cond: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


def per_sample_noise(num: int, draws: int, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of shape ``(draws, num, *shape)``; sample i's values do not depend on ``num``.

    torch's CPU normal sampler takes a different (vectorised) path for larger tensors, so one big draw would give
    sample i different values at different batch sizes. Instead each sample gets its own seed, drawn in order
    from ``generator``, and its own small stream.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator for sampling noise (the noise is moved to the model's device)")
    seeds = torch.randint(0, 2**62, (num,), generator=generator).tolist()
    per = [torch.randn((draws, *shape), generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds]
    return torch.stack(per, 1).to(device)


def resolve_sigmas(cm, steps: int | None, sigmas) -> list[float]:
    """The sigma list for a consistency-model sampler, validated (descending, inside the model's range)."""
    if sigmas is None:
        if steps is None or int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sigmas = cm.sigmas_for_steps(int(steps))
    return check_sigmas(sigmas, cm.sigma_min, cm.sigma_max).tolist()


PROGRESS_STEPS = 100


def check_batch_fits(cm, num: int, draws: int, device) -> None:
    """Refuse, in one line and before any noise is drawn, a batch that cannot fit in memory."""
    check_fits(sampling_bytes(cm, num, draws), f"{num} samples x {draws} steps in one batch",
               "ask for fewer samples (or steps) per call and join the batches", device)


@torch.no_grad()
def multistep(cm, x: torch.Tensor, sigmas, noise: torch.Tensor | None = None, generator=None, project=None,
              **cond) -> torch.Tensor:
    """CM paper Algorithm 1 from a starting sample ``x`` at ``sigmas[0]``: denoise, then for each further sigma
    re-noise with ``sqrt(sigma^2 - sigma_min^2) z`` and denoise again. ``noise[k]`` is the z of the k-th re-noise.
    ``project`` (Algorithm 4's replacement of known coefficients) is applied after every denoise."""
    project = project or (lambda v: v)
    x = project(cm(x, sigmas[0], **cond))
    rest = sigmas[1:]
    if len(rest) >= PROGRESS_STEPS:  # a long chain shows its progress
        from tqdm.auto import tqdm

        rest = tqdm(rest, desc="steps", unit="step", leave=False)
    for k, s in enumerate(rest):
        z = noise[k] if noise is not None else torch.randn(x.shape, generator=generator).to(x)
        x = x + (s**2 - cm.sigma_min**2) ** 0.5 * z
        x = project(cm(x, s, **cond))
    return x


@contextmanager
def eval_mode(model):
    """Run a model without dropout, restoring every submodule's training flag afterwards (one flag for the whole
    model would put frozen parts, a text encoder kept in eval mode, into training mode: T5's dropout then
    changes every prompt embedding)."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    flags = [m.training for m in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


@torch.no_grad()
def sample(cm, num: int, steps: int = 1, sigmas=None, generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """``num`` samples from a consistency model in ``steps`` evaluations, or along an explicit descending sigma
    list (first = the starting noise level, normally sigma_max)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    sig = resolve_sigmas(cm, steps, sigmas)
    device, dtype = _device_dtype(cm)
    check_batch_fits(cm, num, len(sig), device)
    cond = _to_device(cond, device)
    z = per_sample_noise(num, len(sig), cm.sample_shape, generator, device, dtype)
    with eval_mode(cm):
        if getattr(cm, "deterministic_steps", False):
            return flow_chain(cm, sig[0] * z[0], sig, **cond)
        return multistep(cm, sig[0] * z[0], sig, noise=z[1:], **cond)


@torch.no_grad()
def flow_chain(fm, x: torch.Tensor, sigmas, **cond) -> torch.Tensor:
    """A flow map's few-step sampling (MeanFlow): jump from each sigma to the next, the last one to 0."""
    for s, s_next in zip(sigmas, [*sigmas[1:], 0.0], strict=True):
        x = fm.flow(x, s, s_next, **cond)
    return x


@torch.no_grad()
def sample_teacher(den, num: int, sigmas, method: str = "heun", generator=None, return_nfe: bool = False,
                   rtol: float = 1e-5, atol: float = 1e-5, churn: float = 0.0,
                   churn_range: tuple[float, float] = (0.0, math.inf), churn_noise: float = 1.0, **cond):
    """Teacher samples: start at ``sigmas[0] z`` and solve the PF-ODE along ``sigmas`` (may end at 0). ``churn`` > 0
    runs Karras et al.'s stochastic sampler (see ``ode_solve``), whose noise is per sample as well."""
    device, dtype = _device_dtype(den)
    cond = _to_device(cond, device)
    draws = 1 + (len(sigmas) - 1 if churn else 0)
    noise = per_sample_noise(num, draws, den.sample_shape, generator, device, dtype)
    with eval_mode(den):
        return ode_solve(den, noise[0] * float(sigmas[0]), sigmas, method=method, return_nfe=return_nfe, rtol=rtol,
                         atol=atol, churn=churn, churn_range=churn_range, churn_noise=churn_noise,
                         noise=noise[1:] if churn else None, **cond)


def class_condition(model, num: int, label: int | None = None, seed: int = 0) -> dict:
    """Conditioning for sampling ``num`` samples: ``class_labels`` for a class-conditional model (all ``label``, or
    random classes from ``seed``), nothing otherwise."""
    classes = num_classes_of(model)
    if classes is None:
        if label is not None:
            raise ValueError("this model is not class-conditional; drop --class-label")
        return {}
    if label is not None:
        if not 0 <= label < classes:
            raise ValueError(f"class label {label} is outside 0..{classes - 1}")
        return {"class_labels": torch.full((num,), label, dtype=torch.long)}
    return {"class_labels": torch.randint(0, classes, (num,), generator=torch.Generator().manual_seed(seed))}
