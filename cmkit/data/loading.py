"""Where a recipe's data comes from, in one order: a stream its data section names by its own keys
(``CAPTION_STREAMS``: ``data.hf_dataset``), else the ``data.path`` format that claims the path (``PATH_FORMATS``,
asked in their order), else the named set (``DATASETS``: ``data.name``). One-line errors name the known choices."""

from __future__ import annotations

from .caption_streams import StreamedCaptions, claimed_stream
from .dataset import DATASETS, Dataset
from .formats import PathOptions, open_path, target_size


def dataset_names() -> list[str]:
    return DATASETS.names()


def open_dataset(d, seed: int = 0) -> Dataset | StreamedCaptions:
    """The data a ``[data]`` section ``d`` names: a set held in memory, or captioned shards streamed into the latent
    cache. ``seed``: the run's (random crops of streamed images)."""
    stream = claimed_stream(d, seed)
    if stream is not None and int(getattr(d, "num_frames", 0) or 0):
        raise ValueError(f"data.num_frames = {d.num_frames} samples video clips read from data.path; the stream "
                         f"{stream.name!r} holds images: remove data.num_frames (and data.fps)")
    return stream or _load(d.name, d.path or None, d, seed)


def load_dataset(name: str | None = None, path: str | None = None, image_size: int = 0, channels: int = 0,
                 height: int = 0, width: int = 0) -> Dataset | StreamedCaptions:
    """A named dataset, or the data at ``path`` in any registered format (a ``.npy`` file, a folder of images, a
    captioned folder, webdataset shards, ...); ``height`` and ``width`` (both or neither) size captioned images
    to a non-square crop. One-line errors name the known choices."""
    return _load(name, path, PathOptions(image_size=image_size, channels=channels, height=height, width=width), 0)


def _load(name: str | None, path: str | None, d, seed: int) -> Dataset | StreamedCaptions:
    if d.channels not in (0, 1, 3):
        raise ValueError(f"data.channels must be 1 (gray), 3 (RGB) or 0 (as the first image), got {d.channels}")
    target_size(d)  # height / width / image_size agree (one-line errors)
    if path:
        return open_path(path, d, seed)
    try:
        loader = DATASETS[name]
    except ValueError as e:
        raise ValueError(f"{e}; or set data.path to a .npy file or an image folder") from None
    if int(getattr(d, "num_frames", 0) or 0):
        raise ValueError(f"data.num_frames samples video clips read from data.path; data.name {name!r} holds no "
                         "clips: remove data.num_frames (and data.fps), or set data.path to a folder of clips")
    if getattr(d, "height", 0) or getattr(d, "width", 0):
        raise ValueError(f"data.height / data.width size images read from data.path; data.name {name!r} comes at "
                         "its own size: remove them")
    data = loader()
    size = data.sample_shape[-1] if len(data.sample_shape) == 3 else None
    if d.image_size and d.image_size != size:  # a named set comes at its own size: silently ignoring the key misleads
        raise ValueError(f"data.image_size = {d.image_size}, but data.name {name!r} comes at "
                         f"{f'{size}x{size}' if size else 'no image size'} and is not resized; remove "
                         "data.image_size (it resizes image folders given as data.path)")
    return data
