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

from .consistency import ConsistencyModel
from .data import Dataset, load_dataset
from .denoisers import DiffusersDenoiser, EDMDenoiser, load_teacher
from .nets import TimeMLP, small_unet
from .objectives import ConsistencyDistillation, DDPMLoss, EDMLoss
from .recipes import Recipe
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


def check_resume(recipe: Recipe, out: Path, extra: dict | None = None) -> None:
    """Refuse to resume ``out`` with a different recipe (other than the keys in RESUMABLE_CHANGES)."""
    current = {**recipe.to_dict(), **(extra or {})}
    saved_file = out / RECIPE_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        diffs = [f"{sec}.{k}" for sec, body in current.items() if isinstance(body, dict)
                 for k, v in body.items() if (sec, k) not in RESUMABLE_CHANGES
                 and _jsonish(saved.get(sec, {}).get(k)) != _jsonish(v)]
        diffs += [k for k, v in current.items() if not isinstance(v, dict) and _jsonish(saved.get(k)) != _jsonish(v)]
        if diffs:
            raise ValueError(f"{out} holds a run with a different recipe ({', '.join(diffs[:4])} differ); "
                             "use another --out, or the same recipe to resume")
    out.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(json.dumps(current, indent=2))


def _jsonish(v):
    return json.loads(json.dumps(v))


def _accelerator(recipe: Recipe) -> Accelerator:
    return Accelerator(cpu=recipe.train.cpu, mixed_precision=recipe.train.mixed_precision)


def train_teacher(recipe: Recipe, out, progress: bool = True) -> dict:
    """EDM teacher training; ``out/model`` is a teacher folder for ``cmkit.load_teacher``."""
    if recipe.objective.kind not in ("edm", "ddpm"):
        raise ValueError(f"train-teacher runs objective.kind 'edm' or 'ddpm', the recipe says {recipe.objective.kind!r}")
    out = Path(out)
    data = dataset_for(recipe)
    torch.manual_seed(recipe.seed)
    model, objective = build_teacher_model(recipe, data)
    acc = _accelerator(recipe)
    if acc.is_main_process:
        check_resume(recipe, out)
    return train(model, objective, batches_for(recipe, data), recipe.train, out, seed=recipe.seed,
                 run_info={"job": "train-teacher"}, progress=progress, accelerator=acc)


def batches_for(recipe: Recipe, data: Dataset):
    return data.batches(conditional=recipe.model.class_conditional, hflip=recipe.data.hflip)


def check_data_matches(data: Dataset, model, what: str) -> None:
    if tuple(model.sample_shape) != tuple(data.sample_shape):
        raise ValueError(f"data samples have shape {data.sample_shape} but the {what} takes {tuple(model.sample_shape)}; "
                         "use the data the teacher was trained on")


def distill(recipe: Recipe, out, teacher_path: str | None = None, progress: bool = True) -> dict:
    """Consistency distillation of a teacher; ``out/model`` is a ConsistencyModel folder."""
    o = recipe.objective
    if o.kind != "cd":
        raise ValueError(f"distill runs objective.kind = 'cd', the recipe says {o.kind!r}")
    path = teacher_path or recipe.teacher.path
    if not path:
        raise ValueError("no teacher: pass --teacher PATH or set teacher.path in the recipe")
    out = Path(out)
    teacher = load_teacher(path, clip_x0=recipe.teacher.clip_x0 or None)
    data = dataset_for(recipe)
    check_data_matches(data, teacher, "teacher")
    acc = _accelerator(recipe)
    if acc.is_main_process:
        check_resume(recipe, out, {"teacher_path": str(path)})
    teacher.requires_grad_(False).eval().to(acc.device)
    torch.manual_seed(recipe.seed)
    sigma_min = max(o.sigma_min, teacher.sigma_min)
    sigma_max = min(o.sigma_max, teacher.sigma_max)
    student = ConsistencyModel.from_teacher(teacher, sigma_min=sigma_min, sigma_max=sigma_max,
                                            sigma_data=o.sigma_data)
    objective = ConsistencyDistillation(teacher, n_points=o.n_points, solver=o.solver, distance=o.distance,
                                        weighting=o.weighting, target_mu=o.target_mu, sigma_min=sigma_min,
                                        sigma_max=sigma_max, huber_c=o.huber_c or None)
    summary = train(student, objective, batches_for(recipe, data), recipe.train, out, seed=recipe.seed,
                    run_info={"job": "distill", "teacher": str(path)}, progress=progress, accelerator=acc)
    if acc.is_main_process:
        summary["schedule"] = tune_schedule(recipe, out / "model", data, progress)
    acc.wait_for_everyone()
    return summary


def tune_schedule(recipe: Recipe, model_dir: Path, data: Dataset, progress: bool = True) -> dict | None:
    """Search the few-step sigmas of a freshly trained model against training samples and store them in its
    folder (``cmkit.json``); the search's scores go to ``schedule_search.json`` beside it."""
    ev = recipe.eval
    if ev.schedule_max_steps < 2:
        return None
    cm = ConsistencyModel.from_pretrained(model_dir)
    found = search_schedule(cm, data.train, max_steps=ev.schedule_max_steps, candidates=ev.schedule_candidates,
                            progress=progress)
    cm.save_pretrained(model_dir)
    (model_dir.parent / "schedule_search.json").write_text(json.dumps(found, indent=2))
    return found
