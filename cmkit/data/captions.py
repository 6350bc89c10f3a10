"""Captioned image folders for text-to-image training, in the two layouts users already have: every image with a
same-name ``.txt`` caption beside it, or a Hugging Face image folder with a ``metadata.jsonl`` of
``{"file_name": ..., "text": ...}`` rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .dataset import Dataset, _split
from .images import IMAGE_SUFFIXES

METADATA = "metadata.jsonl"


def has_captions(path) -> bool:
    """Whether an image folder is captioned (a ``metadata.jsonl``, or ``.txt`` files beside the images)."""
    root = Path(path)
    if (root / METADATA).is_file():
        return True
    return any(p.with_suffix(".txt").is_file() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _captions_from_metadata(root: Path) -> dict[Path, str]:
    meta = root / METADATA
    out = {}
    for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row["text"], str):
                raise TypeError
            out[root / row["file_name"]] = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{meta} line {i}: expected a JSON object with 'file_name' and 'text'") from None
    missing = [p.name for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} names {len(missing)} images that are not there (first: {missing[0]})")
    return out


def _captions_from_txt(root: Path) -> dict[Path, str]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    missing = [p for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} images under {root} have no caption (first: "
                                f"{missing[0].name} needs {missing[0].with_suffix('.txt').name}); add them or write "
                                f"a {METADATA}")
    try:
        return {p: p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in files}
    except UnicodeDecodeError as e:
        raise ValueError(f"a caption under {root} is not UTF-8 text ({e.reason}); save the captions as UTF-8") from None


def load_caption_folder(path, size: int = 0, test_fraction: float = 0.1) -> Dataset:
    """A captioned image folder as RGB images in [-1, 1] with ``train_captions`` / ``test_captions``; ``size``
    resizes to size x size (images must agree in size otherwise)."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder {str(root)!r} does not exist")
    captions = _captions_from_metadata(root) if (root / METADATA).is_file() else _captions_from_txt(root)
    if len(captions) < 2:
        raise ValueError(f"{root} holds {len(captions)} captioned image; need at least 2 (one is held out)")
    arrays = []
    for p in captions:
        try:
            im = Image.open(p).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"{p} is not a readable image ({type(e).__name__}); remove or replace it") from None
        arrays.append(np.asarray(im.resize((size, size), Image.BICUBIC) if size else im, dtype=np.float32))
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"images under {root} differ in size ({shapes[0]} and {shapes[1]} ...); set data.image_size")
    x = (np.stack(arrays) / 127.5 - 1).transpose(0, 3, 1, 2).astype(np.float32)
    texts = list(captions.values())
    idx = np.arange(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    tr, te, itr, ite = _split(x, idx, n_test)
    return Dataset(root.name, tr, te, train_captions=[texts[i] for i in itr.tolist()],
                   test_captions=[texts[i] for i in ite.tolist()])
