"""Recipe -> data + teacher -> objective -> trainer -> saved model: the jobs behind ``cmkit train-teacher`` and
``cmkit distill``.

Layer 6.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .consistency import ConsistencyModel, DenoiserConsistencyModel
from .data import Dataset, load_dataset
from .denoisers import DiffusersDenoiser, EDMDenoiser, load_teacher
from .nets import TimeMLP, num_classes_of, small_unet
from .objectives import ConsistencyDistillation, ConsistencyTraining, DDPMLoss, EasyConsistencyTuning, EDMLoss
from .recipes import Recipe
from .sampling import class_condition
from .schedules import search_schedule
from .training import train

RECIPE_FILE = "recipe.json"
# Keys that may change between a run and its resumption (extending a run is the point of resuming).
RESUMABLE_CHANGES = {("train", "steps"), ("train", "checkpoint_every"), ("train", "log_every")}


def dataset_for(recipe: Recipe) -> Dataset:
    d = recipe.data
    return load_dataset(d.name, d.path or None, d.image_size, d.channels)


def build_backbone(recipe: Recipe, data: Dataset) -> torch.nn.Module:
    m = recipe.model
    num_classes = data.num_classes if m.class_conditional else None
    if m.class_conditional and not data.num_classes:
        raise ValueError(f"model.class_conditional needs a labelled dataset; {data.name!r} has no labels")
    shape = data.sample_shape
    if m.backbone == "mlp":
        if len(shape) != 1:
            raise ValueError(f"model.backbone 'mlp' needs vector data, got samples of shape {shape}; use 'unet'")
        return TimeMLP(dim=shape[0], hidden=m.hidden, depth=m.depth, time_embed_dim=m.time_embed_dim,
                       num_classes=num_classes, dropout=m.dropout)
    if m.backbone == "unet":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"model.backbone 'unet' needs square images (C, H, H), got samples of shape {shape}")
        return small_unet(shape[1], shape[0], m.base, m.levels, m.layers_per_block, m.attention, num_classes,
                          m.dropout)
    raise ValueError(f"unknown model.backbone {m.backbone!r}; choose 'mlp' (vectors) or 'unet' (images)")


def build_teacher_model(recipe: Recipe, data: Dataset):
    """The network a teacher recipe trains and the objective that trains it."""
    o = recipe.objective
    backbone = build_backbone(recipe, data)
    if o.kind == "edm":
        return EDMDenoiser(backbone, o.sigma_data, o.sigma_min, o.sigma_max), EDMLoss(o.p_mean, o.p_std, o.sigma_data)
    if o.kind == "ddpm":
        if recipe.model.backbone != "unet":
            raise ValueError("objective.kind 'ddpm' saves a diffusers UNet2DModel teacher; set model.backbone = 'unet'")
        scheduler = DDPMScheduler(num_train_timesteps=o.num_train_timesteps, beta_schedule=o.beta_schedule,
                                  prediction_type=o.prediction_type, clip_sample=False)
        den = DiffusersDenoiser(backbone, scheduler)
        return den, DDPMLoss(den.log_sigmas, o.prediction_type)
    raise ValueError(f"train-teacher runs objective.kind 'edm' or 'ddpm', the recipe says {o.kind!r}")


def check_resume(recipe: Recipe, out: Path, extra: dict | None = None, write: bool = True) -> None:
    """Refuse to resume ``out`` with a recipe that would train differently. Keys that only extend or report on a
    run (RESUMABLE_CHANGES, the ``eval`` section) may change; a key the saved recipe does not have yet (added in a
    later cmkit) is taken to be at its default."""
    current = {**recipe.to_dict(), **(extra or {})}
    current.pop("eval", None)
    saved_file = out / RECIPE_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        diffs = [f"{sec}.{k}" for sec, body in current.items() if isinstance(body, dict)
                 for k, v in body.items() if (sec, k) not in RESUMABLE_CHANGES and k in saved.get(sec, {})
                 and _jsonish(saved[sec][k]) != _jsonish(v)]
        diffs += [k for k, v in current.items() if not isinstance(v, dict) and k in saved
                  and _jsonish(saved[k]) != _jsonish(v)]
        if diffs:
            hint = ("; to extend a ct/ict run set objective.total_steps to its first train.steps"
                    if "curriculum_total_steps" in diffs else "")
            raise ValueError(f"{out} holds a run with a different recipe ({', '.join(diffs[:4])} differ); "
                             f"use another --out, or the same recipe to resume{hint}")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(current, indent=2))


def _jsonish(v):
    return json.loads(json.dumps(v))


def _accelerator(recipe: Recipe) -> Accelerator:
    return Accelerator(cpu=recipe.train.cpu, mixed_precision=recipe.train.mixed_precision)


def train_teacher(recipe: Recipe, out, progress: bool = True, *, data: Dataset | None = None) -> dict:
    """EDM teacher training; ``out/model`` is a teacher folder for ``cmkit.load_teacher``."""
    if recipe.objective.kind not in ("edm", "ddpm"):
        raise ValueError(f"train-teacher runs objective.kind 'edm' or 'ddpm', the recipe says {recipe.objective.kind!r}")
    out = Path(out)
    data = data if data is not None else dataset_for(recipe)
    torch.manual_seed(recipe.seed)
    model, objective = build_teacher_model(recipe, data)
    acc = _accelerator(recipe)
    check_resume(recipe, out, write=acc.is_main_process)
    return train(model, objective, batches_for(recipe, data), recipe.train, out, seed=recipe.seed,
                 run_info={"job": "train-teacher"}, progress=progress, accelerator=acc)


def batches_for(recipe: Recipe, data: Dataset):
    return data.batches(conditional=recipe.model.class_conditional, hflip=recipe.data.hflip)


def check_data_matches(data: Dataset, model, what: str) -> None:
    if tuple(model.sample_shape) != tuple(data.sample_shape):
        raise ValueError(f"data samples have shape {data.sample_shape} but the {what} takes {tuple(model.sample_shape)}; "
                         "use the data the teacher was trained on")


def build_consistency(recipe: Recipe, data: Dataset, teacher=None, distance=None):
    """The consistency model a cd / ct / ict / ect recipe trains, and the objective that trains it. ``teacher`` (a
    loaded denoiser) is what cd distils and ect starts from; ``distance`` (a callable) replaces the recipe's."""
    o = recipe.objective
    if o.kind in ("cd", "ect"):
        sigma_min, sigma_max = max(o.sigma_min, teacher.sigma_min), min(o.sigma_max, teacher.sigma_max)
        # ECT needs a student that starts out as the teacher: an EDM teacher's backbone already is one in the
        # consistency parameterisation, a VP (diffusers DDPM) teacher is wrapped whole. CD's student starts from the
        # teacher's weights either way; model.student chooses whether it keeps the teacher's VP parameterisation.
        if recipe.model.student not in ("edm", "teacher"):
            raise ValueError(f"model.student must be 'edm' or 'teacher', got {recipe.model.student!r}")
        wrap = isinstance(teacher, DiffusersDenoiser) and (o.kind == "ect" or recipe.model.student == "teacher")
        student_cls = DenoiserConsistencyModel if wrap else ConsistencyModel
        model = student_cls.from_teacher(teacher, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=o.sigma_data)
        if o.kind == "ect":
            return model, EasyConsistencyTuning(o.ect_q, o.ect_stage_steps, o.ct_p_mean, o.ct_p_std,
                                                distance or o.distance or "pseudo_huber", sigma_min, sigma_max,
                                                o.huber_c or None)
        return model, ConsistencyDistillation(teacher, n_points=o.n_points, solver=o.solver,
                                              distance=distance or o.distance or "l2",
                                              weighting=o.weighting or "uniform", target_mu=o.target_mu,
                                              sigma_min=sigma_min, sigma_max=sigma_max, huber_c=o.huber_c or None)
    if o.kind not in ("ct", "ict"):
        raise ValueError(f"objective.kind {o.kind!r} is not a consistency objective (cd, ct, ict or ect)")
    model = ConsistencyModel(build_backbone(recipe, data), o.sigma_min, o.sigma_max, o.sigma_data)
    return model, ConsistencyTraining(o.kind, o.total_steps or recipe.train.steps, o.s0 or None, o.s1 or None, o.mu0,
                                      o.mu_variant, o.ct_p_mean, o.ct_p_std,
                                      distance or o.distance or ("l2" if o.kind == "ct" else "pseudo_huber"),
                                      o.weighting or None, o.sigma_min, o.sigma_max, huber_c=o.huber_c or None)


