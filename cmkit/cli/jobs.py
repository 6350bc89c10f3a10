"""Recipe -> data + teacher -> objective -> trainer -> saved model: the jobs behind ``cmkit train-teacher``,
``cmkit distill`` and ``cmkit train``. One path for every objective kind: the kind's registration says which job
runs it and whether it needs a teacher; its build function makes the model and the objective."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from ..core.digests import weights_digest
from ..core.files import atomic_write_text, folder_lock
from ..core.memory import TRAINED_BYTES, check_fits, check_parts_fit, lora_params, meta_params, training_bytes
from ..core.processes import rank_world
from ..data import Dataset, StreamedCaptions, open_dataset
from ..data.latent_cache import caption_encoder
from ..eval.metrics import sliced_wasserstein
from ..latent.placement import for_the_cache, for_training, park_prompt_encoders
from ..latent.quantize import PROBE_SIGMAS, check_quantize, quantize_teacher
from ..loading import load_teacher
from ..models import BACKBONES, ConsistencyModel, network_of, num_classes_of
from ..models.folder import annotate_meta, read_meta
from ..objectives import OBJECTIVES, BuildContext, kinds_for
from ..objectives.students import LoRAKeys, lora_spec
from ..sampling import class_condition, search_schedule
from ..training import Trainer
from ..training.checkpoints import warn
from ..training.trainer import OUT_NAMES, make_accelerator
from .recipes import Recipe

RECIPE_FILE = "recipe.json"
# Keys that may change between a run and its resumption (extending a run is the point of resuming; a run that
# diverged goes on from its last good checkpoint with a lower learning rate, a longer warm-up or clipping).
RESUMABLE_CHANGES = {("train", "steps"), ("train", "checkpoint_every"), ("train", "log_every"), ("train", "lr"),
                     ("train", "warmup"), ("train", "grad_clip"), ("train", "export"), ("train", "log_with"),
                     ("train", "validate_every"), ("train", "validation_prompts"),
                     # how the same step is computed: a run may move to a smaller device or another launcher
                     ("train", "micro_batch_size"), ("train", "gradient_checkpointing"), ("train", "mixed_precision"),
                     ("train", "ema_device")}
# changes that alter the training from the resumed step on: reported when a run resumes with them
REPORTED_CHANGES = {("train", "lr"), ("train", "warmup"), ("train", "grad_clip"), ("train", "micro_batch_size"),
                    ("train", "mixed_precision")}
# the recipe keys each model.backbone's size comes from (named when it cannot fit)
SIZE_KEYS = {"mlp": ("hidden", "depth"), "unet": ("base", "levels", "layers_per_block")}
# what each command says it saved
SAVES = {"train-teacher": "teacher", "distill": "consistency model", "train": "consistency model"}


def dataset_for(recipe: Recipe, native_size: int = 0) -> Dataset | StreamedCaptions:
    """The recipe's data: a set held in memory, or captioned shards streamed into the latent cache. ``native_size``:
    the teacher's own image size, which streamed shards given no ``data.image_size`` are cropped to."""
    d = recipe.data
    d.check()
    if native_size and not d.image_size:
        d = dataclasses.replace(d)
        d.native_size = int(native_size)
    return open_dataset(d, recipe.seed)


def native_size(teacher) -> int:
    """A latent teacher's own (square) image size, 0 where it has none or samples non-square."""
    h, w = getattr(teacher, "height", 0), getattr(teacher, "width", 0)
    return int(h) if h and h == w else 0


def fit_teacher_to(data, teacher) -> None:
    """A latent teacher samples at its data's image size, and a video teacher at its clips' frame count (a one-line
    error where its family cannot take it): a Flux or SD3 teacher trained on 512-px crops distils at 512, not at its
    pipeline's default 1024; a Wan teacher on 9-frame clips at 9 frames, not 81."""
    shape = tuple(getattr(data, "sample_shape", ()))
    video = getattr(teacher, "num_frames", None) is not None
    if not hasattr(teacher, "resize") or len(shape) != (4 if video else 3) or shape == tuple(teacher.image_shape):
        return
    frames = {"num_frames": shape[1]} if video else {}
    try:
        teacher.resize(*shape[-2:], **frames)
    except ValueError as e:
        what = f"{shape[1]} frames of " if video else ""
        keys = "data.image_size (or data.height and data.width)" + (" and data.num_frames" if video else "")
        raise ValueError(f"the data's images are {what}{shape[-2]}x{shape[-1]}, which the teacher cannot take ({e}); "
                         f"set {keys} to a size it takes") from None


