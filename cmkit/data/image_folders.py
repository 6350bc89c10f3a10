"""``data.path`` a folder of images (optionally one subfolder per class, the labels), and reading one image file as
every loader of images does (16-bit grayscale kept, one-line errors naming the file). The broadest folder format:
any folder no other format claims is read as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import Dataset, split
from .formats import PATH_FORMATS, PathFormat, square_size
from .paths import data_file
from .pixels import GREY_MODES, WIDE_MODES, wide_to_float

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_image(path, mode: str | None = None, size: int = 0) -> np.ndarray:
    """One image file as float32 pixels on the 0..255 scale, (H, W) for ``mode`` "L" or (H, W, 3) for "RGB" (None:
    "L" for a grayscale file). ``size`` resizes to size x size (bicubic). 16-bit grayscale is scaled by 255 / 65535
    (PIL's own conversion to 8 bits clips it: a mid-grey would become white). One-line errors name the file."""
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e} (PIL refuses it as a possible decompression bomb); resize the image or "
                         "remove it") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}); remove or replace it") from None
    mode = mode or ("L" if im.mode in GREY_MODES else "RGB")
    if im.mode in WIDE_MODES:
        im = wide_to_float(im)  # mode "F"
        if mode == "RGB":  # a grey image taken as RGB: three equal channels
            return np.repeat(_resized(im, size)[..., None], 3, axis=-1)
        return _resized(im, size)
    return _resized(im.convert(mode), size)


def _resized(im, size: int) -> np.ndarray:
    from PIL import Image

    if size:
        im = im.resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32)
    return np.clip(arr, 0, 255) if im.mode == "F" else arr


def load_image_folder(path, size: int = 0, channels: int = 0, test_fraction: float = 0.1,
                      follow_links: bool = False) -> Dataset:
    """A folder of images (optionally one subfolder per class) scaled to [-1, 1]. ``size`` resizes to size x size;
    ``channels`` 1 or 3 converts the mode (0 keeps what the first image has). Every image passes ``data_file``'s
    rule (inside the folder unless ``follow_links``; a regular file)."""
    root = Path(path)
    files = sorted(data_file(p, root, follow_links) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    labelled = len(classes) > 1 or classes != ["."]
    first = read_image(files[0], {1: "L", 3: "RGB"}.get(channels))
    mode = "L" if first.ndim == 2 else "RGB"
    arrays = [read_image(p, mode, size) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {root} differ in size ({sorted(shapes)[:2]} ...); set data.image_size")
    if len(arrays) < 2:
        raise ValueError(f"{root} holds {len(arrays)} image; training needs at least 2 (one is held out)")
    x = np.stack(arrays) / 127.5 - 1
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.array([classes.index(p.parent.relative_to(root).as_posix()) for p in files]) if labelled else None
    n_test = max(1, int(round(test_fraction * len(x))))
    tr, te, ytr, yte = split(x.astype(np.float32), y, n_test)
    return Dataset(root.name, tr, te, ytr, yte, len(classes) if labelled else None)


PATH_FORMATS.register("image_folder", PathFormat(
    claims=lambda path: Path(path).is_dir(),
    load=lambda path, d, seed: load_image_folder(path, square_size(d, "plain image folders"), d.channels,
                                                 follow_links=d.follow_links),
    what="a folder of images, a subfolder per class if labelled", order=90))
