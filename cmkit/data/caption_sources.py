"""Captioned images as shards, the unit the latent cache encodes and keys on: a source lists its shards (one
identity string each: what a cached shard is keyed on) and reads any of them as chunks of images in [-1, 1] with their
captions. The sources: a ``Dataset`` held in memory (``ArraySource``, fixed-size chunks of its rows), webdataset tar
shards and Hugging Face datasets (``cmkit.data.tar_shards`` / ``hf_captions``, registered in
``cmkit.data.caption_streams``), read as diffusers' training scripts read them: the shorter side resized to
``data.image_size``, then a centre or random crop, the original size and crop offset kept (SDXL's time ids); a
``data.height`` x ``data.width`` size resizes each image to cover it, keeping its aspect ratio, then crops to it. A
sample that cannot be read is skipped and reported with its key, never a crash mid-encode.

``read_shards`` hands a process's shards to dataloader workers (whole shards per worker, so a shard's rows stay in
order and its cached encoding does not depend on the worker count)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .pixels import to_rgb

CUT_SHORT = "cut short"  # begins the skipped entry of a shard whose file ends early (a source's, say a truncated tar)


@dataclass
class Chunk:
    """Up to a batch of one shard's samples."""
    shard: int                 # the shard's index in ``source.shard_keys()``
    images: torch.Tensor       # (b, 3, H, W) float32 in [-1, 1]; clips (b, 3, F, H, W)
    captions: list[str]
    sizes: torch.Tensor        # (b, 4) int64: original height, width, crop top, crop left
    skipped: list[str] = field(default_factory=list)  # "key: why" of this chunk's samples that could not be read
    last: bool = False         # the shard's final chunk


