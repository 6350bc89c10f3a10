"""webdataset tar shards of captioned images (``data.path`` a folder of ``.tar`` files, one ``.tar``, or a brace
pattern such as ``shards/{00000..00099}.tar``): each sample an image (``jpg`` / ``jpeg`` / ``png`` / ``webp``) and a
caption (``txt``, or ``json`` with a ``caption`` or ``text`` field), grouped by webdataset's own tar reader. One tar is
one shard; its key is its path, size and modification time (and the crop settings), so a re-written tar is encoded
again and an untouched one never is."""

from __future__ import annotations

import json
from pathlib import Path

from .caption_sources import CaptionSource, decoded_chunks
from .caption_streams import StreamedCaptions
from .formats import PATH_FORMATS, PathFormat

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def tar_paths(pattern: str) -> list[Path]:
    """The tars a ``data.path`` names, in order; a one-line error where it names none."""
    import braceexpand

    p = Path(pattern)
    if p.is_dir():
        found = sorted(p.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in {p}; data.path takes a folder of webdataset .tar files or "
                                    "a pattern such as shards/{00000..00099}.tar")
        return found
    found = [Path(s) for s in braceexpand.braceexpand(pattern)]
    missing = [s for s in found if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"data.path {pattern!r} names {len(found)} shard(s), {len(missing)} of them missing "
                                f"(first: {missing[0]})")
    return found


def is_tar_pattern(path: str) -> bool:
    """Whether ``data.path`` names webdataset shards (a .tar, a brace pattern, or a folder holding .tar files)."""
    p = Path(path)
    return p.suffix == ".tar" or "{" in path or (p.is_dir() and any(p.glob("*.tar")))


def _image_and_caption(sample: dict) -> tuple[bytes, str]:
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise ValueError(f"no image ({', '.join(IMAGE_KEYS)})")
    if "txt" in sample:
        return image, sample["txt"].decode("utf-8-sig")
    if "json" in sample:
        row = json.loads(sample["json"])
        caption = next((row[k] for k in ("caption", "text") if isinstance(row.get(k), str)), None)
        if caption is None:
            raise ValueError("its json has no 'caption' or 'text' string")
        return image, caption
    raise ValueError("no txt or json caption")


class TarShards(CaptionSource):
    def __init__(self, pattern: str, image_size: int, crop: str = "center", seed: int = 0):
        if image_size <= 0:
            raise ValueError("webdataset shards need data.image_size (the training resolution images are resized "
                             "and cropped to)")
        self.paths = tar_paths(pattern)
        self.name = Path(pattern.split("{")[0]).name or "shards"
        self.image_size, self.crop, self.seed = image_size, crop, seed

    def shard_keys(self) -> list[str]:
        keys = []
        for p in self.paths:
            st = p.stat()
            keys.append(f"tar:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{self.image_size}:{self.crop}:{self.seed}")
        return keys

    def _items(self, shard: int):
        """``(key, read)`` of each sample of the shard's tar; a tar that breaks off ends with one failing item."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path = self.paths[shard]
        try:
            with open(path, "rb") as f:
                files = ({**entry, "__url__": str(path)} for entry in tar_file_iterator(f))
                for sample in group_by_keys(files):
                    yield sample["__key__"], lambda s=sample: _image_and_caption(s)
        except Exception as e:  # noqa: BLE001 - tarfile / webdataset raise their own errors for a damaged tar
            def broken(e=e):
                raise ValueError(f"the tar breaks off ({type(e).__name__}); the rest of it is skipped")
            yield path.name, broken

    def read(self, shard: int, batch: int):
        return decoded_chunks(self, shard, self._items(shard), batch)


PATH_FORMATS.register("webdataset", PathFormat(
    claims=is_tar_pattern, load=lambda path, d, seed: StreamedCaptions(TarShards(path, d.image_size, d.crop, seed)),
    what="webdataset .tar shards: a .tar, a folder of them or a pattern such as shards/{00000..00099}.tar", order=10))
