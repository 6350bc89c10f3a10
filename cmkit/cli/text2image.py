"""``cmkit generate`` (prompts -> images from a text-to-image teacher), ``cmkit bench text-to-image`` and ``cmkit
bench text-to-video``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="images from prompts with a text-to-image teacher (a diffusers SD/SDXL "
                                        "folder, hub id or cmkit:tiny-t2i) or an LCM / LCM-LoRA cmkit wrote; videos "
                                        "(.mp4, .gif, .npy) from a video model (a WanPipeline folder)")
    g.add_argument("model", help="a text-to-image pipeline folder, hub id, cmkit:NAME, or an LCM / LCM-LoRA folder")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--negative-prompt", default=None, help="one negative prompt for every prompt (default \"\")")
    g.add_argument("--num-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    g.add_argument("--steps", type=int, default=None,
                   help="steps (default: the model's own: 25 for a teacher, 4 for an LCM, a student's distilled count)")
    g.add_argument("--solver", default=None, help="ddim, dpmpp_2m, euler, heun, unipc, ... (default ddim; an LCM and a "
                                                  "flow student take none: they sample with their own schedulers)")
    g.add_argument("--guidance", type=guidance_scale, default=None,
                   help="classifier-free guidance scale, 1 or more (1: no guidance; default 4 for a teacher or an LCM, "
                        "1 for a student that folds guidance in: an LCM-LoRA, a flow student)")
    g.add_argument("--seed", type=seed_value, default=0)
    add_size_options(g, frames=True)
    g.add_argument("--fps", type=frame_rate, default=None,
                   help="a video model's .mp4 / .gif frame rate (default 16, Wan's)")
    g.add_argument("--out", default=None,
                   help="an image model: a .png grid or an .npy batch (N, 3, H, W) (default generated.png); a video "
                        "model: an .mp4 or .gif per sample (one sample: OUT itself; more: OUT-stem_0.mp4, _1, ... "
                        "in prompt order) or one .npy batch (N, 3, F, H, W) in [-1, 1] (default generated.mp4)")


def add_export_lora(sub) -> None:
    x = sub.add_parser("export-lora", help="a LoRA student's adapter as one .safetensors file (diffusers or kohya "
                                            "layout, for ComfyUI / AUTOMATIC1111)")
    x.add_argument("model", help="a LoRA student folder cmkit wrote (lcm_lora, flow_cd_lora, latent_scd_lora, ...)")
    x.add_argument("out", help="the .safetensors file to write")
    x.add_argument("--layout", default="diffusers", choices=["diffusers", "kohya"],
                   help="key layout: diffusers' (load_lora_weights) or kohya's (lora_unet_..., SD / SDXL)")


def run_export_lora(args: argparse.Namespace) -> None:
    from ..latent.students import export_lora

    student = _t2i_model(args.model)
    path = export_lora(student, args.out, args.layout)
    print(f"wrote the {args.layout}-layout LoRA of {args.model} to {path}")


def add_bench_t2i(bsub) -> None:
    b = bsub.add_parser("text-to-image", help="a text-to-image teacher's solvers at 1-50 steps on the coloured "
                                              "Fashion-MNIST prompts (item / colour accuracy, Frechet distance)")
    b.add_argument("--teacher", default="cmkit:tiny-t2i", help="teacher folder (default cmkit:tiny-t2i)")
    b.add_argument("--guidance", type=guidance_scale, default=4.0, help="guidance scale, 1 or more (default 4)")
    b.add_argument("--num", type=int, default=1000, help="samples per setting and seed (default 1000)")
    b.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    b.add_argument("--steps", default="1,2,4,8,16,25,50", help="comma-separated step counts")
    b.add_argument("--solvers", default="ddim,dpmpp_2m,euler",
                   help="comma-separated solvers (ddim, dpmpp_2m, euler, heun, unipc, ...)")
    b.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                   help="a distilled LCM or LCM-LoRA folder to score at --model-steps (repeatable)")
    b.add_argument("--model-steps", default="1,2,4,8", help="comma-separated steps for --model rows")
    b.add_argument("--out", default="benchmarks/results/text-to-image", help="output folder")
    b.add_argument("--no-progress", action="store_true")
    add_size_options(b)


def add_bench_t2v(bsub) -> None:
    b = bsub.add_parser("text-to-video", help="a text-to-video teacher's (WanPipeline folder) solvers at 1-50 steps "
                                              "and its pipeline's own row on the moving Fashion-MNIST prompts (item / "
                                              "colour / direction accuracy, Frechet distance), students beside them")
    b.add_argument("--teacher", required=True, help="teacher folder: a WanPipeline folder or cmkit:NAME")
    b.add_argument("--guidance", "--guidance-scale", dest="guidance", type=guidance_scale, default=5.0,
                   help="guidance scale, 1 or more (default 5, WanPipeline's)")
    b.add_argument("--num", "--num-samples", dest="num", type=int, default=640,
                   help="videos per setting and seed (default 640: each of the 160 prompts 4 times)")
    b.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    b.add_argument("--steps", default="1,2,4,8,16,25,50", help="comma-separated step counts")
    b.add_argument("--solvers", default="euler,unipc,dpmpp_2m",
                   help="comma-separated solvers (euler, unipc, dpmpp_2m, heun, ...)")
    b.add_argument("--pipeline-steps", type=int, default=50,
                   help="steps of the pipeline's own row (its scheduler; default 50, WanPipeline's)")
    b.add_argument("--model", "--models", dest="model", action="append", default=[], metavar="NAME=FOLDER",
                   help="a distilled video model folder cmkit wrote to score at --model-steps (repeatable)")
    b.add_argument("--model-steps", default="1,2,4,8", help="comma-separated steps for --model rows")
    b.add_argument("--out", default="benchmarks/results/text-to-video", help="output folder")
    b.add_argument("--no-progress", action="store_true")
    add_size_options(b, frames=True)


def add_size_options(parser, frames: bool = False) -> None:
    """``--height`` / ``--width`` / ``--max-sequence-length`` (``frames``: ``--num-frames`` too), as the pipelines
    take them."""
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    if frames:
        parser.add_argument("--num-frames", type=int, default=None,
                            help="a video model's frames (Wan: 1 + a multiple of 4; default: the model's, 81)")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="prompt tokens for a T5 / LLM text encoder (SD3, Flux, ...; default: the pipeline's)")


def sized(args, *models):
    """A context in which every model samples at the command's ``--height`` / ``--width`` /
    ``--max-sequence-length`` (one-line errors for what a family cannot take)."""
    from contextlib import ExitStack

    from ..sampling.kinds import sized as sized_model

    stack = ExitStack()
    try:
        for m in models:
            stack.enter_context(sized_model(m, args.height, args.width, args.max_sequence_length,
                                            getattr(args, "num_frames", None)))
    except BaseException:  # a size one model cannot take leaves none resized
        stack.close()
        raise
    return stack


def guidance_scale(text: str) -> float:
    """A ``--guidance`` value: a finite number in [1, 100] (``core.checks.check_guidance``). Classifier-free guidance
    mixes ``eps_u + w (eps_c - eps_u)`` only for ``w > 1`` (diffusers' convention, which the teachers follow), so a
    value below 1 would silently sample at 1, and NaN, inf or 1e308 gives NaN latents (a black image)."""
    from ..core.checks import check_guidance

    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a number, got {text!r}") from None
    try:
        return check_guidance(w, "the guidance scale")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def frame_rate(text: str) -> float:
    """An ``--fps``: a number in (0, 1000]."""
    from ..data.videofiles import check_fps

    try:
        return check_fps(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "fps" in str(e) else f"wants a number, got {text!r}") from None


def seed_value(text: str) -> int:
    """A ``--seed``: an integer torch's generators take, 0 to 2**63 - 1."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an integer, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {text}")
    return seed


def named_folders(items: list[str]) -> dict[str, str]:
    """``--model NAME=FOLDER`` values as ``{name: folder}``. A name becomes part of file names under ``--out``
    (finished rows are kept as ``OUT/partial/NAME-NFE.json``), so one that could reach outside it is refused."""
    folders = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--model wants NAME=FOLDER, got {item!r}")
        bad = [c for c in name if c in '/\\\0' or not c.isprintable()]
        if bad or name.strip(". ") == "":
            raise ValueError(f"--model {item!r}: the name {name!r} becomes a file name under --out, so it may not "
                             "hold '/', '\\', control characters or be only dots; name it e.g. LCM-4step")
        if name in folders:
            raise ValueError(f"--model {name!r} is given twice; give each model its own name")
        folders[name] = folder
    return folders


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} wants comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what} is empty")
    if len(set(vals)) != len(vals):  # a repeated seed would be counted as another seed
        twice = sorted({v for v in vals if vals.count(v) > 1})
        raise ValueError(f"{what} lists {twice} more than once; give each once")
    return vals