def distill(recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True, *, teacher=None,
            data: Dataset | None = None, distance=None) -> dict:
    """Consistency distillation of a teacher; ``out/model`` is a ConsistencyModel folder.
    ``teacher``, ``data`` and ``distance`` (a callable) replace what the recipe names (used by dry runs)."""
    o = recipe.objective
    if o.kind != "cd":
        raise ValueError(f"distill runs objective.kind = 'cd', the recipe says {o.kind!r}")
    path = teacher_path or recipe.teacher.path
    if teacher is None:
        if not path:
            raise ValueError("no teacher: pass --teacher PATH or set teacher.path in the recipe")
        teacher = load_teacher(path, clip_x0=recipe.teacher.clip_x0 or None)
    out = Path(out)
    data = data if data is not None else dataset_for(recipe)
    check_data_matches(data, teacher, "teacher")
    conditional = num_classes_of(teacher) is not None
    if conditional and data.train_labels is None:
        raise ValueError(f"the teacher is class-conditional but dataset {data.name!r} has no labels")
    acc = _accelerator(recipe)
    check_resume(recipe, out, {"teacher_path": str(path)}, write=acc.is_main_process)
    teacher.requires_grad_(False).eval().to(acc.device)
    torch.manual_seed(recipe.seed)
    student, objective = build_consistency(recipe, data, teacher, distance)
    return _train_then_tune(recipe, student, objective, data, out, acc, conditional,
                            {"job": "distill", "teacher": str(path)}, progress)


