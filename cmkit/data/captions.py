"""Captioned image folders for text-to-image training, in the two layouts users already have: every image with a
same-name ``.txt`` caption beside it, or a Hugging Face image folder with a ``metadata.jsonl`` of
``{"file_name": ..., "text": ...}`` rows. Asked before plain image folders: a folder with captions is this format
(and a folder with a caption file cmkit does not read, a ``metadata.csv``, is a one-line error saying what to do).
``data.image_size`` resizes every image to a square; a non-square ``data.height`` x ``data.width`` resizes each to
cover it, keeping its aspect ratio, and crops (``data.crop``), as streamed shards are read (``fit_image``)."""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath

import numpy as np
import torch

from .caption_sources import fit_image
from .dataset import Dataset, split
from .formats import PATH_FORMATS, PathFormat, target_size
from .image_folders import IMAGE_SUFFIXES, read_image
from .paths import data_file

METADATA = "metadata.jsonl"


def has_captions(path) -> bool:
    """Whether an image folder is captioned (a ``metadata.jsonl``, or ``.txt`` files beside the images). A caption
    file cmkit does not read (``metadata.csv``, a ``metadata.jsonl`` in a subfolder) is an error saying what to do."""
    root = Path(path)
    if (root / METADATA).exists():  # exists, not is_file: a FIFO or a link out is claimed here, then refused
        return True
    if any(p.with_suffix(".txt").exists() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        return True
    _refuse_unread_metadata(root)
    return False


def _refuse_unread_metadata(root: Path) -> None:
    csv = sorted(root.rglob("metadata.csv"))
    if csv:
        raise ValueError(f"{csv[0]}: cmkit reads captions from a {METADATA} (one JSON object a line, "
                         '{"file_name": "a.png", "text": "a caption"}) or a .txt beside each image, not from CSV; '
                         f"convert it to {root / METADATA}")
    nested = sorted(root.rglob(METADATA))
    if nested:
        raise ValueError(f"{nested[0]}: cmkit reads the {METADATA} at the top of data.path only; set data.path to "
                         f"{nested[0].parent}")


def _metadata_image(root: Path, meta: Path, i: int, name, follow_links: bool) -> Path:
    """The image a ``metadata.jsonl`` row names: a relative path that stays inside ``root`` (through symlinks too,
    unless ``follow_links``: ``data_file``'s rule)."""
    where = f"{meta} line {i}: file_name {name!r}"
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ValueError(f"{where} is not a file name; give the image's path relative to {root}")
    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith(("/", "\\")):
        raise ValueError(f"{where} is an absolute path; file names are relative to {root}: copy the image there")
    if ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{where} leaves the folder through '..'; file names must name images inside {root}")
    return data_file(root / name, root, follow_links, where)


def _metadata_rows(meta: Path):
    """``(line number, row)`` of each non-blank line; a BOM (Windows editors write one) is dropped."""
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{meta} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row["text"], str):
                raise TypeError
            row["file_name"]  # noqa: B018 - present
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{meta} line {i}: expected a JSON object with 'file_name' and 'text'") from None
        yield i, row


def _captions_from_metadata(root: Path, follow_links: bool) -> dict[Path, str]:
    meta = data_file(root / METADATA, root, follow_links)
    out, lines = {}, {}
    for i, row in _metadata_rows(meta):
        path = _metadata_image(root, meta, i, row["file_name"], follow_links)
        key = path.resolve()
        if key in lines:
            raise ValueError(f"{meta} line {i}: file_name {row['file_name']!r} is the image of line {lines[key]} "
                             "too; keep one row per image")
        lines[key] = i
        out[path] = row["text"]
    missing = [p.name for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} names {len(missing)} images that are not there (first: {missing[0]})")
    return out


def _captions_from_txt(root: Path, follow_links: bool, suffixes=IMAGE_SUFFIXES, what: str = "images"
                       ) -> dict[Path, str]:
    """Each file of ``suffixes`` under ``root`` (images; video clips) and the ``.txt`` caption beside it."""
    files = sorted(data_file(p, root, follow_links) for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"no {what} ({', '.join(suffixes)}) under {root}")
    txt = {p: data_file(p.with_suffix(".txt"), root, follow_links) for p in files}
    missing = [p for p in files if not txt[p].exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} {what} under {root} have no caption (first: "
                                f"{missing[0].name} needs {missing[0].with_suffix('.txt').name}); add them or write "
                                f"a {METADATA}")
    try:
        return {p: txt[p].read_text(encoding="utf-8-sig").strip() for p in files}  # BOM dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"a caption under {root} is not UTF-8 text ({e.reason}); save the captions as UTF-8") from None


def _fitted(root: Path, files, size: tuple[int, int], crop: str, seed: int) -> tuple[list, list]:
    """Each image resized to cover ``size`` (height, width) and cropped to it (``fit_image``: a random crop drawn
    from ``seed`` and the file's path in the folder), and its (original height, width, crop top, crop left)."""
    arrays, sizes = [], []
    for p in files:
        key = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)  # (a link followed out)
        try:
            arr, where = fit_image(p.read_bytes(), size, crop, seed, key)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged image
            raise ValueError(f"{p} is not a readable image ({type(e).__name__}); remove or replace it") from None
        arrays.append(arr.astype(np.float32))
        sizes.append(where)
    return arrays, sizes


def load_caption_folder(path, size=0, test_fraction: float = 0.1, follow_links: bool = False,
                        crop: str = "center", seed: int = 0) -> Dataset:
    """A captioned image folder as RGB images in [-1, 1] with ``train_captions`` / ``test_captions``; ``size``
    (an int) resizes to size x size (images must agree in size otherwise); ``size`` a non-square (height, width)
    resizes each image to cover it and crops to it (``crop``: "center" or "random", drawn from ``seed``), keeping
    each image's original size and crop offset (``train_sizes``, SDXL's time ids). Every file read passes
    ``data_file``'s rule (inside the folder unless ``follow_links``; a regular file)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder {str(root)!r} does not exist")
    read = _captions_from_metadata if (root / METADATA).exists() else _captions_from_txt
    captions = read(root, follow_links)
    if len(captions) < 2:
        raise ValueError(f"{root} holds {len(captions)} captioned image; need at least 2 (one is held out)")
    if isinstance(size, tuple | list) and size[0] == size[1]:
        size = int(size[0])  # a square: resized as data.image_size resizes it
    if not isinstance(size, tuple | list):
        arrays, sizes = [read_image(p, "RGB", size) for p in captions], None
    else:
        arrays, sizes = _fitted(root, list(captions), size, crop, seed)
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"images under {root} differ in size ({shapes[0]} and {shapes[1]} ...); set data.image_size")
    x = (np.stack(arrays) / 127.5 - 1).transpose(0, 3, 1, 2).astype(np.float32)
    texts = list(captions.values())
    idx = np.arange(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    tr, te, itr, ite = split(x, idx, n_test)
    train_sizes = None if sizes is None else torch.tensor(sizes, dtype=torch.long)[itr]
    return Dataset(root.name, tr, te, train_captions=[texts[i] for i in itr.tolist()],
                   test_captions=[texts[i] for i in ite.tolist()], train_sizes=train_sizes)


PATH_FORMATS.register("caption_folder", PathFormat(
    claims=lambda path: Path(path).is_dir() and has_captions(path),
    load=lambda path, d, seed: load_caption_folder(path, target_size(d, native=False), follow_links=d.follow_links,
                                                   crop=d.crop, seed=seed),
    what=f"a folder of images with captions, a .txt beside each or a {METADATA}", order=20))