def _t2i_model(path: str):
    """The text-to-image model at ``path``: a model cmkit wrote (``cmkit.json`` of a kind with a sampling policy:
    an LCM, a flow student, ...) or a teacher pipeline folder, hub id or ``cmkit:NAME``."""
    from ..core.assets import resolve
    from ..loading import load_model, load_teacher
    from ..models.folder import read_meta
    from ..sampling.kinds import POLICIES, policy_of

    folder = resolve(path)
    kind = (read_meta(folder) or {}).get("kind") if Path(folder).is_dir() else None
    model = load_model(path) if kind in POLICIES else load_teacher(path)
    try:
        policy_of(model)
    except ValueError:
        raise ValueError(f"{path} is not a text-to-image teacher or student (no text encoder); use `cmkit sample` or "
                         "`cmkit bench quality-vs-steps` for it") from None
    return model


IMAGE_OUTPUTS, VIDEO_OUTPUTS = (".png", ".npy"), (".mp4", ".gif", ".npy")


def run_generate(args: argparse.Namespace) -> None:
    """Images (a .png grid or an .npy batch) or, from a video model (one with ``num_frames``: a WanPipeline folder
    or a student of one), videos: an .mp4 / .gif per sample (``videofiles.video_paths``) or one .npy batch
    ``(N, 3, F, H, W)``."""
    import torch

    from ..core.checks import finite_tensors
    from ..data.imagefiles import save_images
    from ..sampling.kinds import text_to_image

    out = Path(args.out) if args.out is not None else None
    if out is not None and out.suffix not in (*IMAGE_OUTPUTS, *VIDEO_OUTPUTS):
        raise ValueError(f"--out must end in .png or .npy (images), or .mp4, .gif or .npy (videos), got {out.name!r}")
    if args.num_per_prompt < 1 or args.steps is not None and args.steps < 1:
        raise ValueError("--num-per-prompt and --steps must be >= 1")
    model = _t2i_model(args.model)
    video = getattr(model, "num_frames", None) is not None
    what = ("video" if video else "image") + "s" * (len(args.prompt) * args.num_per_prompt != 1)
    if not video:
        if getattr(args, "num_frames", None) is not None:
            raise ValueError(f"{args.model} makes images, not videos; leave --num-frames out")
        if getattr(args, "fps", None) is not None:
            raise ValueError(f"{args.model} makes images, not videos; leave --fps out")
    out = out or Path("generated.mp4" if video else "generated.png")
    allowed = VIDEO_OUTPUTS if video else IMAGE_OUTPUTS
    if out.suffix not in allowed:
        kind = "videos" if video else "images"
        raise ValueError(f"{args.model} makes {kind}: --out must end in {', '.join(allowed[:-1])} or {allowed[-1]}, "
                         f"got {out.name!r}")
    prompts = [p for p in args.prompt for _ in range(args.num_per_prompt)]
    with sized(args, model):
        _check_memory(model, len(prompts))
        z = text_to_image(model, prompts, steps=args.steps, solver=args.solver, guidance_scale=args.guidance,
                          negative_prompts=args.negative_prompt, generator=torch.Generator().manual_seed(args.seed),
                          output="latent")
    finite_tensors(z, f"{args.model}: the sampled latents", "the network made them (its weights or a value it was "
                   "given overflowed); nothing was written")
    with torch.no_grad():
        x = model.decode(z)
    finite_tensors(x, f"{args.model}: the {'frames' if video else 'images'} the VAE decoder made of finite latents",
                   "its weights overflow; nothing was written")
    x = x.clamp(-1, 1)
    if out.suffix == ".npy" or not video:
        save_images(x, out)
        where = out
    else:
        from ..data.videofiles import DEFAULT_FPS, save_video, video_paths

        paths = video_paths(out, len(x))
        for v, path in zip(x, paths, strict=True):
            save_video(v, path, DEFAULT_FPS if args.fps is None else args.fps)
        where = out if len(paths) == 1 else f"{paths[0]} ... {paths[-1].name}"
    frames = f" of {x.shape[2]} frames" if video else ""
    print(f"wrote {len(prompts)} {what}{frames} ({args.num_per_prompt} per prompt) to {where}")


