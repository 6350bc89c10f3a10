"""Captioned image sets read from shards rather than held in memory: ``StreamedCaptions``, what the job layer hands a
text-to-image kind in place of a ``Dataset`` (webdataset tars, a ``data.path`` format: ``tar_shards``; Hugging Face
datasets), and the registry of the streams a data section names by keys other than ``data.path`` (``CAPTION_STREAMS``:
one module each, registering a ``CaptionStream``, whether it reads a data section and its opener ``(data section,
seed) -> CaptionSource``; ``hf_captions`` for ``data.hf_dataset``). Nothing is decoded here: the latent cache reads the
source once, shard by shard, and training reads the cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core import Registry


@dataclass(frozen=True)
class CaptionStream:
    claims: Callable        # (data section) -> bool: the section names data this stream reads
    open: Callable          # (data section, seed) -> CaptionSource


CAPTION_STREAMS: Registry[CaptionStream] = Registry("caption stream")


@dataclass
class StreamedCaptions:
    source: object          # a cmkit.data.caption_sources.CaptionSource
    train_captions = None   # not known before the source is read: kinds that need every caption up front refuse it
    test_captions = None
    num_classes = None
    train_labels = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = getattr(self.source, "size", None) or (self.source.image_size,) * 2  # (height, width)
        frames = int(getattr(self.source, "num_frames", 0) or 0)  # video clips: (3, F, H, W)
        return (3, *([frames] if frames else []), int(size[0]), int(size[1]))

    def caption_source(self):
        return self.source

    def batches(self, conditional: bool = False, hflip: bool = False):
        raise ValueError(f"{self.name} is streamed caption data: it trains the latent text-to-image kinds (lcm, "
                         "flow_cd, latent_scd, ...), which read it through the latent cache")


def claimed_stream(d, seed: int = 0) -> StreamedCaptions | None:
    """The streamed set a data section names by a stream's own keys (the first registered stream that claims it:
    ``data.hf_dataset``), or None (``data.path`` and ``data.name`` are read by ``loading.open_dataset``)."""
    for name in CAPTION_STREAMS.names():
        stream = CAPTION_STREAMS[name]
        if stream.claims(d):
            return StreamedCaptions(stream.open(d, seed))
    return None
