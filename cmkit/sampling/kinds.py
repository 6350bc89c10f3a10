"""Text-to-image sampling of any model (``text_to_image``) as its kind samples: one ``SamplingPolicy`` per model
kind (``model.kind``: a teacher, an LCM / LCM-LoRA, a few-step student of a flow teacher, ...), registered under
that kind. A policy owns the kind's
default steps, its default guidance and what a guidance scale means for it, the solvers it accepts and its sampler;
``text_to_image``, ``cmkit generate``, ``cmkit bench text-to-image`` and validation images ask the policy and never
branch on kind names, so a new student kind is one policy class plus one ``@register_policy("kind")`` line.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ..core import Registry
from ..core.checks import check_guidance, positive_int
from ..latent.flow_student import SAMPLERS
from ..latent.lcm import lcm_default_guidance
from .text2image import draw_latents, flow_map_sample, lcm_sample, solve_text_to_image

POLICIES: Registry = Registry("text-to-image model kind")
TEACHER_KIND = "teacher"  # a TextToImageModel (a diffusers pipeline folder) samples as a teacher


def register_policy(kind: str):
    """Register a ``SamplingPolicy`` subclass (instantiated once) for models whose ``kind`` is ``kind``."""
    def add(cls):
        POLICIES.register(kind, cls())
        return cls
    return add


def policy_of(model) -> SamplingPolicy:
    """The sampling policy of ``model``'s kind (a one-line error for a model that takes no prompts)."""
    kind = getattr(model, "kind", None)
    if kind not in POLICIES or not hasattr(model, "encode_prompt"):
        raise ValueError(f"a {type(model).__name__} is not a text-to-image model cmkit samples (kinds: "
                         f"{', '.join(POLICIES.names())}); sample it with cmkit.sample")
    return POLICIES[kind]


class SamplingPolicy:
    """The defaults and sampler of one model kind. Subclasses override what differs; ``sample`` receives every
    argument already resolved (``steps`` and ``guidance_scale`` not None)."""

    def default_steps(self, model) -> int:
        return 25

    def default_guidance(self, model) -> float:
        return 4.0

    def follows_guidance(self, model) -> bool:
        """Whether a benchmark's guidance scale applies to this model (a teacher, an LCM's guidance embedding); a
        student that folds guidance in samples at its own default instead."""
        return True

    def resolve(self, model, steps, guidance_scale) -> tuple[int, float]:
        steps = positive_int(self.default_steps(model) if steps is None else steps, "steps")  # 2.5 is not run as 2
        w = check_guidance(self.default_guidance(model) if guidance_scale is None else guidance_scale)
        return steps, w

    def sample(self, model, prompts, *, steps: int, solver, guidance_scale, negative_prompts, latents, generator,
               spacing, sigmas, output: str, return_nfe: bool):
        raise NotImplementedError


@register_policy(TEACHER_KIND)
class TeacherPolicy(SamplingPolicy):
    """A text-to-image teacher: the guided PF-ODE solved with any cmkit solver (default DDIM, 25 steps, guidance 4)
    over its family's grid."""

    solver = "ddim"

    def sample(self, model, prompts, *, steps, solver, guidance_scale, **kw):
        return solve_text_to_image(model, prompts, steps, solver or self.solver, guidance_scale, **kw)


