"""The on-disk folder format shared by cmkit teachers and consistency models.

A folder holds the backbone exactly as diffusers writes it (``config.json`` + ``diffusion_pytorch_model.safetensors``,
so diffusers tools open it) and one ``cmkit.json`` with what the wrapper needs (kind, scalings, defaults).
Folders are written next to their destination and renamed into place, so a crash never leaves half a model.

Layer 2.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .nets import backbone_class

META_FILE = "cmkit.json"


def write_model_folder(folder, backbone, meta: dict) -> Path:
    """Write ``backbone`` and ``meta`` to ``folder`` atomically (replacing an older folder there)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        backbone.save_pretrained(tmp, safe_serialization=True)
        meta = {**meta, "backbone": type(backbone).__name__}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is swapped out first and removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(folder) -> dict | None:
    """``cmkit.json`` of a folder, or None when the folder is not a cmkit model folder."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


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
    backbone = backbone_class(meta["backbone"]).from_pretrained(folder)
    return backbone, meta
