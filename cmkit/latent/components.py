"""Reading a diffusers pipeline folder's parts: ``model_index.json``, which components it names, and each component
through its own library's ``from_pretrained`` (diffusers or transformers only, never remote code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# pipelines with a text encoder that are not text-to-image denoisers of plain latents
UNSUPPORTED = {
    "StableDiffusionInpaintPipeline": "its UNet also takes a mask and masked-image latents",
    "StableDiffusionXLInpaintPipeline": "its UNet also takes a mask and masked-image latents",
    "StableDiffusionInstructPix2PixPipeline": "its UNet also takes image latents",
    "StableDiffusionUpscalePipeline": "its UNet takes a low-resolution image and a noise level",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
}


def read_model_index(path, **load_kw) -> dict:
    local = Path(path) / "model_index.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{local} is not valid JSON") from None
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(path, **load_kw)


def present(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` names a component (diffusers writes ``[null, null]`` for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and all(entry)


def is_text_to_image(index: dict) -> bool:
    return present(index, "text_encoder") or present(index, "text_encoder_2")


def _load_component(path: str, name: str, entry, load_kw: dict):
    import importlib

    library, class_name = entry
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"{path}: component {name} comes from {library!r}; cmkit reads diffusers and transformers "
                         "components only")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ValueError(f"{path}: unknown {library} class {class_name!r} for {name}/")
    kw = dict(load_kw)
    if library == "transformers":  # no code from a folder a user was given runs, and no pickle is read
        kw.setdefault("trust_remote_code", False)
    return cls.from_pretrained(path, subfolder=name, **kw)


def load_parts(path: str, index: dict, names: list[str], load_kw: dict) -> dict:
    """The named components of a pipeline folder (``None`` for one the index lists as absent)."""
    if Path(path).is_dir():
        gone = [n for n in names if present(index, n) and not (Path(path) / n).is_dir()]
        if gone:
            raise ValueError(f"{path}: model_index.json lists {', '.join(gone)} but the folder has no "
                             f"{'/, '.join(gone)}/ (copied in part?); copy the whole pipeline folder")
    return {n: _load_component(path, n, index[n], load_kw) if present(index, n) else None for n in names}


def in_dtype(module, dtype: torch.dtype):
    return module if module is None or module.dtype == dtype else module.to(dtype)