@register_policy("flow_cm")
class FlowStudentPolicy(SamplingPolicy):
    """A few-step student of a flow teacher: its own sampler (what its exported scheduler runs) at its distilled
    step count, guidance folded in (it samples at 1; another value would guide on top of it: refused). A re-noising
    sampler draws its fresh noise from torch's generator, seeded from ``generator`` after the starting latents."""

    def default_steps(self, model) -> int:
        return int(model.steps)

    def default_guidance(self, model) -> float:
        return 1.0

    def follows_guidance(self, model) -> bool:
        return False

    def resolve(self, model, steps, guidance_scale):
        if guidance_scale is not None and (torch.is_tensor(guidance_scale) or guidance_scale != 1.0):
            raise ValueError(f"{type(model).__name__} folds guidance in (distilled at "
                             f"{getattr(model, 'guidance_scale', '?')}) and samples at guidance 1, one pass a step; "
                             f"guidance {guidance_scale:g} would guide on top of it: leave the guidance out")
        return super().resolve(model, steps, None)

    def sample(self, model, prompts, *, steps, solver, guidance_scale, latents, generator, **kw):
        if solver is not None and solver not in SAMPLERS:  # its own, or the other consistency sampler
            raise ValueError(f"a flow student samples with its own sampler ({model.sampler}, what its exported "
                             f"scheduler runs; or {' / '.join(SAMPLERS)}); solver {solver!r} does not apply: leave "
                             "the solver out")
        if latents is None:
            latents = draw_latents(model, prompts, generator)
        seeded = nullcontext()
        if generator is not None:
            seeded = torch.random.fork_rng(devices=[])
        with seeded:
            if generator is not None:  # the re-noising draws: their own stream, not a copy of the latents' one
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            return solve_text_to_image(model, prompts, steps, solver or model.sampler, guidance_scale, latents=latents,
                                       generator=generator, **kw)


@register_policy("flow_map")
class FlowMapPolicy(FlowStudentPolicy):
    """A flow-map student: jumps over ``FlowMapEulerDiscreteScheduler``'s grid of any step count from one checkpoint
    (default: the count it recorded), one pass a jump, guidance folded in (another guidance value refused, as for
    the other flow students)."""

    def sample(self, model, prompts, *, steps, solver, guidance_scale, negative_prompts, latents, generator,
               spacing, sigmas, output, return_nfe):
        if solver is not None:
            raise ValueError(f"a flow-map student samples by its own jumps; solver {solver!r} does not apply: leave "
                             "the solver out")
        if negative_prompts is not None:
            raise ValueError("a flow-map student folds guidance in and takes no negative prompt; leave it out")
        times = None if sigmas is None else [s / (1 + s) if s != float("inf") else 1.0 for s in sigmas]
        return flow_map_sample(model, prompts, steps, latents=latents, generator=generator, output=output,
                               return_nfe=return_nfe, times=times)


@register_policy("lcm")
class LCMPolicy(SamplingPolicy):
    """A latent consistency model: ``LCMScheduler``'s steps (default 4); a full LCM takes the guidance scale through
    its embedding (default 4), an LCM-LoRA folds guidance in (default 1, classifier-free guidance on top above 1)."""

    def default_steps(self, model) -> int:
        return 4

    def default_guidance(self, model) -> float:
        return lcm_default_guidance(model)

    def follows_guidance(self, model) -> bool:
        return bool(model.denoiser.embeds_guidance)

    def sample(self, model, prompts, *, steps, solver, guidance_scale, negative_prompts, latents, generator,
               spacing, sigmas, output, return_nfe):
        if sigmas is not None:
            raise ValueError("an LCM samples at its scheduler's timesteps, not at given sigmas; use "
                             "cmkit.lcm_sample(model, prompts, timesteps=...)")
        return lcm_sample(model, prompts, steps, guidance_scale=guidance_scale, negative_prompts=negative_prompts,
                          latents=latents, generator=generator, output=output, return_nfe=return_nfe, solver=solver)


@contextmanager
def guided_with(model, options: dict):
    """Within the block, ``model``'s denoiser guides with the pipeline options ``options`` (``guide_with``: a
    one-line error for one its family does not have); its own values restored after."""
    den = model.denoiser
    before = {k: getattr(den, k, None) for k in options}
    den.guide_with(**options)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(den, k, v)


