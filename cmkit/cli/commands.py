"""The ``cmkit`` command. It only parses arguments and calls the library; every failure a user can cause ends in
one line on stderr and a non-zero exit code, never a traceback (set CMKIT_DEBUG=1 to see one)."""

from __future__ import annotations

import argparse
import ast
import functools
import os
import sys
from pathlib import Path

from .. import __version__
from .streams import guarded_output, signals_interrupt
from .text2image import (
    add_bench_t2i,
    add_bench_t2v,
    add_export_lora,
    add_generate,
    named_folders,
    run_bench_t2i,
    run_bench_t2v,
    run_export_lora,
    run_generate,
    seed_value,
)

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
TRAINING_JOBS = ("train-teacher", "distill", "train")


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_recipe_args(p: argparse.ArgumentParser, out_help: str = "output folder (default runs/<recipe name>)"):
    p.add_argument("recipe", help="a TOML recipe file, or the name of a shipped recipe (e.g. quickstart-cd)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_restart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart", action="store_true",
                   help="start from step 0 in an --out that holds a run: its checkpoints/, model/, log.jsonl and "
                        "recipe.json are moved into OUT/before-restart-TIME/ (nothing is deleted); without it a run "
                        "resumes, and refuses to start over when its checkpoints cannot be used")


def _default_out(recipe: str) -> Path:
    return Path("runs") / Path(recipe).stem


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cmkit", description="Consistency models: distil, train, sample, measure.")
    parser.add_argument("--version", action="version", version=f"cmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="teacher -> distil -> sample -> quality-vs-steps table + plot (S-curve)")
    q.add_argument("--out", default="quickstart-out", help="output folder (default quickstart-out)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key in both quickstart recipes, e.g. --set train.steps=500")
    q.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train-teacher", help=f"train a teacher from a recipe ({_kinds('train-teacher')})")
    _add_recipe_args(t)
    t.add_argument("--dry-run", action="store_true", help="build everything and run one step on a batch of 2")
    _add_restart(t)

    d = sub.add_parser("distill", help=f"distil a teacher ({_kinds('distill')})")
    _add_recipe_args(d)
    d.add_argument("--dry-run", action="store_true", help="build everything and run one step on a batch of 2")
    _add_restart(d)
    d.add_argument("--teacher", help="teacher folder or hub id (default: teacher.path of the recipe)")

    tr = sub.add_parser("train", help=f"consistency training, or tuning from a teacher ({_kinds('train')})")
    _add_recipe_args(tr)
    tr.add_argument("--teacher", help="kinds that start from a teacher (ect): its folder, hub id or cmkit:NAME")
    tr.add_argument("--dry-run", action="store_true", help="build everything and run one step on a batch of 2")
    _add_restart(tr)

    s = sub.add_parser("sample", help="draw samples from a consistency model folder")
    s.add_argument("model", help="a consistency model folder (e.g. runs/quickstart-cd/model)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=1, help="number of network evaluations (default 1)")
    g.add_argument("--sigmas", help="comma-separated descending noise levels, e.g. 80,0.8")
    s.add_argument("--num", type=int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--seed", type=seed_value, default=0)
    s.add_argument("--class-label", type=int, help="class for a class-conditional model (default: random classes)")
    s.add_argument("--out", default="samples.npy",
                   help="output file: .npy (any model) or .png (an image grid, image models; default samples.npy)")

    _add_edit(sub)
    _add_bench(sub)
    add_generate(sub)
    add_export_lora(sub)
    return parser


def _add_edit(sub) -> None:
    e = sub.add_parser("edit", help="zero-shot editing with a consistency model (images in [-1, 1])")
    e.add_argument("task", choices=["inpaint", "colorize", "superres", "denoise", "interpolate", "sdedit"])
    e.add_argument("model", help="a consistency model folder")
    e.add_argument("--input", help="input .npy batch (B, C, H, W) in [-1, 1] or a PNG/JPEG image")
    e.add_argument("--mask", help="inpaint: mask file (.npy or image; 1 / white = known pixel)")
    e.add_argument("--mask-kind", default="random-half", help="inpaint without --mask: random-half, left-half, center")
    e.add_argument("--factor", type=int, default=2, help="superres: the upsampling factor (default 2)")
    e.add_argument("--sigma", type=float, default=1.0, help="denoise: the noise level; sdedit: the start level")
    g2 = e.add_mutually_exclusive_group()
    g2.add_argument("--steps", type=int, help="network evaluations (default: the model's editing schedule, "
                    "editing_sigmas in its cmkit.json, else 18 steps of the Karras grid; denoise and "
                    "interpolate take one)")
    g2.add_argument("--sigmas", help="comma-separated descending noise levels")
    e.add_argument("--num", type=int, default=8, help="interpolate: points along the path (default 8)")
    e.add_argument("--reference", help="a reference batch shown beside the result in the figure")
    e.add_argument("--seed", type=seed_value, default=0)
    e.add_argument("--out", default="edited.png", help="output .png grid or .npy batch (default edited.png)")
    e.add_argument("--figure", help="also write input / output / reference side by side to this PNG")



def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bq = bsub.add_parser("quality-vs-steps", help="teacher solvers vs consistency models at every NFE")
    _add_recipe_args(bq, "output folder (default benchmarks/results/<recipe name>)")
    bq.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                    help="a consistency model to score (repeatable), e.g. --model CD=runs/quickstart-cd/model")
    bq.add_argument("--teacher", help="teacher folder (default: teacher.path of the recipe)")
    bq.add_argument("--fid", action="store_true",
                    help="also FID and KID in Inception features (images; needs pip install 'cmkit[fid]' and the "
                         "Inception weights file, see --inception-weights)")
    bq.add_argument("--inception-weights", metavar="PATH",
                    help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch's hub cache)")
    add_bench_t2i(bsub)
    add_bench_t2v(bsub)


def _kinds(job: str) -> str:
    return ", ".join(registered_kinds().get(job, []))


@functools.cache
def registered_kinds() -> dict[str, list[str]]:
    """job -> the objective kinds it runs, for the help text: read from the ``@register_objective(KIND, ...,
    job=JOB)`` lines of ``cmkit/objectives/*.py`` without importing them (which would import torch for ``--help``;
    tests/test_hardening.py checks the result against ``cmkit.objectives.kinds_for``)."""
    kinds: dict[str, list[str]] = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "objectives").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_objective"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            job = next((k.value.value for k in node.keywords if k.arg == "job" and isinstance(k.value, ast.Constant)),
                       None)
            kinds.setdefault(job, []).append(node.args[0].value)
    return {job: sorted(names) for job, names in kinds.items()}


def _parse_sigmas(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--sigmas wants comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    handlers = {"quickstart": run_quickstart, "sample": run_sample, "edit": run_edit, "bench": run_bench,
                "generate": run_generate, "export-lora": run_export_lora,
                **{job: run_training for job in TRAINING_JOBS}}
    handlers[args.command](args)
    return 0


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def run_quickstart(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart as quickstart

    quickstart(args.out, args.set, progress=_progress(args))


def run_training(args: argparse.Namespace) -> None:
    from .jobs import SAVES, run_job
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    teacher = getattr(args, "teacher", None)
    if args.dry_run:
        from .dryrun import dry_run

        dry_run(recipe, args.command, teacher)
        return
    summary = run_job(args.command, recipe, args.out or _default_out(args.recipe), teacher, _progress(args),
                      restart=args.restart)
    print(f"{SAVES[args.command]} saved to {summary['model_dir']}")


def run_sample(args: argparse.Namespace) -> None:
    import torch

    from ..core.checks import finite_tensors
    from ..data.imagefiles import save_images
    from ..models import ConsistencyModel
    from ..sampling import class_condition, sample
    from ..sampling.samplers import check_batch_fits

    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise CliError(f"--out must end in .npy or .png, got {out.name!r}")
    cm = ConsistencyModel.from_pretrained(args.model)
    if out.suffix == ".png" and len(cm.sample_shape) != 3:
        raise CliError("a .png grid needs an image model; write .npy for vector data")
    sigmas = _parse_sigmas(args.sigmas) if args.sigmas else None
    try:  # before anything of --num's size is made (class labels included)
        check_batch_fits(cm, max(args.num, 1), len(sigmas) if sigmas else max(args.steps, 1), "cpu")
    except ValueError as e:
        raise CliError(f"--num {args.num}, --steps {len(sigmas) if sigmas else args.steps}: {e}") from None
    cond = class_condition(cm, args.num, args.class_label, seed=args.seed)
    x = sample(cm, args.num, steps=args.steps, sigmas=sigmas, generator=torch.Generator().manual_seed(args.seed),
               **cond)
    finite_tensors(x, f"{args.model}: the samples", "the network made them (its weights overflow); nothing was "
                   "written")
    save_images(x, out)
    print(f"wrote {args.num} samples of shape {tuple(x.shape[1:])} to {out}")


def run_bench(args: argparse.Namespace) -> None:
    if args.bench == "text-to-image":
        return run_bench_t2i(args)
    if args.bench == "text-to-video":
        return run_bench_t2v(args)
    from ..eval.bench import run_benchmark
    from ..loading import load_teacher
    from ..models import ConsistencyModel
    from .jobs import check_data_matches, dataset_for
    from .recipes import load_recipe

    folders = named_folders(args.model)
    recipe = load_recipe(args.recipe, args.set)
    teacher_path = args.teacher or recipe.teacher.path
    if not teacher_path and not folders:
        raise CliError("nothing to benchmark: pass --teacher PATH (or set teacher.path in the recipe) and/or "
                       "--model NAME=FOLDER")
    models = {name: ConsistencyModel.from_pretrained(folder) for name, folder in folders.items()}
    teacher = load_teacher(teacher_path) if teacher_path else None  # no teacher: the models' rows alone
    data = dataset_for(recipe)
    for name, net in ([("teacher", teacher)] if teacher is not None else []) + list(models.items()):
        check_data_matches(data, net, f"model {name}" if name != "teacher" else "teacher")
    out = args.out or Path("benchmarks/results") / Path(args.recipe).stem
    try:
        written = run_benchmark(teacher, models, data, recipe.eval, out, fid=args.fid,
                                inception_weights=args.inception_weights, progress=_progress(args),
                                extra={"teacher": str(teacher_path or ""), "models": folders})
    except ImportError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; the finished rows are kept in {Path(out) / 'partial'}: run the same "
                                "command again to go on from them") from None
    print(written["header"] + written["table"])


EDIT_INPUT = {"inpaint": "model", "sdedit": "model", "denoise": "noisy", "colorize": "luminance", "superres": "low"}


def _check_edit_input(cm, x, args) -> None:
    """The input batch against what the task needs of this model, naming the file in the error."""
    from ..sampling.editing import check_images

    if args.task == "superres" and args.factor < 1:
        raise CliError(f"--factor must be a positive integer, got {args.factor}")
    kind, shape = EDIT_INPUT[args.task], tuple(cm.sample_shape)
    expect = {"luminance": (1, *shape[1:]), "low": (shape[0], *(n // args.factor for n in shape[1:]))}.get(kind) \
        if len(shape) == 3 else None
    try:
        check_images(cm, x, f"edit {args.task}", expect, pixels=kind != "noisy")
    except ValueError as e:
        raise CliError(f"--input {args.input}: {e}") from None


def _edit(cm, x, args, gen):
    """Run the task; returns (output, input panel or None)."""
    import torch

    from ..data.imagefiles import load_images, named_mask
    from ..sampling import editing

    kw = {"sigmas": _parse_sigmas(args.sigmas) if args.sigmas else None, "steps": args.steps, "generator": gen}
    if args.task == "inpaint":
        mask = (load_images(args.mask, 1, pixels=False) > 0).float() if args.mask \
            else named_mask(args.mask_kind, x.shape, args.seed)
        return editing.inpaint(cm, x, mask, **kw), ("input (masked)", x * mask + (mask - 1))
    if args.task == "colorize":
        return editing.colorize(cm, x, **kw), ("input (luminance)", x)
    if args.task == "superres":
        up = x.repeat_interleave(args.factor, 2).repeat_interleave(args.factor, 3)
        return editing.superres(cm, x, args.factor, **kw), (f"input (1/{args.factor})", up)
    if args.task == "denoise":
        return editing.denoise(cm, x, args.sigma), (f"input (sigma {args.sigma:g})", x)
    if args.task == "sdedit":
        return editing.sdedit(cm, x, args.sigma, sigmas=kw["sigmas"], generator=gen), ("guide", x)
    if args.num < 1:
        raise CliError(f"--num must be >= 1 (points along the path), got {args.num}")
    z = torch.randn((2, *cm.sample_shape), generator=gen)
    return editing.interpolate(cm, z[0], z[1], torch.linspace(0, 1, args.num).tolist()), None


def run_edit(args: argparse.Namespace) -> None:
    import torch

    from ..data.imagefiles import load_images, save_images, side_by_side
    from ..models import ConsistencyModel

    cm = ConsistencyModel.from_pretrained(args.model)
    channels = cm.sample_shape[0] if len(cm.sample_shape) == 3 else None
    if args.task != "interpolate" and not args.input:
        raise CliError(f"edit {args.task} needs --input FILE")
    x = None
    if args.input:
        x = load_images(args.input, 1 if args.task == "colorize" else channels)
        _check_edit_input(cm, x, args)
    out, shown = _edit(cm, x, args, torch.Generator().manual_seed(args.seed))
    panels = [p for p in (shown, ("output", out)) if p is not None]
    if args.reference:
        panels.append(("reference", load_images(args.reference, channels)))
    print(f"wrote {save_images(out, args.out)}")
    if args.figure:
        print(f"wrote {side_by_side(panels, args.figure)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # stdout / stderr that can no longer be written (a closed pipe, a dropped terminal) never stop a command;
    # SIGTERM and SIGHUP end one as Ctrl-C does (a training run installs its own handlers: save, then stop)
    with guarded_output(), signals_interrupt() as stop:
        try:
            return run(args)
        except BaseException as e:  # noqa: BLE001 - sorted into exit codes and one line each by _failed
            stop.ignore()
            return _failed(e)
        finally:
            stop.ignore()


def entry() -> None:
    """``cmkit`` and ``python -m cmkit``: ``main()``, then the process ends at once. By then every file a command
    writes is closed (checkpoints and models atomically renamed into place, trackers ended); what would follow is the
    interpreter's teardown, whose library destructors (torch's, diffusers') fault ~120 MB back into memory, the peak
    of a whole short run (measured: ``import torch`` alone peaks at 632 MB on exit, 507 MB before it)."""
    code = main()
    if "logging" in sys.modules:  # handlers a library opened (files, trackers' loggers) flushed and closed
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def _interrupted(e: BaseException) -> bool:
    """A ``TrainingInterrupted`` (looked up only when the trainer was imported: parsing never imports torch)."""
    stop = sys.modules.get("cmkit.training.stop")
    return stop is not None and isinstance(e, stop.TrainingInterrupted)


def _failed(e: BaseException) -> int:
    if _interrupted(e):
        print(f"cmkit: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, KeyboardInterrupt):
        print(f"cmkit: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not isinstance(e, Exception):  # SystemExit, GeneratorExit: as they were
        raise e
    if os.environ.get("CMKIT_DEBUG"):
        raise e
    if isinstance(e, (CliError, ValueError, OSError, FloatingPointError)):
        print(f"cmkit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    # the last line of defence keeps the promise of one line, no traceback
    print(f"cmkit: internal error: {type(e).__name__}: {_one_line(e)} (set CMKIT_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) or not text:
        text = text or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