def build_backbone(recipe: Recipe, data: Dataset, device=None) -> torch.nn.Module:
    """The recipe's fresh network, counted on the meta device first: one too big to train in the memory ``device``
    has, with the copies the run keeps of it (each output EMA, the target network), is refused, naming its size
    keys, before it is allocated."""
    m = recipe.model
    if m.class_conditional and not data.num_classes:
        raise ValueError(f"model.class_conditional needs a labelled dataset; {data.name!r} has no labels")

    def build():
        return BACKBONES[m.backbone](data.sample_shape, data.num_classes if m.class_conditional else None, m)
    keys = [f"model.{k}" for k in SIZE_KEYS.get(m.backbone, ()) if hasattr(m, k)]
    sizes = ", ".join(f"{k}={getattr(m, k[len('model.'):])}" for k in keys)
    params = meta_params(build)
    copies, fix = held_copies(recipe, params, 4, device)
    check_parts_fit(sharded(recipe, [("network", params * TRAINED_BYTES), *copies]),
                    f"the model.backbone {m.backbone!r} network of {sizes} ({params / 1e6:,.1f} M parameters), "
                    "trained in float32 with Adam, and the copies the run keeps of it",
                    f"set a smaller {' / '.join(keys) or 'network'}{fix}", device)
    return build()


# objective keys whose value above 0 keeps a target network, an EMA of the trained one (Trainer.target)
TARGET_KEYS = ("target_mu", "target_ema", "mu0")


def held_copies(recipe: Recipe, params: int, per_param: int, device) -> tuple[list[tuple[str, int]], str]:
    """What a run keeps beside a trained network of ``params`` parameters on ``device`` (``per_param`` bytes each,
    frozen): an output EMA per ``train.ema_rates`` (none there where ``train.ema_device = "cpu"`` holds them in host
    memory) and the target network an objective key sets; ``(label, bytes)`` parts and the fix's extra words."""
    t = recipe.train
    on_host = t.ema_device == "cpu" and torch.device(device or "cpu").type != "cpu"
    n = 0 if on_host else len(t.ema_rates)
    parts = [(f"{n} EMA cop{'y' if n == 1 else 'ies'} (train.ema_rates)", n * params * per_param)]
    key = next((k for k in TARGET_KEYS if (getattr(recipe.objective, k, 0) or 0) > 0), None)
    if key:
        parts.append((f"target network (objective.{key})", params * per_param))
    return parts, ", or fewer train.ema_rates" if n else ""


