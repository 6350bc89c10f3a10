"""The on-disk folder format shared by cmkit teachers and consistency models.

A folder holds the backbone exactly as diffusers writes it (``config.json`` + ``diffusion_pytorch_model.safetensors``,
so diffusers tools open it) and one ``cmkit.json`` with what the wrapper needs (kind, scalings, defaults).
Folders are written next to their destination and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core import Registry
from ..core.files import atomic_dir, atomic_write_text, refuse_pickles
from .backbones import backbone_class

META_FILE = "cmkit.json"

# cmkit.json's "kind" -> the class that reads such a folder (each model class registers itself)
MODEL_KINDS: Registry = Registry("model kind")


def write_model_folder(folder, backbone, meta: dict) -> Path:
    """Write ``backbone`` and ``meta`` to ``folder`` atomically (replacing an older folder there)."""
    with atomic_dir(folder) as tmp:
        backbone.save_pretrained(tmp, safe_serialization=True)
        meta = {**meta, "backbone": type(backbone).__name__}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(folder)


def annotate_meta(folder, **entries) -> None:
    """Add ``entries`` to a folder's ``cmkit.json`` in place (atomically); a folder without one is left as it is."""
    meta = read_meta(folder)
    if meta is not None:
        atomic_write_text(Path(folder) / META_FILE, json.dumps({**meta, **entries}, indent=2, sort_keys=True))


def read_meta(folder) -> dict | None:
    """``cmkit.json`` of a folder, or None when the folder is not a cmkit model folder."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the model folder is damaged: export it again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object; export the model folder again")
    return meta


def read_model_folder(folder, expected_kind: str):
    """Load ``(backbone, meta)`` from a cmkit folder of the given kind; one-line errors otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{str(folder)!r} is not a cmkit model folder (no {META_FILE})")
    if meta.get("kind") != expected_kind:
        raise ValueError(f"{str(folder)!r} holds a {meta.get('kind')!r}, not a {expected_kind!r}")
    missing = [k for k in ("backbone", "sigma_min", "sigma_max", "sigma_data") if k not in meta]
    if missing:
        raise ValueError(f"{folder / META_FILE} lacks {', '.join(missing)}; export the model folder again")
    cls = backbone_class(meta["backbone"])
    refuse_pickles(folder, f"the {meta['backbone']}")
    try:
        backbone = cls.from_pretrained(folder, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - diffusers / safetensors raise many kinds for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{folder}: could not read the {meta['backbone']} weights and config ({type(e).__name__}: "
                         f"{first}); the folder is damaged or partial: export it again") from None
    return backbone, meta
