"""Hugging Face ``datasets`` of captioned images: ``data.hf_dataset = "imagefolder"`` reads ``data.path`` (images and
a ``metadata.jsonl``) through datasets' own image-folder builder; any other value is a dataset on the hub, a local
dataset folder or one written by ``save_to_disk``, with ``data.image_column`` / ``data.caption_column``
(``data.streaming = true`` reads it without downloading it whole). Images are read from their bytes, not decoded by
datasets, so a damaged one is skipped and counted rather than raised mid-iteration.

Shards: a dataset held on disk is cut into ``data.shard_size`` rows, keyed by datasets' fingerprint of it; a streamed
one is read in its own file shards, keyed by its name, split and shard index (a hub dataset is pinned by its revision,
which the key cannot see: clear the cache after changing it)."""

from __future__ import annotations

from pathlib import Path

from .caption_sources import CaptionSource, decoded_chunks
from .caption_streams import CAPTION_STREAMS, CaptionStream
from .formats import target_size
from .paths import data_file


def _load(d):
    try:
        import datasets
    except ImportError:
        raise ImportError("data.hf_dataset needs Hugging Face datasets: pip install 'cmkit[data]'") from None
    name = d.hf_dataset
    if name == "imagefolder":
        if not d.path or not Path(d.path).is_dir():
            raise FileNotFoundError(f"data.hf_dataset = 'imagefolder' reads the image folder data.path; "
                                    f"{d.path or '(unset)'!r} is not a folder")
        for p in Path(d.path).rglob("*"):  # what datasets will read passes the rule every sample file passes
            if not p.is_dir():
                data_file(p, d.path, d.follow_links)
        return datasets.load_dataset("imagefolder", data_dir=d.path, split=d.split, streaming=d.streaming)
    local = Path(name)
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if d.split not in ds:
                raise ValueError(f"{name} has splits {sorted(ds)}, not data.split = {d.split!r}")
            ds = ds[d.split]
        return ds.to_iterable_dataset() if d.streaming else ds
    return datasets.load_dataset(name, split=d.split, streaming=d.streaming)


class HFCaptions(CaptionSource):
    def __init__(self, d, seed: int = 0):
        height, width = target_size(d)  # the teacher's own size where none is given
        if min(height, width) <= 0:
            raise ValueError("data.hf_dataset needs data.image_size (the training resolution images are resized "
                             "and cropped to) where the teacher has no size of its own")
        import datasets

        ds = _load(d)
        columns = list(ds.column_names or ds.features or [])
        for what, col in (("image", d.image_column), ("caption", d.caption_column)):
            if col not in columns:
                raise ValueError(f"dataset {d.hf_dataset!r} has no {what} column {col!r} (its columns: "
                                 f"{', '.join(columns)}); set data.{what}_column")
        self.ds = ds.cast_column(d.image_column, datasets.Image(decode=False))
        self.streaming, self.columns = d.streaming, (d.image_column, d.caption_column)
        self.name = Path(d.path).name if d.hf_dataset == "imagefolder" else d.hf_dataset.rstrip("/").split("/")[-1]
        self.height, self.width, self.crop, self.seed, self.rows = height, width, d.crop, seed, d.shard_size
        self.image_size = height if height == width else max(height, width)
        where = f"{d.hf_dataset}:{Path(d.path).resolve() if d.path else ''}:{d.split}"
        # a square's key is its side, as it always was (caches stay valid); a non-square one's is HxW
        size = height if height == width else f"{height}x{width}"
        self.where = f"{where}:{size}:{d.crop}:{seed}"

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def shard_keys(self) -> list[str]:
        if self.streaming:
            n = self.ds.n_shards
            return [f"hf-stream:{self.where}:{i}/{n}" for i in range(n)]
        rows = len(self.ds)
        return [f"hf:{self.ds._fingerprint}:{self.where}:{a}:{min(rows, a + self.rows)}"
                for a in range(0, rows, self.rows)]

    def _rows(self, shard: int):
        if self.streaming:
            return self.ds.shard(num_shards=self.ds.n_shards, index=shard)
        return self.ds.select(range(shard * self.rows, min(len(self.ds), (shard + 1) * self.rows)))

    def _items(self, shard: int):
        image_col, caption_col = self.columns
        for i, row in enumerate(self._rows(shard)):
            image = row[image_col] or {}
            key = Path(image["path"]).name if image.get("path") else f"row {shard * self.rows + i}"
            yield key, lambda image=image, caption=row[caption_col]: (
                image.get("bytes") or Path(image["path"]).read_bytes(), caption)

    def read(self, shard: int, batch: int):
        return decoded_chunks(self, shard, self._items(shard), batch)


CAPTION_STREAMS.register("hf", CaptionStream(claims=lambda d: bool(d.hf_dataset),
                                             open=lambda d, seed: HFCaptions(d, seed)))