def sharded(recipe: Recipe, parts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each process's share of what a run trains: under ``train.fsdp`` the trained network, its EMAs, the target and
    a fake score are sharded over the processes (``training.sharding``), so each holds 1 / world of them."""
    world = rank_world()[1] if recipe.train.fsdp else 1
    if world == 1:
        return parts
    return [(f"{label} / {world} processes (train.fsdp)", -(-size // world)) for label, size in parts]


def check_student_fits(recipe: Recipe, teacher, path, device) -> None:
    """Refuse, before the build allocates it, a student the teacher's size makes too big: a LoRA adapter of
    ``objective.lora_rank`` on the teacher's network (the base is the teacher's, held once), or a copy of the
    network that trains in full; with the copies the run keeps (each output EMA, the target network) and a fake
    score the objective trains (rCM's, a float32 copy of the teacher's network)."""
    if teacher is None:
        return
    net = getattr(teacher, "network", None)  # a latent teacher's UNet or transformer; a pixel one's backbone below
    net = network_of(teacher) if net is None else net
    if not isinstance(net, torch.nn.Module):
        return
    cfg = recipe.objective
    params = sum(p.numel() for p in net.parameters())
    fake = []
    if hasattr(cfg, "fake_lr_scale"):  # the kinds that train a fake score (rCM) have its learning-rate scale key
        denoiser = getattr(teacher, "denoiser", net)
        fake = [(f"fake score (objective.kind={cfg.kind!r})",
                 sum(p.numel() for p in denoiser.parameters()) * TRAINED_BYTES)]
    fix_fake = f", or a kind without a fake score (objective.kind {cfg.kind.replace('rcm', 'scd')!r})" if fake else ""
    if isinstance(cfg, LoRAKeys):
        adapter = lora_params(net, lora_spec(cfg, teacher)["targets"], cfg.lora_rank)
        # a LoRA student's copies (EMAs, target) copy the teacher's network it lives in, adapter and all
        copies, fix = held_copies(recipe, params + adapter, 4, device)
        check_parts_fit(sharded(recipe, [("LoRA adapter", adapter * TRAINED_BYTES), *copies, *fake]),
                        f"the LoRA adapter of objective.lora_rank={cfg.lora_rank} on the teacher's network "
                        f"({adapter / 1e6:,.1f} M parameters) and what the run keeps beside it",
                        f"set a smaller objective.lora_rank{fix}{fix_fake}", device)
        return
    copies, fix = held_copies(recipe, params, 4, device)
    check_parts_fit(sharded(recipe, [("student", params * TRAINED_BYTES), *copies, *fake]),
                    f"the student, a copy of the teacher's network ({path}, {params / 1e6:,.1f} M parameters) "
                    "trained in float32 with Adam, and what the run keeps beside it",
                    f"distill a smaller teacher{fix}{fix_fake}, or use a LoRA kind where there is one (objective.kind "
                    "..._lora; it trains an adapter only)", device)


def build_run(recipe: Recipe, data: Dataset, teacher=None, distance=None, resumed: dict | None = None,
              teacher_path: str | None = None, cache_ready=None, device=None):
    """The model a recipe trains and the objective that trains it, from the objective kind's registration.
    ``teacher``: a loaded denoiser; ``distance`` (a callable) replaces the recipe's; ``resumed``: the run constants
    of the run being resumed; ``cache_ready``: called with the teacher once a latent kind's cache is there. A latent
    kind gets the data's latent cache as ``ctx.encode_captions`` (it hands in the encoders, never opens a file).
    A network too big for ``device``'s memory is refused before it is built."""
    encode = caption_encoder(data, recipe.data.encode_batch_size, recipe.data.workers)
    check_student_fits(recipe, teacher, teacher_path, device)
    ctx = BuildContext(make_backbone=lambda: build_backbone(recipe, data, device),
                       train_steps=recipe.train.steps, teacher=teacher, student=recipe.model.student,
                       distance=distance, resumed=resumed or {}, data=data, seed=recipe.seed,
                       teacher_path=teacher_path, encode_captions=encode, cache_ready=cache_ready)
    return OBJECTIVES[recipe.objective.kind].build(recipe.objective, ctx)


def saved_recipe(out: Path) -> dict | None:
    f = out / RECIPE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{f} is not valid JSON; it records the run's recipe: restore it or use another --out") \
            from None


def run_constants(saved: dict | None) -> dict:
    """Values a saved run fixed when it started (a curriculum's length), for its resumption."""
    saved = saved or {}
    if "curriculum_total_steps" in saved:  # how cmkit 0.1's first runs recorded it
        return {"total_steps": saved["curriculum_total_steps"]}
    return saved.get("run_constants", {})


def check_resume(recipe: Recipe, out: Path, saved: dict | None, extra: dict | None = None,
                 constants: dict | None = None, write: bool = True) -> None:
    """Refuse to resume ``out`` (whose recipe is ``saved``, None for a new run) with a recipe that would train
    differently. Keys that only extend or report on a run (RESUMABLE_CHANGES, the ``eval`` section) may change; a key
    the saved recipe does not have yet (added in a later cmkit) is taken to be at its default."""
    current = {**recipe.to_dict(), **(extra or {})}
    current.pop("eval", None)
    if saved is not None:
        check_same_teacher(out, saved, current)
        changed = {(sec, k): (saved[sec][k], v) for sec, body in current.items() if isinstance(body, dict)
                   for k, v in body.items() if k in saved.get(sec, {}) and _jsonish(saved[sec][k]) != _jsonish(v)}
        horizon = run_constants(saved).get("total_steps")
        if horizon is not None and changed.get(("objective", "total_steps"), (0, None))[1] == horizon:
            del changed[("objective", "total_steps")]  # the curriculum length this run already has
        diffs = [f"{sec}.{k}" for sec, k in changed if (sec, k) not in RESUMABLE_CHANGES]
        diffs += [k for k, v in current.items() if not isinstance(v, dict) and k in saved
                  and _jsonish(saved[k]) != _jsonish(v)]
        if "objective.total_steps" in diffs and horizon is not None:
            raise ValueError(f"{out} holds a run whose curriculum length (objective.total_steps) is {horizon}, "
                             "fixed when it started; extend it with --set train.steps=N alone (the curriculum "
                             "stays), or use another --out for a new curriculum")
        if diffs:
            raise ValueError(f"{out} holds a run with a different recipe ({', '.join(diffs[:4])} differ); "
                             "use another --out, or the same recipe to resume")
        for (sec, k), (old, new) in changed.items():
            if (sec, k) in REPORTED_CHANGES and write:
                warn(f"resuming {out} with {sec}.{k} changed from {old} to {new}")
    if write:
        atomic_write_text(out / RECIPE_FILE, json.dumps({**current, "run_constants": constants or {}}, indent=2))


