"""``--dry-run``: build everything a recipe names and run one optimiser step on a batch of 2, in a temporary folder,
with stand-ins (said so) for what cannot be had offline."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..core.assets import resolve
from ..data import Dataset
from ..loading import load_teacher
from ..models import DiffusersDenoiser, EDMDenoiser, TimeMLP, small_unet
from ..objectives import OBJECTIVES, LPIPSDistance
from .jobs import check_job, dataset_for, run_job
from .recipes import Recipe


def dry_run(recipe: Recipe, job: str, teacher_path: str | None = None, echo=print) -> dict:
    """Stand-ins: data that is not on this machine (random ``data.channels``-channel images of at most 16x16), a
    teacher that cannot be loaded (a randomly initialised network of the data's shape: a UNet with a DDPM schedule
    for images), LPIPS backbone weights (a random backbone, inputs upsampled to 64 instead of 224)."""
    check_job(recipe, job)
    small = dataclasses.replace(recipe.train, steps=1, batch_size=2, checkpoint_every=1, log_every=1, cpu=True,
                                mixed_precision="no", micro_batch_size=min(recipe.train.micro_batch_size, 1))
    recipe = dataclasses.replace(recipe, train=small, eval=dataclasses.replace(recipe.eval, schedule_max_steps=0))
    data = _subset(_data(recipe, echo))
    teacher = _teacher(recipe, data, teacher_path, echo) if OBJECTIVES[recipe.objective.kind].teacher != "none" \
        else None
    shape = tuple(getattr(teacher, "image_shape", None) or data.sample_shape)
    if data.name == STAND_IN and shape != tuple(data.sample_shape):  # stand-ins of the loaded teacher's size
        data = _stand_in(shape)
    distance = _distance(recipe, echo)
    with tempfile.TemporaryDirectory(prefix="cmkit-dry-run-") as tmp:
        recipe = _stand_in_vae(recipe, data, Path(tmp), echo)
        t0 = time.perf_counter()
        summary = run_job(job, recipe, tmp, teacher_path, progress=False, teacher=teacher, data=data,
                          distance=distance)
        loss = json.loads((Path(tmp) / "log.jsonl").read_text().splitlines()[-1])["loss"]
    if loss is None:
        raise FloatingPointError(f"dry run: the one step of {recipe.objective.kind} had a non-finite loss or "
                                 "gradients; check the data and train.lr")
    echo(f"dry run OK: one step of {job} ({recipe.objective.kind}) on data {tuple(data.sample_shape)}, loss "
         f"{loss:.4g}, {time.perf_counter() - t0:.1f} s including set-up")
    return {**summary, "loss": loss}


DRY_RUN_IMAGES = 64  # a dry run steps once: a slice of the data is enough, and encodes in a moment


def _subset(data: Dataset) -> Dataset:
    n = DRY_RUN_IMAGES
    caps = data.train_captions[:n] if data.train_captions is not None else None
    labels = data.train_labels[:n] if data.train_labels is not None else None
    return dataclasses.replace(data, train=data.train[:n], train_labels=labels, train_captions=caps)


def _stand_in_vae(recipe: Recipe, data: Dataset, tmp: Path, echo) -> Recipe:
    """A text-to-image teacher's UNet stage names the VAE folder its first stage writes; without it, a random
    small VAE of the data's size stands in."""
    vae = getattr(recipe.objective, "vae", None)
    if vae is None or (Path(resolve(vae)) / "config.json").is_file():  # a folder, or a shipped one ("cmkit:...")
        return recipe
    from ..latent.autoencoder import small_vae

    echo(f"dry run: objective.vae {vae!r} not trained yet; using a random stand-in VAE")
    small_vae(data.sample_shape[-1], (16, 16, 16), norm_num_groups=8).save_pretrained(tmp / "vae")
    return dataclasses.replace(recipe, objective=dataclasses.replace(recipe.objective, vae=str(tmp / "vae")))


def _data(recipe: Recipe, echo) -> Dataset:
    try:
        return dataset_for(recipe)
    except FileNotFoundError as e:
        # tiny shapes: the point is to build and step every part, not to pay for full-size images on a CPU
        c, size = recipe.data.channels or 3, min(recipe.data.image_size or 32, 16)
        frames = (STAND_IN_FRAMES,) if recipe.data.num_frames else ()
        shape = (c, *frames, size, size)
        what = f"{STAND_IN_FRAMES}-frame clips" if frames else "images"
        echo(f"dry run: data not available ({e}); using random {c}x{size}x{size} {what}")
        return _stand_in(shape)


STAND_IN = "stand-in"
STAND_IN_FRAMES = 9  # a video recipe's stand-in clips: the tiny Wan stand-in's frame count (1 + 2 x its factor 4)


def _stand_in(shape: tuple[int, ...]) -> Dataset:
    """Eight random samples of ``shape`` (C, H, W) or (C, F, H, W) in [-1, 1], with labels and captions."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, *shape, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=g)
    captions = [f"a stand-in image of class {int(v)}" for v in labels]  # for text-to-image kinds
    return Dataset(STAND_IN, x[:6], x[6:], labels[:6], labels[6:], 10, captions[:6], captions[6:])


def _teacher(recipe: Recipe, data: Dataset, teacher_path: str | None, echo):
    try:
        return load_teacher(teacher_path or recipe.teacher.path)
    except (FileNotFoundError, ValueError) as e:
        echo(f"dry run: teacher not available ({e}); using a randomly initialised stand-in")
    shape = data.sample_shape
    layout = getattr(recipe.objective, "teacher_layout", None)  # an LCM kind: "sd", "sdxl" or "any"
    pipeline = getattr(recipe.objective, "teacher_pipeline", None) or layout
    if pipeline is not None:  # a text-to-image kind: the tiny random stand-in of the recipe's pipeline class
        from ..latent.families import tiny_of_class

        return tiny_of_class(pipeline, texts=data.train_captions, image_size=shape[-1],
                             student="lcm" if layout is not None else "")
    classes = data.num_classes if recipe.model.class_conditional else None
    if len(shape) == 1:
        return EDMDenoiser(TimeMLP(dim=shape[0], num_classes=classes))
    return DiffusersDenoiser(small_unet(shape[1], shape[0], 32, 2, 1, True, classes),
                             DDPMScheduler(num_train_timesteps=1000))


def _distance(recipe: Recipe, echo):
    name = getattr(recipe.objective, "distance", "")
    if not name.startswith("lpips"):
        return None
    net = name.split("-", 1)[1] if "-" in name else "vgg"
    try:
        return LPIPSDistance(net)
    except FileNotFoundError as e:
        echo(f"dry run: {e}; using a random LPIPS backbone at 64x64")
        return LPIPSDistance(net, random_backbone=True, upsample_to=64)
