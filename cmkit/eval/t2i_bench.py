"""Quality against steps for a text-to-image teacher on the coloured Fashion-MNIST prompts: cmkit's solvers over
the teacher's trailing timestep grid with guidance, and diffusers' own ``StableDiffusionPipeline`` (DDIM, the
folder's scheduler spacing) as the reference a user would run. Scored by ``PromptScorer`` (item and colour accuracy,
Frechet distance in the item classifier's features); network passes counted (a guided step costs two)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.fashion_colours import all_prompts
from ..sampling.kinds import policy_of, text_to_image
from ..solvers import SOLVERS
from .bench import EvalSettings, measure_jobs

T2I_SOLVERS = ("ddim", "dpmpp_2m", "euler")
T2I_STEPS = (1, 2, 4, 8, 16, 25, 50)


def prompt_list(n: int) -> list[str]:
    """``n`` prompts cycling through every prompt of the set, so any n >= 40 covers all of them evenly."""
    return cycled(all_prompts(), n)


def cycled(every: list[str], n: int) -> list[str]:
    """``n`` prompts cycling through ``every``."""
    return [every[i % len(every)] for i in range(n)]


def guided_passes(teacher, guidance_scale: float) -> int:
    """Network passes of one guided evaluation of ``teacher``: two (conditional and unconditional) where it guides
    by classifier-free guidance, one where it does not (``guidance_scale`` 1, or guidance embedded in the network)."""
    return 2 if guidance_scale > 1 and not teacher.denoiser.embeds_guidance else 1


def _batched(run, n: int, batch: int = 500):
    """Run ``run(start, stop)`` over chunks of ``n`` samples (bounded memory), concatenating the images."""
    outs, nfe = [], None
    for i in range(0, n, batch):
        x, nfe = run(i, min(n, i + batch))
        outs.append(x)
    return torch.cat(outs), nfe


def teacher_t2i_jobs(teacher, solvers=T2I_SOLVERS, steps=T2I_STEPS, guidance_scale: float = 4.0,
                     prompts=prompt_list) -> list[tuple]:
    """``(method, nfe, model, run)`` jobs of ``teacher`` with each solver at each step count over its trailing grid
    (a flow family: its folder's own), the ``n`` samples' prompts ``prompts(n)``."""
    def job(solver, k):
        def run(n, g, c):
            texts = prompts(n)
            noise = torch.randn(n, *teacher.sample_shape, generator=g)
            return _batched(lambda a, b: text_to_image(teacher, texts[a:b], steps=k, solver=solver,
                                                       guidance_scale=guidance_scale, latents=noise[a:b],
                                                       return_nfe=True), n)
        return (f"teacher {solver}", guided_passes(teacher, guidance_scale) * grid_passes(solver, teacher.grid(
            k, "trailing")), teacher, run)

    return [job(solver, k) for solver in solvers for k in steps]


def grid_passes(solver: str, sigmas: list[float]) -> int:
    """Denoiser evaluations of a solve over ``sigmas``: a step solver's steps each cost its evaluations, but the
    step from sigma = inf and the one to 0 cost one (Euler's); a grid solver one a step."""
    per = SOLVERS[solver].evals_per_step
    if SOLVERS[solver].step is None:
        return len(sigmas) - 1
    return sum(1 if math.isinf(a) or b == 0 else per for a, b in zip(sigmas, sigmas[1:], strict=False))


def student_rows(model, steps=(1, 2, 4, 8), guidance_scale: float = 4.0, prompts=prompt_list) -> list[tuple]:
    """``(nfe, model, run)`` rows of a distilled text-to-image model at each step count, sampled as its kind
    samples (``cmkit.sampling.kinds``): at ``guidance_scale`` where its kind follows a teacher's guidance (a full
    LCM's embedding), else at its own default (a student that folds guidance in samples unguided).
    ``prompts(n)``: the ``n`` samples' prompts."""
    w = guidance_scale if policy_of(model).follows_guidance(model) else None

    def row(k):
        def run(n, g, c):
            texts = prompts(n)
            noise = torch.randn(n, *model.sample_shape, generator=g)
            return _batched(lambda a, b: text_to_image(model, texts[a:b], steps=k, guidance_scale=w,
                                                       latents=noise[a:b], generator=g, return_nfe=True), n)
        return (k, model, run)
    return [row(k) for k in steps]


def pipeline_job(teacher, folder, steps: int = 25, guidance_scale: float = 4.0, prompts=prompt_list) -> tuple:
    """diffusers' own pipeline for ``folder`` (``StableDiffusionPipeline`` or the SDXL one, with the folder's
    scheduler and spacing; a video family's ``WanPipeline``), on the teacher's device, at the teacher's size (and
    frame count), from the same starting noise as the teacher's rows. Images (N, 3, H, W) or videos
    (N, 3, F, H, W) in [-1, 1]."""
    family = teacher.family
    pipe = family.open_pipeline(folder).to(next(teacher.parameters()).device)
    pipe.set_progress_bar_config(disable=True)
    passes = guided_passes(teacher, guidance_scale)
    size = {"height": teacher.height, "width": teacher.width}
    if getattr(teacher, "max_sequence_length", None) is not None:  # the families whose pipelines take it
        size["max_sequence_length"] = teacher.max_sequence_length
    video = getattr(teacher, "num_frames", None) is not None
    if video:
        size["num_frames"] = teacher.num_frames

    def call(texts, latents):
        out = pipe(texts, latents=latents, num_inference_steps=steps, guidance_scale=guidance_scale, **size,
                   output_type="pt")
        # a video pipeline's frames are (B, F, C, H, W) in [0, 1]; cmkit's videos (B, C, F, H, W) in [-1, 1]
        return (out.frames.transpose(1, 2) if video else out.images) * 2 - 1

    def run(n, g, c):
        texts = prompts(n)
        noise = family.pipeline_latents(teacher, torch.randn(n, *teacher.sample_shape, generator=g))
        return _batched(lambda a, b: (call(texts[a:b], noise[a:b]), passes * steps), n)
    return (f"diffusers pipeline ({type(pipe.scheduler).__name__})", passes * steps, teacher, run)


def check_model_names(models: dict | None, out) -> None:
    """A one-line error for a row name that would reach outside ``out`` (names are part of the file names under
    ``out/partial``)."""
    for name in models or {}:
        if not name.strip(". ") or any(c in name for c in "/\\\0"):
            raise ValueError(f"model name {name!r} would reach outside {out}: use one without '/', '\\' or only dots")


def benchmark_jobs(teacher, folder, *, solvers, steps, guidance_scale: float, pipeline_steps: int,
                   models: dict | None, prompts) -> list[tuple]:
    """Every row of a prompt benchmark: the pipeline's own at ``pipeline_steps``, the teacher's solvers at each step
    count, and the ``models`` rows (``name -> [(nfe, model, run)]``)."""
    jobs = [pipeline_job(teacher, folder, pipeline_steps, guidance_scale, prompts)]
    jobs += teacher_t2i_jobs(teacher, solvers, steps, guidance_scale, prompts)
    for name, rows in (models or {}).items():
        jobs += [(name, nfe, model, run) for nfe, model, run in rows]
    return jobs


def text_to_image_benchmark(teacher, folder, ev: EvalSettings, out, *, solvers=T2I_SOLVERS, steps=T2I_STEPS,
                            guidance_scale: float = 4.0, models: dict | None = None, progress: bool = True,
                            pipeline_steps: int = 25) -> dict:
    """Measure and write ``out/quality_vs_steps.{md,json,png}``; ``models``: extra rows, ``name -> [(nfe, model,
    run)]`` (distilled models; ``run`` as in ``bench.measure_jobs``). Resumable under ``out/partial``."""
    from .prompt_scores import PromptScorer
    from .report import write_results

    ev.check()
    check_model_names(models, out)
    scorer = PromptScorer(progress=progress)
    prompts = prompt_list(ev.num_samples)
    jobs = benchmark_jobs(teacher, folder, solvers=solvers, steps=steps, guidance_scale=guidance_scale,
                          pipeline_steps=pipeline_steps, models=models, prompts=prompt_list)
    result = measure_jobs(jobs, lambda x: scorer(x, prompts), ev, progress=progress,
                          partial_dir=Path(out) / "partial", score_tag=f"t2i-w{guidance_scale:g}")
    reference = scorer.reference(prompts[:64])
    written = write_results(result, reference, out, extra={"dataset": "fashion_colours",
                                                            "guidance_scale": guidance_scale,
                                                            "prompts": len(set(prompts)), "classifier": scorer.info})
    grid = prompt_grid(result["samples"], prompts, reference, Path(out) / "prompts_by_method.png")
    written["paths"].append(str(grid))
    return written


def prompt_grid(samples: dict, prompts: list[str], reference: torch.Tensor, path: Path) -> Path:
    """One row per (method, NFE), one column per prompt (each item in a different colour), seed 0's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import image_grid

    cols = [i * 5 + i % 5 for i in range(8) if i * 5 + i % 5 < len(prompts)]
    rows = [("held out", reference)] + [(f"{m}, NFE {n}", x) for (m, n), x in samples.items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * len(cols) + 3.2, 0.95 * len(rows) + 0.6), squeeze=False)
    for ax, (title, x) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(image_grid(x[cols], len(cols)))
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("   ".join(prompts[i].removeprefix("a ") for i in cols), fontsize=6)
    fig.subplots_adjust(left=0.3, right=0.98, top=0.95, bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
