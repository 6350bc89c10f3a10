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


PATH_FORMATS: Registry[PathFormat] = Registry("data.path format")


@dataclass(frozen=True)
class PathOptions:
    """The ``[data]`` keys the built-in formats read, for callers without a recipe (``load_dataset``); a job hands
    its whole data section instead, so a format may read any ``data.*`` key."""
    image_size: int = 0     # resize (image folders) or resize and crop (streamed shards) to this size; 0 keeps
    channels: int = 0       # image folders: 1 or 3 (0: as the first image)
    crop: str = "center"    # streamed shards: "center" or "random"
    follow_links: bool = False  # sample files linked from outside the data folder are read (refused if off)


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
    return PATH_FORMATS[name].load(path, d if d is not None else PathOptions(), seed)
