"""The formats a ``data.path`` may name, one module each (``npy_files``, ``image_folders``, ``captions``,
``tar_shards``), registered here with a predicate that recognises a path and a loader:

    PATH_FORMATS.register("my_format", PathFormat(
        claims=lambda path: path.endswith(".mine"),          # (data.path) -> bool
        load=lambda path, d, seed: my_loader(path, d.image_size),  # -> Dataset or StreamedCaptions
        what="a .mine file"))                                # how the unknown-path error names it

``open_path`` asks the formats in a fixed order, lowest ``order`` first and registration order among equals, and the
first that claims the path loads it. A format registered without an ``order`` (0) is asked before the built-in ones,
which go from the narrowest claim to the broadest: webdataset shards (10), a captioned image folder (20), any other
folder as images (90), any other file as a ``.npy`` array (100). A path none claims (one that does not exist) is a
one-line error listing the formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core import Registry


@dataclass(frozen=True)
class PathFormat:
    claims: Callable        # (data.path: str) -> bool: the path is in this format
    load: Callable          # (data.path, d, seed) -> Dataset | StreamedCaptions; d: the data section (PathOptions)
    what: str = ""          # a few words for the error naming every format: "a .npy array file"
    order: int = 0          # where it is asked: lowest first (built-in formats 10 .. 100; a new one 0, before them)
    video: bool = False     # reads clips (data.num_frames >= 1); open_path refuses data.num_frames for the others


PATH_FORMATS: Registry[PathFormat] = Registry("data.path format")


@dataclass(frozen=True)
class PathOptions:
    """The ``[data]`` keys the built-in formats read, for callers without a recipe (``load_dataset``); a job hands
    its whole data section instead, so a format may read any ``data.*`` key."""
    image_size: int = 0     # resize (image folders) or resize and crop (streamed shards) to this size; 0 keeps
    height: int = 0         # captioned images: resized to cover height x width, then cropped to it (0: image_size)
    width: int = 0
    channels: int = 0       # image folders: 1 or 3 (0: as the first image)
    crop: str = "center"    # streamed shards: "center" or "random"
    follow_links: bool = False  # sample files linked from outside the data folder are read (refused if off)
    num_frames: int = 0     # captioned video: frames a clip is sampled to (0: images)
    fps: float = 0          # captioned video: the rate frames are taken at (0: the clip's own)


def target_size(d, native: bool = True) -> tuple[int, int]:
    """The (height, width) a data section ``d`` sizes images to: ``data.height`` x ``data.width`` where given,
    else ``data.image_size`` squared, else (``native``) the teacher's own size (``d.native_size``, set by the job
    layer for streamed shards), else (0, 0) (kept as they are). One-line errors: a height without a width (or the
    reverse), a negative side, and an ``image_size`` the two disagree with."""
    h, w, size = int(getattr(d, "height", 0) or 0), int(getattr(d, "width", 0) or 0), int(d.image_size or 0)
    for key, value in (("height", h), ("width", w)):
        if value < 0:
            raise ValueError(f"data.{key} must be a positive number of pixels (0: data.image_size), got {value}")
    if bool(h) != bool(w):
        given, missing = ("height", "width") if h else ("width", "height")
        raise ValueError(f"data.{given} = {h or w} needs data.{missing} too: give both (a height x width size) or "
                         "neither (data.image_size's square)")
    if h and size and (h, w) != (size, size):
        raise ValueError(f"data.image_size = {size} disagrees with data.height x data.width = {h}x{w}; give one: "
                         "data.height and data.width, or data.image_size for a square")
    if h:
        return h, w
    size = size or (int(getattr(d, "native_size", 0) or 0) if native else 0)
    return size, size


def square_size(d, what: str) -> int:
    """The side a format that sizes images to squares only resizes to (``target_size``'s, which must be square;
    0 keeps); ``what``: the format, for the error."""
    h, w = target_size(d, native=False)
    if h != w:
        raise ValueError(f"data.height x data.width = {h}x{w}: {what} are resized to squares only; set "
                         "data.image_size (height and width resize and crop captioned images)")
    return h


def asking_order() -> list[str]:
    """The format names in the order ``open_path`` asks them."""
    names = PATH_FORMATS.names()
    return sorted(names, key=lambda n: (PATH_FORMATS[n].order, names.index(n)))


def path_format(path: str) -> str | None:
    """The name of the format that claims ``path`` (the first asked), or None."""
    return next((name for name in asking_order() if PATH_FORMATS[name].claims(path)), None)


def open_path(path: str, d=None, seed: int = 0):
    """The data at ``path``, loaded by the format that claims it; ``d``: the data section (default ``PathOptions()``),
    ``seed``: the run's seed (random crops). One-line error listing the formats where none claims it."""
    name = path_format(path)
    if name is None:
        known = "; ".join(f"{n} ({PATH_FORMATS[n].what or 'registered'})" for n in asking_order())
        where = "does not exist" if not Path(path).exists() else "is in none of the formats cmkit reads"
        error = FileNotFoundError if not Path(path).exists() else ValueError
        raise error(f"data.path {path!r} {where}; data.path takes: {known}")
    d = d if d is not None else PathOptions()
    frames = int(getattr(d, "num_frames", 0) or 0)
    if frames and not PATH_FORMATS[name].video:
        raise ValueError(f"data.num_frames = {frames}, but data.path {path!r} is {PATH_FORMATS[name].what or name}, "
                         "not video clips; remove data.num_frames (and data.fps) to read it as images")
    return PATH_FORMATS[name].load(path, d, seed)