class CaptionSource:
    """What the latent cache reads: ``name``, ``image_size`` (or ``size``, (height, width), for non-square images),
    ``shard_keys()`` and ``read(shard, batch)``."""
    name: str = "captions"
    image_size: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) of the images it reads."""
        return self.image_size, self.image_size

    def shard_keys(self) -> list[str]:
        raise NotImplementedError

    def read(self, shard: int, batch: int) -> Iterator[Chunk]:
        raise NotImplementedError


class ArraySource(CaptionSource):
    """Images or clips already in memory ((n, 3, H, W) / (n, 3, F, H, W) in [-1, 1]) with one caption each, as
    shards of ``shard_size`` rows; a shard's key hashes its pixels and captions (and ``sizes`` where given), so a
    cached shard is found again whatever data it sits in. ``sizes``: each image's (original height, width, crop
    top, crop left), for images cropped from larger ones; default: the images' own size, uncropped."""

    def __init__(self, images: torch.Tensor, captions: list[str], name: str = "captions", shard_size: int = 4096,
                 sizes: torch.Tensor | None = None):
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images; every image needs one caption")
        if sizes is not None and tuple(sizes.shape) != (len(images), 4):
            raise ValueError(f"sizes of shape {tuple(sizes.shape)} for {len(images)} images; expected (n, 4)")
        self.images, self.captions, self.name = images.contiguous(), list(captions), name
        self.image_size, self.shard_size = int(images.shape[-1]), shard_size
        self.sizes = None if sizes is None else sizes.to(torch.long)
        self._keys = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    @property
    def num_frames(self) -> int:
        """Clips held in memory ((n, 3, F, H, W)): their frame count, so the cache expects video latents; else 0."""
        return int(self.images.shape[2]) if self.images.ndim == 5 else 0

    def _rows(self, shard: int) -> slice:
        return slice(shard * self.shard_size, min(len(self.images), (shard + 1) * self.shard_size))

    def shard_keys(self) -> list[str]:
        if self._keys is None:
            keys = []
            for i in range(-(-len(self.images) // self.shard_size)):
                h = hashlib.sha256(self.images[self._rows(i)].numpy().tobytes())
                h.update("\n".join(self.captions[self._rows(i)]).encode())
                if self.sizes is not None:
                    h.update(self.sizes[self._rows(i)].numpy().tobytes())
                keys.append(f"array:{h.hexdigest()[:32]}")
            self._keys = keys
        return self._keys

    def read(self, shard: int, batch: int) -> Iterator[Chunk]:
        rows = self._rows(shard)
        h, w = self.images.shape[-2:]
        for start in range(rows.start, rows.stop, batch):
            stop = min(rows.stop, start + batch)
            sizes = torch.tensor([[h, w, 0, 0]] * (stop - start), dtype=torch.long) if self.sizes is None \
                else self.sizes[start:stop]
            yield Chunk(shard, self.images[start:stop], self.captions[start:stop], sizes, last=stop == rows.stop)


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The (new height, new width) an ``h`` x ``w`` image is resized to so that it covers ``height`` x ``width``
    keeping its aspect ratio (scale max(height / h, width / w)), as torchvision's ``Resize(int)`` rounds for a square:
    the binding side becomes its target exactly, the other ``int(target * other / binding)``, never below its own
    target."""
    if h * width <= w * height:  # height binds (for a square: the short side is the height)
        return height, max(width, int(height * w / h))
    return max(height, int(width * h / w)), width


def fit_image(data: bytes, size, crop: str, seed: int, key: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An encoded image as an RGB ``(height, width, 3)`` uint8 array, as diffusers' scripts prepare one: resized
    (bilinear) to cover ``size`` (an int: a square, the shorter side resized to it; or (height, width)) keeping its
    aspect ratio, then a centre crop or a random one (drawn from ``seed`` and the sample's ``key``, so a re-encode
    crops the same). Returns the array and (original height, width, crop top, crop left)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)  # 16-bit grey scaled as every reader scales it, not clipped to white
    return fit_rgb(rgb, size, crop, seed, key)


def fit_rgb(rgb, size, crop: str, seed: int, key: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``fit_image`` of a decoded RGB PIL image (a video frame: every frame of a clip, one key, crops the same)."""
    from PIL import Image

    height, width = (int(size[0]), int(size[1])) if isinstance(size, tuple | list) else (int(size), int(size))
    w, h = rgb.size
    if min(w, h) < 1:
        raise ValueError("empty image")
    nh, nw = cover_size(h, w, height, width)
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.BILINEAR)
    if crop == "center":  # torchvision's CenterCrop rounding
        top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    else:
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        rng = np.random.default_rng([seed, digest])
        top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    arr = np.asarray(rgb.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return arr, (h, w, top, left)


def to_chunk(shard: int, samples: list, skipped: list[str], last: bool, size, frames: int = 0) -> Chunk:
    """A chunk from ``(array, caption, sizes)`` samples (arrays from ``fit_image``, (H, W, 3); or clips,
    (F, H, W, 3)); ``size``: the images' side or (height, width); ``frames``: a clip's frames (0: images)."""
    if samples:  # channels first: (b, 3, H, W), or (b, 3, F, H, W) for clips
        x = torch.from_numpy(np.stack([s[0] for s in samples])).movedim(-1, 1).float() / 127.5 - 1
    else:
        side = size if isinstance(size, tuple | list) else (size, size)
        x = torch.zeros(0, 3, *([frames] if frames else []), *side)
    sizes = torch.tensor([s[2] for s in samples], dtype=torch.long).reshape(-1, 4)
    return Chunk(shard, x.contiguous(), [s[1] for s in samples], sizes, skipped, last)


def source_size(source) -> tuple[int, int]:
    """A caption source's (height, width): its ``size``, or ``image_size`` squared for one that only has that."""
    size = getattr(source, "size", None)
    return (int(size[0]), int(size[1])) if size is not None else (source.image_size, source.image_size)


def _why(e: Exception) -> str:
    first = str(e).splitlines()[0][:80] if str(e).strip() else ""
    return first or type(e).__name__


def decoded_chunks(source, shard: int, items, batch: int, fit=fit_image) -> Iterator[Chunk]:
    """Chunks of ``batch`` samples from ``items``, ``(key, read)`` pairs whose ``read()`` gives the sample's
    encoded image and caption; a sample whose read or decode fails is skipped with its key and why. ``fit``: the
    decoder, ``fit(data, size, crop, seed, key) -> (array, sizes)`` (``fit_image``; a clip's, for video)."""
    samples, skipped = [], []
    frames = int(getattr(source, "num_frames", 0) or 0)
    for key, read in items:
        try:
            data, caption = read()
            if not isinstance(caption, str):
                raise ValueError(f"caption is {type(caption).__name__}, not text")
            arr, sizes = fit(data, source_size(source), source.crop, source.seed, key)
        except Exception as e:  # noqa: BLE001 - PIL, PyAV, tarfile and json raise many types for a damaged sample
            skipped.append(f"{key}: {_why(e)}")
            continue
        samples.append((arr, caption.strip(), sizes))
        if len(samples) == batch:
            yield to_chunk(shard, samples, skipped, False, source_size(source), frames)
            samples, skipped = [], []
    yield to_chunk(shard, samples, skipped, True, source_size(source), frames)


class _Shards(torch.utils.data.IterableDataset):
    def __init__(self, source: CaptionSource, shards: list[int], batch: int):
        self.source, self.shards, self.batch = source, shards, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from self.source.read(shard, self.batch)


def read_shards(source: CaptionSource, shards: list[int], batch: int, workers: int = 0) -> Iterator[Chunk]:
    """Chunks of ``shards`` (whole shards per worker; chunks of different shards may interleave)."""
    if workers <= 0 or len(shards) <= 1:
        for shard in shards:
            yield from source.read(shard, batch)
        return
    loader = torch.utils.data.DataLoader(_Shards(source, shards, batch), batch_size=None,
                                         num_workers=min(workers, len(shards)))
    yield from loader