def check_same_teacher(out: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a run whose teacher (same path) now has other weights than when the run started: the
    checkpoints were distilled from the old one (an LCM-LoRA's adapter sits on its base's weights)."""
    old, new = saved.get("teacher_hash"), current.get("teacher_hash")
    if old and new and old != new and saved.get("teacher_path") == current.get("teacher_path"):
        raise ValueError(f"{out} holds a run distilled from {current.get('teacher_path')}, whose weights have changed "
                         f"since it started (teacher_hash {old} in {out / RECIPE_FILE}, now {new}); restore that "
                         "teacher, or use another --out (or --restart) to train on the new one")


def _jsonish(v):
    return json.loads(json.dumps(v))


def check_data_matches(data: Dataset, model, what: str) -> None:
    shape = tuple(getattr(model, "image_shape", None) or model.sample_shape)  # latent models: their images
    if shape != tuple(data.sample_shape):
        raise ValueError(f"data samples have shape {data.sample_shape} but the {what} takes {shape}; use the data "
                         "the teacher was trained on")


def validator(model):
    """``validate(net, prompts) -> images``: the net sampled as its kind samples (``cmkit.sampling.kinds``: its own
    default steps, sampler and guidance; one seed, so grids of different steps compare); a one-line error for models
    that take no prompts."""
    from ..sampling import text_to_image

    if not hasattr(model, "encode_prompt"):
        raise ValueError("train.validate_every draws validation_prompts: it needs a text-to-image model; set it to 0")

    def validate(net, prompts):
        torch.manual_seed(0)
        return text_to_image(net, prompts, generator=torch.Generator().manual_seed(0))
    return validate


def quantize_frozen_teacher(recipe: Recipe, teacher, echo: bool = True) -> None:
    """``teacher.quantize``: the frozen teacher (a LoRA kind's base) quantised in place before the objective adds
    its adapter, its error printed; it keeps answering with its stored weights' digest, so the exported LoRA's base
    is the full-precision folder."""
    mode = check_quantize(recipe.teacher.quantize)
    if not mode:
        return
    if not isinstance(recipe.objective, LoRAKeys):
        raise ValueError(f"teacher.quantize = {mode!r} holds the frozen base of a LoRA student; objective.kind "
                         f"{recipe.objective.kind!r} trains a full copy of the teacher, which would start from the "
                         "quantised weights: use its LoRA kind, or remove teacher.quantize")
    teacher.__dict__.setdefault("source_digest", weights_digest(teacher))
    w = getattr(recipe.objective, "w_max", 1.0)
    report = quantize_teacher(teacher, mode, guidance_scale=float(w))
    if echo:
        print(f"teacher quantised to {mode} (torchao weight-only, {report['layers']} linear layers): one-step "
              f"denoising error {100 * report['relative_error']:.2f}% of the full-precision teacher's output "
              f"(guidance {w:g}, {len(PROBE_SIGMAS)} noise levels)", flush=True)


def _teacher_for(recipe: Recipe, job: str, teacher_path: str | None, teacher):
    """The loaded teacher a kind needs (None for kinds without one) and the path recorded for it."""
    spec = OBJECTIVES[recipe.objective.kind]
    path = teacher_path or recipe.teacher.path
    if spec.teacher == "none":
        if job == "train" and path:
            raise ValueError(f"objective.kind {spec.kind!r} trains without a teacher, but one is given ({path}); "
                             "remove teacher.path / --teacher, or use kind 'ect' to start from it")
        return None, None
    if teacher is None:
        if not path:
            raise ValueError(f"objective.kind {spec.kind!r} needs a teacher: pass --teacher PATH or set teacher.path")
        teacher = load_teacher(path, clip_x0=recipe.teacher.clip_x0,
                               dtype=getattr(torch, recipe.train.weight_dtype))
    # a local folder is recorded whole, so a LoRA student finds its base from any working directory
    return teacher, str(Path(path).resolve()) if Path(str(path)).exists() else str(path)


def check_training_fits(model, batch_size: int, device) -> None:
    """Refuse a batch that cannot fit in memory before anything is written (the kernel's OOM killer says nothing)."""
    if not hasattr(model, "sample_shape"):
        return
    check_fits(training_bytes(model, batch_size), f"train.batch_size={batch_size}",
               "set a smaller train.batch_size", device)


def check_first_step(model, objective, batches, acc: Accelerator, kind: str, out: Path) -> None:
    """Evaluate the objective once on a batch of 2 (no update; torch's generators are left as they were), so a
    recipe whose network and objective disagree (``model.times = 2`` for sCT) or whose settings fail on the first
    step is refused in one line before anything is written to ``out``, and the corrected command can run there."""
    device = acc.device
    model.to(device)
    if isinstance(objective, torch.nn.Module):
        objective.to(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else []
    with torch.random.fork_rng(devices=cuda):
        try:
            x0, cond = batches(2, device)
            with acc.autocast():
                objective(model, x0, target=None, step=0, **cond)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"objective.kind {kind!r} fails on its first training step with this recipe "
                             f"({type(e).__name__}: {first}); nothing was written to {out}: fix the recipe (the "
                             "model.* keys must fit the objective) and run the command again") from None


def check_job(recipe: Recipe, job: str) -> None:
    spec = OBJECTIVES[recipe.objective.kind]
    if spec.job != job:
        raise ValueError(f"`cmkit {job}` runs objective.kind {' / '.join(kinds_for(job))}; the recipe's kind "
                         f"{spec.kind!r} runs with `cmkit {spec.job}`")


def check_out(out: Path, saved: dict | None) -> None:
    """Refuse an ``--out`` that holds what cmkit writes (``model/``, ``checkpoints/``, ...) but no ``recipe.json``:
    those were not written by a cmkit run there, and a run would replace them."""
    if saved is not None or (out / RECIPE_FILE).exists():
        return
    found = [name for name in OUT_NAMES if (out / name).exists()]
    if found:
        raise ValueError(f"--out {out} already holds {', '.join(found)} but no {RECIPE_FILE}: not a cmkit run "
                         "folder, and a run would replace them; use a new or empty --out")


def set_aside(out: Path) -> Path | None:
    """``--restart``: move the previous run's checkpoints, model, log and recipe into ``out/before-restart-TIME/``
    (nothing is deleted)."""
    old = [out / name for name in OUT_NAMES if (out / name).exists()]
    if not old:
        return None
    aside = out / time.strftime("before-restart-%Y%m%d-%H%M%S")
    aside.mkdir()
    for p in old:
        os.replace(p, aside / p.name)
    warn(f"--restart: the previous run in {out} is moved to {aside}; training starts from step 0")
    return aside


def run_job(job: str, recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True, *,
            teacher=None, data: Dataset | None = None, distance=None, restart: bool = False) -> dict:
    """Run a recipe as ``job`` ("train-teacher", "distill" or "train") into ``out``; ``out/model`` is the result.
    ``teacher``, ``data`` and ``distance`` replace what the recipe names (dry runs use them). The recipe is checked
    in full (its objective built, its settings checked) before anything is written to ``out``; ``out`` is locked
    for the run. ``restart``: set the run in ``out`` aside and start from step 0."""
    check_job(recipe, job)
    recipe.train.check()
    recipe.eval.check()
    check_quantize(recipe.teacher.quantize)
    out = Path(out)
    # the processes meet first, before each loads data and a teacher at its own pace (the meeting is bounded in time)
    acc = make_accelerator(recipe.train, out)
    if data is None and recipe.data.image_size:
        data = dataset_for(recipe)
    teacher, path = _teacher_for(recipe, job, teacher_path, teacher)
    if data is None:  # data sized by the teacher's own size where the recipe gives none (streamed shards)
        data = dataset_for(recipe, native_size(teacher))
    extra = {"teacher_path": path} if path else {}
    if teacher is not None:
        fit_teacher_to(data, teacher)
        check_data_matches(data, teacher, "teacher")
        extra["teacher_hash"] = weights_digest(teacher)  # a resumed run is refused if the teacher changed since
        quantize_frozen_teacher(recipe, teacher, acc.is_main_process)
        # a latent teacher's encoders go on for its cache, then off again as its network comes on (latent.placement)
        for_the_cache(teacher.requires_grad_(False).eval(), acc.device)
    torch.manual_seed(recipe.seed)
    saved = None if restart else saved_recipe(out)
    model, objective = build_run(recipe, data, teacher, distance, run_constants(saved), path,
                                 cache_ready=lambda t: for_training(t, acc.device), device=acc.device)
    if teacher is not None:
        for_training(teacher, acc.device)  # (done already where the kind built a latent cache)
    del teacher  # what the objective needs it holds itself; a tuned student copied what it needs
    park_prompt_encoders(model, objective, acc.device)  # their prompts are in the latent cache now
    check_training_fits(model, recipe.train.batch_size, acc.device)
    constants = getattr(objective, "run_constants", {})
    if not restart:
        check_out(out, saved)
        check_resume(recipe, out, saved, extra, constants, write=False)
    batches = getattr(objective, "batches", None) or data.batches(conditional=num_classes_of(model) is not None,
                                                                  hflip=recipe.data.hflip)
    check_first_step(model, objective, batches, acc, recipe.objective.kind, out)
    with folder_lock(out) if acc.is_main_process else nullcontext():
        if restart and acc.is_main_process:
            set_aside(out)
        acc.wait_for_everyone()
        trainer = Trainer(model, objective, batches, recipe.train, out, seed=recipe.seed, progress=progress,
                          run_info={"job": job if job != "train" else f"train-{recipe.objective.kind}", **extra},
                          accelerator=acc, validate=validator(model) if recipe.train.validate_every else None)
        check_resume(recipe, out, saved, extra, constants, write=acc.is_main_process)
        summary = trainer.run()
        if job != "train-teacher" and acc.is_main_process and hasattr(model, "sigmas_for_steps"):
            summary["schedule"] = tune_schedule(recipe, out / "model", data, progress, acc.device)
        acc.wait_for_everyone()
    return summary


def train_teacher(recipe: Recipe, out, progress: bool = True, **kw) -> dict:
    """EDM / DDPM teacher training; ``out/model`` is a teacher folder for ``cmkit.load_teacher``."""
    return run_job("train-teacher", recipe, out, None, progress, **kw)


def distill(recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True, **kw) -> dict:
    """Distillation of a teacher (cd); ``out/model`` is a ConsistencyModel folder."""
    return run_job("distill", recipe, out, teacher_path, progress, **kw)


def train_consistency(recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True, **kw) -> dict:
    """Consistency training (ct, ict: no teacher) or tuning from a teacher (ect); ``out/model`` is a
    ConsistencyModel folder."""
    return run_job("train", recipe, out, teacher_path, progress, **kw)


def _sliced_w2(samples, reference, seed: int) -> float:
    return sliced_wasserstein(samples, reference, n_projections=128, seed=seed)


def tune_schedule(recipe: Recipe, model_dir: Path, data: Dataset, progress: bool = True, device=None) -> dict | None:
    """Search the few-step sigmas of a freshly trained model against training samples and store them in its
    folder (``cmkit.json``); the search's scores go to ``schedule_search.json`` beside it."""
    ev = recipe.eval
    if ev.schedule_max_steps < 2:
        return None
    cm = ConsistencyModel.from_pretrained(model_dir).to(device or "cpu")
    found = search_schedule(cm, data.train, _sliced_w2, max_steps=ev.schedule_max_steps,
                            candidates=ev.schedule_candidates, num=ev.schedule_num_samples, progress=progress,
                            **class_condition(cm, ev.schedule_num_samples))
    kept = read_meta(model_dir) or {}
    cm.cpu().save_pretrained(model_dir)
    if "exported_weights" in kept:
        annotate_meta(model_dir, exported_weights=kept["exported_weights"])
    atomic_write_text(model_dir.parent / "schedule_search.json", json.dumps(found, indent=2))
    return found