def _check_memory(model, num: int) -> None:
    """Refuse, before anything is allocated, a batch whose decoded images (a video model's: every frame; its
    ``image_shape`` is ``(3, F, H, W)``), latents and their two guided copies alone exceed the memory there is (a
    lower bound: the networks' activations come on top)."""
    import math

    from ..core.memory import FLOAT_BYTES, check_fits

    image = getattr(model, "image_shape", None) or model.parts.image_shape
    per = math.prod(image) * 2 + math.prod(model.sample_shape) * 6
    what = "videos" if len(image) == 4 else "images"
    check_fits(int(num * per * FLOAT_BYTES), f"generating {num} {what}", "lower --num-per-prompt or give fewer "
               "--prompt" + (" or --num-frames" if len(image) == 4 else ""))


def _student_rows(folders: dict, steps: list[int], guidance: float, prompts, check=None) -> dict:
    """``{name: student_rows(...)}`` of the ``--model`` folders (each a distilled model cmkit wrote, passed to
    ``check(model, what)`` where given), prompted with ``prompts(n)``."""
    from ..eval.t2i_bench import student_rows
    from ..sampling.kinds import POLICIES, TEACHER_KIND

    models = {}
    for name, folder in folders.items():
        student = _t2i_model(folder)
        if getattr(student, "kind", None) == TEACHER_KIND:
            raise ValueError(f"--model {folder}: not a distilled text-to-image model cmkit wrote (no cmkit.json of "
                             f"a kind in {', '.join(k for k in POLICIES.names() if k != TEACHER_KIND)}); a teacher "
                             "goes to --teacher")
        if check is not None:
            check(student, f"--model {folder}")
        models[name] = student_rows(student, steps, guidance, prompts)
    return models


