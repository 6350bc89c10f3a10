"""Reading a diffusers pipeline folder's parts: ``model_index.json``, which components it names, and each component
through its own library's ``from_pretrained`` (diffusers or transformers only, never remote code, never a pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.assets import hub_file, looks_like_hub_id
from ..core.checks import finite_tensors
from ..core.files import refuse_pickles
from ..core.memory import check_network_fits, meta_params

# config keys that size a network (named when one is too big)
SIZE_KEYS = ("block_out_channels", "layers_per_block", "num_layers", "num_single_layers", "num_attention_heads",
             "attention_head_dim", "hidden_size", "intermediate_size", "num_hidden_layers", "d_model", "d_ff")

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
            index = json.loads(local.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{local} is not valid JSON") from None
    else:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, **load_kw)
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        got = index.get("_class_name") if isinstance(index, dict) else index
        raise ValueError(f"{path}: model_index.json's _class_name must be a pipeline class name (a string), got "
                         f"{got!r}; copy the folder again")
    return index


def _unreadable_safetensors(folder: Path) -> Path | None:
    """The first ``.safetensors`` file in ``folder`` whose header cannot be read (None where all can)."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:  # safetensors raises its own error types for every kind of damage
            return f
    return None


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
    kw = safe_load_kw(library, cls, load_kw)
    refuse_pickles(Path(path) / name, f"the {name}")
    check_component_fits(path, name, cls, kw.get("torch_dtype"))
    try:
        part = cls.from_pretrained(path, subfolder=name, **kw)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:  # a damaged config or tokenizer
        files = ", ".join(sorted(p.name for p in (Path(path) / name).glob("*.json"))) or "its files"
        raise ValueError(f"{path}: {name}/ could not be read ({type(e).__name__}: {str(e)[:80]}); one of {files} is "
                         "damaged or not what its config names: copy the folder again") from None
    except ValueError as e:
        if "custom code" in str(e):  # transformers' refusal of an auto_map into a .py file, over several lines
            raise ValueError(f"{path}: {name}/ asks for custom code (an auto_map into a .py file), and cmkit never "
                             f"runs code from a model folder; name a {library} class for it in model_index.json and "
                             f"{name}/'s config") from None
        raise
    except OSError as e:
        damaged = _unreadable_safetensors(Path(path) / name)
        if damaged:  # an empty, truncated or garbage file is there: not "missing"
            raise ValueError(f"{damaged} is not a readable safetensors file ({damaged.stat().st_size} bytes); it "
                             "is truncated or damaged: copy or download the folder again") from None
        if kw.get("use_safetensors") and "safetensors" in str(e):
            raise ValueError(f"{path}: {name}/ has no .safetensors weights (cmkit never unpickles a .bin, which could "
                             "run code); convert it to safetensors where you trust it and try again") from None
        raise
    if isinstance(part, torch.nn.Module):  # once, at load: one reduction per tensor
        finite_tensors(part, f"{path}: {name}/'s weights", "the folder is damaged (or was saved from a run that "
                       "diverged): copy or export it again")
    return part


def check_component_fits(path, name: str, cls, dtype=None) -> None:
    """Refuse a component whose ``config.json`` builds a network too big for the memory there is, before
    ``from_pretrained`` allocates it: the network is built from the config on the meta device and its parameters
    counted (in ``dtype``, float32 where None). A config the meta build cannot read is left to ``from_pretrained``,
    which names what is wrong; a hub id is checked from the config in the local hub cache (or the hub's)."""
    config = Path(path) / name / "config.json"
    if not config.is_file() and looks_like_hub_id(str(path)):
        config = hub_file(str(path), f"{name}/config.json" if name else "config.json") or config
    if not config.is_file() or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return
    try:
        if hasattr(cls, "from_config"):  # diffusers
            cfg = cls.load_config(str(config.parent))
            params = meta_params(lambda: cls.from_config(cfg))
        else:  # transformers
            cfg = cls.config_class.from_pretrained(str(config.parent))
            params = meta_params(lambda: cls(cfg))
    except Exception:  # noqa: BLE001 - a damaged config: from_pretrained's error names it
        return
    sizes = ", ".join(k for k in SIZE_KEYS if k in (cfg if isinstance(cfg, dict) else cfg.to_dict()))
    per = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    check_network_fits(params, per, f"{path}: {name + '/' if name else ''}config.json's {cls.__name__}",
                       f"check the sizes in {config}{f' ({sizes})' if sizes else ''}, or free memory", None)


def safe_load_kw(library: str, cls, load_kw: dict) -> dict:
    """``from_pretrained`` keywords that keep a folder a user was given from running code: transformers classes
    never trust remote code, and networks (diffusers ``ModelMixin``, transformers ``PreTrainedModel``) read
    safetensors only, never a pickle."""
    import importlib

    kw = dict(load_kw)
    if library == "transformers":
        kw.setdefault("trust_remote_code", False)
    base = "ModelMixin" if library == "diffusers" else "PreTrainedModel"
    if isinstance(cls, type) and issubclass(cls, getattr(importlib.import_module(library), base)):
        kw.setdefault("use_safetensors", True)
    return kw


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