def sized(model, height, width, max_sequence_length, num_frames=None):
    """``model.sampling_at(...)`` (the size, frame count and prompt length of one call), or nothing to do where none
    is asked."""
    if height is None and width is None and max_sequence_length is None and num_frames is None:
        return nullcontext()
    if not hasattr(model, "sampling_at"):
        raise ValueError(f"a {type(model).__name__} samples at one size; leave out height, width, num_frames and "
                         "max_sequence_length")
    return model.sampling_at(height, width, max_sequence_length, num_frames)


@torch.no_grad()
def text_to_image(model, prompts, steps: int | None = None, solver: str | None = None,
                  guidance_scale: float | None = None, negative_prompts=None, latents: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, spacing: str | None = "trailing", sigmas=None,
                  output: str = "image", return_nfe: bool = False, height: int | None = None,
                  width: int | None = None, max_sequence_length: int | None = None, num_frames: int | None = None,
                  **guidance_options):
    """Images in [-1, 1] (``output="latent"``: latents) for ``prompts`` from any text-to-image model cmkit opens,
    sampled as its kind samples (``cmkit.sampling.kinds``): a teacher solves the guided PF-ODE with ``solver`` (any
    cmkit solver or torchdiffeq method; default DDIM, 25 steps, guidance 4) over ``timestep_sigmas(steps,
    spacing)`` or explicit ``sigmas``; a distilled student takes its own sampler, steps and guidance by default
    (an LCM its ``LCMScheduler`` steps; a flow student its exported scheduler's, at guidance 1). ``latents``:
    unit-variance starting noise, one per prompt (as diffusers pipelines take it); by default drawn per sample
    from ``generator``. ``height`` / ``width`` (default: the model's size; either alone keeps the other side) and
    ``max_sequence_length`` (prompt tokens, where the family's encoder takes it) as the pipelines take them: the
    latents, a resolution-dependent shift and size conditioning follow. ``guidance_options``: a pipeline's own
    guidance arguments where its family has them (Z-Image's ``cfg_normalization`` / ``cfg_truncation``), for this
    call; one its family does not have is a one-line error. With ``return_nfe`` also the network passes (a guided
    evaluation counts two)."""
    policy = policy_of(model)
    steps, guidance_scale = policy.resolve(model, steps, guidance_scale)
    options = guided_with(model, guidance_options) if guidance_options else nullcontext()
    with sized(model, height, width, max_sequence_length, num_frames), options:
        return policy.sample(model, prompts, steps=steps, solver=solver, guidance_scale=guidance_scale,
                             negative_prompts=negative_prompts, latents=latents, generator=generator,
                             spacing=spacing, sigmas=sigmas, output=output, return_nfe=return_nfe)


@torch.no_grad()
def text_to_video(model, prompts, steps: int | None = None, solver: str | None = None,
                  guidance_scale: float | None = None, negative_prompts=None, latents: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, spacing: str | None = "trailing", sigmas=None,
                  output: str = "image", return_nfe: bool = False, height: int | None = None,
                  width: int | None = None, num_frames: int | None = None, max_sequence_length: int | None = None,
                  **guidance_options):
    """Videos ``(B, C, F, H, W)`` in [-1, 1] (``output="latent"``: latents ``(B, C, F', H', W')``) for ``prompts``
    from a text-to-video model (a video family's teacher or one of its students), sampled as ``text_to_image``
    samples (its kind's policy, the family's grid and guidance; ``num_frames`` as the pipeline takes it, a count
    the VAE's temporal factor cannot take a one-line error). ``guidance_options``: the pipeline's own (a
    two-expert Wan 2.2's ``guidance_scale_2``)."""
    if getattr(model, "num_frames", None) is None:
        raise ValueError(f"a {type(model).__name__} of a {getattr(getattr(model, 'family', None), 'name', '?')} "
                         "makes images, not videos; use cmkit.text_to_image")
    return text_to_image(model, prompts, steps, solver, guidance_scale, negative_prompts, latents, generator, spacing,
                         sigmas, output, return_nfe, height, width, max_sequence_length, num_frames,
                         **guidance_options)