def _bench_models(teacher, models: dict) -> list:
    """The teacher and every distinct student of ``models``' rows, to size together."""
    return [teacher, *{id(r[1]): r[1] for rows in models.values() for r in rows}.values()]


def _solver_names(text: str) -> list[str]:
    from ..solvers import SOLVERS

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SOLVERS]
    if not names or unknown:
        raise ValueError(f"--solvers {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; give "
                         f"comma-separated names of {', '.join(sorted(SOLVERS))}")
    return names


def run_bench_t2i(args: argparse.Namespace) -> None:
    from ..core.assets import resolve
    from ..eval.bench import EvalSettings
    from ..eval.t2i_bench import prompt_list, text_to_image_benchmark

    folders = named_folders(args.model)  # before anything is loaded
    ev = EvalSettings(num_samples=args.num, seeds=_ints(args.seeds, "--seeds"))
    teacher = _t2i_model(args.teacher)
    models = _student_rows(folders, _ints(args.model_steps, "--model-steps"), args.guidance, prompt_list)
    try:
        with sized(args, *_bench_models(teacher, models)):
            written = text_to_image_benchmark(teacher, resolve(args.teacher), ev, args.out,
                                              solvers=[s for s in args.solvers.split(",") if s],
                                              steps=_ints(args.steps, "--steps"), guidance_scale=args.guidance,
                                              models=models, progress=not args.no_progress)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the rows finished so far are kept
        raise KeyboardInterrupt(_kept(args.out)) from None
    print(written["header"] + written["table"])


def _kept(out) -> str:
    return (f"interrupted; the finished rows are kept in {Path(out) / 'partial'}: run the same command again to go "
            "on from them")


def run_bench_t2v(args: argparse.Namespace) -> None:
    """``cmkit bench text-to-video``: ``t2v_bench.text_to_video_benchmark`` at the command's options, each bad one a
    one-line error before a model loads where it can be told without one."""
    from ..core.assets import resolve
    from ..eval.bench import EvalSettings
    from ..eval.t2v_bench import check_video_teacher, text_to_video_benchmark, video_prompt_list

    folders = named_folders(args.model)  # before anything is loaded
    ev = EvalSettings(num_samples=args.num, seeds=_ints(args.seeds, "--seeds"))
    ev.check()
    steps, model_steps = _ints(args.steps, "--steps"), _ints(args.model_steps, "--model-steps")
    if min(steps + model_steps) < 1 or args.pipeline_steps < 1:
        raise ValueError("--steps, --model-steps and --pipeline-steps must be >= 1")
    solvers = _solver_names(args.solvers)
    teacher = _t2i_model(args.teacher)
    check_video_teacher(teacher, args.teacher)
    models = _student_rows(folders, model_steps, args.guidance, video_prompt_list, check_video_teacher)
    try:
        with sized(args, *_bench_models(teacher, models)):
            written = text_to_video_benchmark(teacher, resolve(args.teacher), ev, args.out, solvers=solvers,
                                              steps=steps, guidance_scale=args.guidance, models=models,
                                              pipeline_steps=args.pipeline_steps, progress=not args.no_progress)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the rows finished so far are kept
        raise KeyboardInterrupt(_kept(args.out)) from None
    print(written["header"] + written["table"])