def _train_then_tune(recipe: Recipe, model, objective, data: Dataset, out: Path, acc, conditional: bool,
                     run_info: dict, progress: bool) -> dict:
    """What every consistency job ends with: train, then (on the main process) search the few-step schedule."""
    batches = data.batches(conditional=conditional, hflip=recipe.data.hflip)
    summary = train(model, objective, batches, recipe.train, out, seed=recipe.seed, run_info=run_info,
                    progress=progress, accelerator=acc)
    if acc.is_main_process:
        summary["schedule"] = tune_schedule(recipe, out / "model", data, progress, acc.device)
    acc.wait_for_everyone()
    return summary


def train_consistency(recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True, *,
                      data: Dataset | None = None, teacher=None) -> dict:
    """Consistency training (ct, ict: no teacher, the network built from the recipe's model section) or easy
    consistency tuning (ect: the network starts as a copy of the teacher's); ``out/model`` is a ConsistencyModel."""
    o = recipe.objective
    if o.kind not in ("ct", "ict", "ect"):
        raise ValueError(f"train runs objective.kind 'ct', 'ict' or 'ect', the recipe says {o.kind!r}"
                         + ("; use `cmkit distill` for cd" if o.kind == "cd" else ""))
    path = teacher_path or recipe.teacher.path
    if o.kind in ("ct", "ict") and path:
        raise ValueError(f"objective.kind {o.kind!r} trains without a teacher, but one is given ({path}); "
                         "remove teacher.path / --teacher, or use kind 'ect' to start from it")
    if o.kind == "ect" and not path and teacher is None:
        raise ValueError("objective.kind 'ect' starts from a teacher's weights: pass --teacher PATH or set "
                         "teacher.path")
    out = Path(out)
    data = data if data is not None else dataset_for(recipe)
    torch.manual_seed(recipe.seed)
    if o.kind == "ect":
        teacher = load_teacher(path) if teacher is None else teacher
        check_data_matches(data, teacher, "teacher")
    model, objective = build_consistency(recipe, data, teacher)
    del teacher  # ECT copied what it needs; the teacher is not used in training
    acc = _accelerator(recipe)
    # the curriculum's K is fixed when a run starts: extending train.steps later must not rescale N(k) and mu(k)
    curriculum = {"curriculum_total_steps": objective.total} if o.kind in ("ct", "ict") else {}
    check_resume(recipe, out, {**({"teacher_path": str(path)} if path else {}), **curriculum},
                 write=acc.is_main_process)
    return _train_then_tune(recipe, model, objective, data, out, acc, num_classes_of(model) is not None,
                            {"job": f"train-{o.kind}"}, progress)


