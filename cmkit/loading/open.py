"""Opening models by name: teachers (cmkit folders, diffusers pixel or text-to-image pipeline folders, hub ids,
shipped ``cmkit:NAME`` assets) and any model folder cmkit writes. It sits above both ``cmkit.models`` (pixel
networks) and ``cmkit.latent`` (pipeline families), the two kinds of thing it opens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.assets import hub_load_kw, looks_like_hub_id, resolve
from ..core.files import refuse_pickles
from ..core.memory import NotEnoughMemory
from ..latent.components import check_component_fits, is_text_to_image, read_model_index, safe_load_kw
from ..latent.denoiser import TextToImageModel
from ..models.backbones import BACKBONE_CLASSES
from ..models.denoisers import DiffusersDenoiser, EDMDenoiser
from ..models.folder import MODEL_KINDS, read_meta


def _load_diffusers(path: str, clip_x0: float | None = None, dtype=None, **load_kw):
    import diffusers

    index = _model_index(path, lambda p: read_model_index(p, **load_kw))
    if index is not None and is_text_to_image(index):
        return TextToImageModel.from_pretrained(path, clip_x0=clip_x0, dtype=dtype or torch.float32, **load_kw)

    if index is not None and not (Path(path) / "unet").is_dir() and Path(path).is_dir():
        raise ValueError(f"{path!r} is a diffusers pipeline folder without unet/ and without a text encoder; a pixel "
                         "teacher needs unet/ + scheduler/ (a text-to-image one vae/ and text_encoder/ too)")

    def load(sub: str):
        cfg_name = "config.json" if sub == "unet" else "scheduler_config.json"
        local = Path(path) / sub / cfg_name
        if local.is_file():
            name = json.loads(local.read_text())["_class_name"]
        else:  # hub id: ask the hub for the config through diffusers
            cls = diffusers.UNet2DModel if sub == "unet" else diffusers.DDPMScheduler
            name = cls.load_config(path, subfolder=sub, **load_kw)["_class_name"]
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"{path}: unknown diffusers class {name!r} in {sub}/")
        refuse_pickles(Path(path) / sub, f"the {sub}")
        check_component_fits(path, sub, cls)
        return cls.from_pretrained(path, subfolder=sub, **safe_load_kw("diffusers", cls, load_kw))

    return DiffusersDenoiser(load("unet"), load("scheduler"), clip_x0=clip_x0)


def _model_index(path: str, read) -> dict | None:
    """A pipeline folder's ``model_index.json`` (None where there is none, as in cmkit 0.1's unet + scheduler
    folders)."""
    if Path(path).is_dir():
        return read(path) if (Path(path) / "model_index.json").is_file() else None
    try:
        return read(path)
    except OSError:
        return None


def load_teacher(path_or_hub_id, clip_x0: float | None = None, dtype=None):
    """A teacher denoiser from a cmkit teacher folder, a diffusers pipeline folder (``unet/`` + ``scheduler/``: a
    pixel UNet as a ``DiffusersDenoiser``; a text-to-image pipeline of a class cmkit has an adapter for, SD 1.x /
    2.x, SDXL, SD3 or Flux, a ``TextToImageModel``), a shipped teacher (``"cmkit:digits-ddpm"``,
    ``"cmkit:tiny-t2i"``) or a hub id (the real ``from_pretrained`` call; needs network access, and fails in
    seconds without it). ``dtype``: a text-to-image teacher's network and text encoders are held in it (the VAE
    stays float32); pixel teachers stay float32."""
    if not str(path_or_hub_id):
        raise ValueError("no teacher given: pass --teacher PATH or set teacher.path in the recipe")
    path = resolve(path_or_hub_id)
    p = Path(path)
    if p.is_dir():
        meta = read_meta(p)
        if meta is not None:
            if meta.get("kind") != EDMDenoiser.kind:
                raise ValueError(f"{path!r} holds a {meta.get('kind')!r}, not a teacher; give a teacher folder")
            _check_backbone_fits(p, meta)
            return EDMDenoiser.from_pretrained(p)
        if (p / "unet").is_dir() and (p / "scheduler").is_dir() or (p / "model_index.json").is_file():
            return _load_diffusers(path, clip_x0, dtype)
        raise ValueError(f"{path!r} is neither a cmkit teacher folder (cmkit.json) nor a diffusers pipeline folder "
                         "(unet/ + scheduler/)")
    if not looks_like_hub_id(path):
        raise FileNotFoundError(f"teacher folder {path!r} does not exist; train one with `cmkit train-teacher RECIPE` "
                                "or give a diffusers folder or hub id")
    load_kw = hub_load_kw()
    try:
        return _load_diffusers(path, clip_x0, dtype, **load_kw)
    except NotEnoughMemory:  # sized from the hub id's config before its weights were fetched: said as it is
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load teacher {path!r}: no such folder here, and as a hub id ({first}); "
                                "download it where there is network access and pass the local folder") from e


def load_model(folder):
    """Any model folder cmkit writes, as the class its ``cmkit.json`` names (or a diffusers
    ``ConsistencyModelPipeline`` folder, as a ``ConsistencyModel``)."""
    from .. import latent  # noqa: F401  (registers the latent kinds: "lcm", the flow students)
    from ..models.consistency import ConsistencyModel

    folder = Path(resolve(folder))
    meta = read_meta(folder)
    if meta is None:
        return ConsistencyModel.from_pretrained(folder)
    _check_backbone_fits(folder, meta)
    return MODEL_KINDS[meta.get("kind")].from_pretrained(folder)


def _check_backbone_fits(folder: Path, meta: dict) -> None:
    """Refuse a cmkit folder whose ``config.json`` builds a backbone too big for the memory there is, before its
    weights are read (pixel kinds; the latent kinds' parts are checked as their pipeline folders are read)."""
    name = meta.get("backbone")
    if isinstance(name, str) and name in BACKBONE_CLASSES:
        check_component_fits(folder, "", BACKBONE_CLASSES[name])
