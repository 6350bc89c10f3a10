"""Quality against steps for a text-to-video teacher (a ``WanPipeline`` folder) on the moving Fashion-MNIST prompts
("a red sneaker moving left"): cmkit's solvers over the folder's own grid with guidance, diffusers' own
``WanPipeline`` (the folder's scheduler, UniPC as Wan ships it, at its default 50 steps) as the reference a user
would run, and distilled students at 1-8 steps. The rows are ``t2i_bench``'s (one job builder for both benchmarks);
scored by ``video_scores.VideoScorer`` (item, colour and direction accuracy, and the Frechet distance in the item
classifier's features, per frame, to held-out real clips of Fashion-MNIST's test items); network passes counted (a
guided evaluation costs two). Written as the image benchmark writes (``report.write_results``), with a GIF of
prompts x methods."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.moving_fashion import MAX_FRAMES, all_moving_prompts, fashion_item_pool, moving_fashion
from .bench import EvalSettings, measure_jobs
from .t2i_bench import benchmark_jobs, check_model_names, cycled

T2V_SOLVERS = ("euler", "unipc", "dpmpp_2m")
T2V_STEPS = (1, 2, 4, 8, 16, 25, 50)
T2V_GUIDANCE = 5.0  # WanPipeline's default guidance_scale
PIPELINE_STEPS = 50  # WanPipeline's default num_inference_steps
GIF_COLUMNS = 8
GALLERY = 800  # held-out clips drawn at least: about 5 of each prompt, for the GIF's row of real clips


def video_prompt_list(n: int) -> list[str]:
    """``n`` prompts cycling through the 160 prompts of the set (item-major, then colour, then direction), so any
    multiple of 160 covers all of them evenly."""
    return cycled(all_moving_prompts(), n)


def held_out_videos(n: int, num_frames: int):
    """``n`` real clips of Fashion-MNIST's test items (``moving_fashion``, seed 1), the Frechet distance's
    reference: ``num_frames`` frames where the set can make them (2 to 17; the distance is per frame)."""
    return moving_fashion(n, seed=1, num_frames=min(max(int(num_frames), 2), MAX_FRAMES),
                          items=fashion_item_pool("test"))


def check_video_teacher(teacher, what: str = "the teacher") -> None:
    if getattr(teacher, "num_frames", None) is None:
        family = getattr(getattr(teacher, "family", None), "name", type(teacher).__name__)
        raise ValueError(f"{what} (a {family}) makes images, not videos; benchmark it with `cmkit bench "
                         "text-to-image`, or give a text-to-video teacher (a WanPipeline folder)")


def text_to_video_benchmark(teacher, folder, ev: EvalSettings, out, *, solvers=T2V_SOLVERS, steps=T2V_STEPS,
                            guidance_scale: float = T2V_GUIDANCE, models: dict | None = None,
                            pipeline_steps: int = PIPELINE_STEPS, progress: bool = True) -> dict:
    """Measure and write ``out/quality_vs_steps.{md,json,png}`` and ``out/prompts_by_method.gif``; ``teacher``: a
    text-to-video model (its size and frame count are the benchmark's), ``folder``: its pipeline folder (the
    pipeline's row, at ``pipeline_steps``); ``models``: extra rows, ``name -> [(nfe, model, run)]``
    (``t2i_bench.student_rows(model, steps, guidance_scale, video_prompt_list)``). Every row starts from the same
    noise per seed, so the pipeline's row equals the teacher's row of the pipeline's solver at its step count.
    Resumable under ``out/partial``."""
    from . import video_scores
    from .report import write_results

    check_video_teacher(teacher)
    ev.check()
    check_model_names(models, out)
    prompts = video_prompt_list(ev.num_samples)
    # enough real clips that the GIF's columns find one of their prompts; the first num_samples are the reference
    held_out = held_out_videos(max(ev.num_samples, GALLERY), teacher.num_frames)
    reference = held_out.videos[:ev.num_samples]
    scorer = video_scores.VideoScorer(progress=progress, reference=reference)
    jobs = benchmark_jobs(teacher, folder, solvers=solvers, steps=steps, guidance_scale=guidance_scale,
                          pipeline_steps=pipeline_steps, models=models, prompts=video_prompt_list)
    result = measure_jobs(jobs, lambda x: scorer(x, prompts), ev, progress=progress,
                          partial_dir=Path(out) / "partial", score_tag=f"t2v-w{guidance_scale:g}")
    extra = {"dataset": "moving_fashion", "guidance_scale": guidance_scale, "prompts": len(set(prompts)),
             "size": [teacher.num_frames, teacher.height, teacher.width], "pipeline_steps": pipeline_steps,
             "fd": f"per frame, item classifier features, {len(reference)} held-out clips (test items, seed 1)",
             "classifier": scorer.info}
    written = write_results(result, reference[:64], out, extra=extra)
    gif = prompt_gif(result["samples"], prompts, held_out, Path(out) / "prompts_by_method.gif")
    written["paths"].append(str(gif))
    return written


def gif_columns(n: int, columns: int = GIF_COLUMNS) -> list[int]:
    """Indices of up to ``columns`` of the first ``n`` prompts: item k in colour k mod 5 moving in direction k mod 4
    (each column another item), then the first prompts to fill up where ``n`` is too small for those."""
    wanted = [k * 20 + (k % 5) * 4 + k % 4 for k in range(columns)]  # 20 prompts an item, 4 a colour
    cols = [i for i in wanted if i < n]
    cols += [i for i in range(n) if i not in cols][:max(0, min(columns, n) - len(cols))]
    return cols


def prompt_gif(samples: dict, prompts: list[str], held_out, path: Path, fps: float = 4.0, scale: int = 2) -> Path:
    """An animated GIF, one frame a video frame: one row per (method, NFE) (seed 0's samples; held-out clips of
    the same prompts first, where the held-out set has them), one column per prompt (``gif_columns``), each row
    labelled, the prompts above."""
    from PIL import Image, ImageDraw

    cols = gif_columns(len(prompts))
    first = {}
    for i, caption in enumerate(held_out.captions):
        first.setdefault(caption, i)
    rows = [(f"{m}, NFE {n:g}" if isinstance(n, (int, float)) else f"{m}, {n}", x[cols])
            for (m, n), x in samples.items()]
    frames = max(x.shape[2] for _, x in rows)
    blank = torch.full((3, frames, *rows[0][1].shape[-2:]), -1.0)
    shown = [held_out.videos[first[prompts[i]]] if prompts[i] in first else blank for i in cols]
    rows.insert(0, ("held out (test items)", _fit(torch.stack(shown), rows[0][1].shape[-2:])))
    h, w = (s * scale for s in rows[0][1].shape[-2:])
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, top = 2, 14 * 2 + 4
    label = 8 + max(round(draw.textlength(title)) for title, _ in rows)
    width, height = label + len(cols) * (w + pad), top + len(rows) * (h + pad)
    header = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(header)
    for j, i in enumerate(cols):  # the prompt above its column, on two lines: "colour item" / "moving direction"
        words = prompts[i].removeprefix("a ").split(" moving ")
        for k, text in enumerate(words):
            draw.text((label + j * (w + pad), 2 + 14 * k), text if k == 0 else f"-> {text}", fill="black")
    for r, (title, _) in enumerate(rows):
        draw.text((4, top + r * (h + pad) + h // 2 - 6), title, fill="black")
    images = []
    for f in range(frames):
        canvas = header.copy()
        for r, (_, x) in enumerate(rows):
            for j in range(len(cols)):
                frame = x[j, :, min(f, x.shape[2] - 1)]
                pixels = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
                tile = Image.fromarray(pixels.numpy()).resize((w, h), Image.NEAREST)
                canvas.paste(tile, (label + j * (w + pad), top + r * (h + pad)))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   disposal=1, optimize=False)
    return path


def _fit(videos: torch.Tensor, size) -> torch.Tensor:
    """Videos (N, 3, F, h, w) resized (bilinear) to ``size`` per frame where they are not that size already."""
    if tuple(videos.shape[-2:]) == tuple(size):
        return videos
    n, c, f = videos.shape[:3]
    flat = videos.transpose(1, 2).flatten(0, 1)
    flat = torch.nn.functional.interpolate(flat.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return flat.unflatten(0, (n, f)).transpose(1, 2)
