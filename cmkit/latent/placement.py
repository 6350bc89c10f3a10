"""Where a latent text-to-image teacher's parts sit while a distillation sets up and trains on an accelerator.

The latent cache needs the VAE and the text encoders; training needs the denoising network and reads every prompt
embedding from the cache. Holding all of them on the device at once was the set-up's peak (SD3.5-medium: 16.0 GB of
weights, Flux.1-dev: 33.9, against 6.3 and 27.0 for their LoRA runs' training), so the run moves them in two turns:
the encoders on for the cache (``for_the_cache``), then the encoders off and the network on (``for_training``),
before a student or a fake score is copied from the network, so that those copies are made on the device. On the
CPU nothing moves."""

from __future__ import annotations

import torch
from torch import nn

from .denoiser import TextToImageModel


def _off_the_cpu(device) -> bool:
    return torch.device(device).type != "cpu"


def for_the_cache(teacher: nn.Module, device) -> None:
    """A latent teacher's VAE and text encoders to ``device`` (its network stays where it was loaded); any other
    teacher whole."""
    if not (isinstance(teacher, TextToImageModel) and _off_the_cpu(device)):
        teacher.to(device)
        return
    teacher.vae.to(device)
    if isinstance(teacher.prompt_encoder, nn.Module):
        teacher.prompt_encoder.to(device)


def for_training(teacher: nn.Module, device) -> None:
    """Once the cache holds the prompts: the text encoders to the CPU, then the network (and the VAE) to
    ``device``, so the two are never on the device together."""
    if not (isinstance(teacher, TextToImageModel) and _off_the_cpu(device)):
        teacher.to(device)
        return
    _park([teacher.prompt_encoder])
    teacher.denoiser.to(device)  # (not teacher.to: that would bring the encoders back)
    teacher.vae.to(device)


def park_prompt_encoders(model, objective, device) -> list[nn.Module]:
    """Move the teacher's text encoders to the CPU when training runs on ``device`` elsewhere, and return them (each
    once): those of a student's ``parts`` and of an objective's ``teacher``, which no ``model.to(device)`` moves back
    (a text-to-image teacher being trained keeps its own: they are its submodules). A distillation reads every prompt
    embedding it trains on from the latent cache, so once that is built the encoders only serve validation prompts
    (encoded on the CPU then) and the export (written from wherever they are): on SD3.5 / Flux that frees the T5
    encoder's ~10 GB of device memory for the whole run."""
    found: dict[int, nn.Module] = {}
    for owner in (getattr(model, "parts", None), getattr(objective, "teacher", None)):
        enc = getattr(owner, "prompt_encoder", None)
        if isinstance(enc, nn.Module):
            found.setdefault(id(enc), enc)
    if _off_the_cpu(device):
        _park(found.values())
    return list(found.values())


def _park(encoders) -> None:
    for enc in encoders:
        if isinstance(enc, nn.Module):
            enc.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