def dry_run(recipe: Recipe, job: str, teacher_path: str | None = None, echo=print) -> dict:
    """Build everything a recipe names and run one optimiser step on a batch of 2, in a temporary folder.
    What cannot be had offline is replaced by a stand-in, and said so: data that is not on this machine (random
    ``data.channels``-channel images of at most 16x16), a teacher that cannot be loaded (a randomly initialised
    network of the data's shape: a UNet with a DDPM schedule for images), LPIPS backbone weights (a random
    backbone, inputs upsampled to 64 instead of 224)."""
    import dataclasses

    from .losses import LPIPSDistance

    small = dataclasses.replace(recipe.train, steps=1, batch_size=2, checkpoint_every=1, log_every=1, cpu=True,
                                mixed_precision="no")
    recipe = dataclasses.replace(recipe, train=small, eval=dataclasses.replace(recipe.eval, schedule_max_steps=0))
    try:
        data = dataset_for(recipe)
    except FileNotFoundError as e:
        # tiny shapes: the point is to build and step every part, not to pay for full-size images on a CPU
        c, size = recipe.data.channels or 3, min(recipe.data.image_size or 32, 16)
        echo(f"dry run: data not available ({e}); using random {c}x{size}x{size} images")
        g = torch.Generator().manual_seed(0)
        x = torch.rand(8, c, size, size, generator=g) * 2 - 1
        labels = torch.randint(0, 10, (8,), generator=g)
        data = Dataset("stand-in", x[:6], x[6:], labels[:6], labels[6:], 10)
    teacher = None
    if job == "distill" or (job == "train" and recipe.objective.kind == "ect"):
        path = teacher_path or recipe.teacher.path
        try:
            teacher = load_teacher(path)
        except (FileNotFoundError, ValueError) as e:
            echo(f"dry run: teacher not available ({e}); using a randomly initialised stand-in")
            shape = data.sample_shape
            classes = data.num_classes if recipe.model.class_conditional else None
            if len(shape) == 1:
                teacher = EDMDenoiser(TimeMLP(dim=shape[0], num_classes=classes))
            else:
                teacher = DiffusersDenoiser(small_unet(shape[1], shape[0], 32, 2, 1, True, classes),
                                            DDPMScheduler(num_train_timesteps=1000))
    distance = None
    name = recipe.objective.distance
    if job == "distill" and name.startswith("lpips"):
        net = name.split("-", 1)[1] if "-" in name else "vgg"
        try:
            distance = LPIPSDistance(net)
        except FileNotFoundError as e:
            echo(f"dry run: {e}; using a random LPIPS backbone at 64x64")
            distance = LPIPSDistance(net, random_backbone=True, upsample_to=64)
    return _dry_train(recipe, job, teacher, data, teacher_path, distance, echo)


def _dry_train(recipe, job, teacher, data, teacher_path, distance, echo):
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="cmkit-dry-run-") as tmp:
        t0 = time.perf_counter()
        if job == "distill":
            summary = distill(recipe, tmp, teacher_path, progress=False, teacher=teacher, data=data,
                              distance=distance)
        elif job == "train":
            summary = train_consistency(recipe, tmp, teacher_path, progress=False, data=data, teacher=teacher)
        else:
            summary = train_teacher(recipe, tmp, progress=False, data=data)
        loss = json.loads((Path(tmp) / "log.jsonl").read_text().splitlines()[-1])["loss"]
    echo(f"dry run OK: one step of {job} on data {tuple(data.sample_shape)}, loss {loss:.4g}, "
         f"{time.perf_counter() - t0:.1f} s including set-up")
    return {**summary, "loss": loss}


def tune_schedule(recipe: Recipe, model_dir: Path, data: Dataset, progress: bool = True, device=None) -> dict | None:
    """Search the few-step sigmas of a freshly trained model against training samples and store them in its
    folder (``cmkit.json``); the search's scores go to ``schedule_search.json`` beside it."""
    ev = recipe.eval
    if ev.schedule_max_steps < 2:
        return None
    cm = ConsistencyModel.from_pretrained(model_dir).to(device or "cpu")
    found = search_schedule(cm, data.train, max_steps=ev.schedule_max_steps, candidates=ev.schedule_candidates,
                            num=ev.schedule_num_samples, progress=progress, **class_condition(cm, ev.schedule_num_samples))
    cm.cpu().save_pretrained(model_dir)
    (model_dir.parent / "schedule_search.json").write_text(json.dumps(found, indent=2))
    return found
