"""webdataset tar shards of captioned images (``data.path`` a folder of ``.tar`` files, one ``.tar``, or a brace
pattern such as ``shards/{00000..00099}.tar``): each sample an image (``jpg`` / ``jpeg`` / ``png`` / ``webp``) and a
caption (``txt``, or ``json`` with a ``caption`` or ``text`` field), grouped by webdataset's own tar reader. One tar is
one shard; its key is its path, size and modification time (and the crop settings), so a re-written tar is encoded
again and an untouched one never is."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from .caption_sources import CUT_SHORT, CaptionSource, decoded_chunks
from .caption_streams import StreamedCaptions
from .formats import PATH_FORMATS, PathFormat, target_size
from .paths import data_file

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_SHARDS = 100_000  # paths one brace pattern may expand to (counted before it expands)


def _group_count(expr: str) -> int:
    """How many strings the inside of one ``{...}`` gives, by braceexpand's own grammar, without expanding it."""
    import braceexpand as be

    if m := be.int_range_re.match(expr):
        a, b, step = int(m[1]), int(m[2]), int(m[3] or 1) or 1
        return len(range(a, b + 1, step) if a < b else range(a, b - 1, -step))
    if m := be.char_range_re.match(expr):
        return len(be.make_char_range(*m.groups()))
    parts, depth, start, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        pos += 2 if c == "\\" else 1  # an escaped character is text
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(expr[start:pos - 1])
            start = pos
    if not parts or depth:
        return pattern_count(expr)  # not a sequence: the braces are kept as text
    return sum(pattern_count(part) for part in [*parts, expr[start:]])


def pattern_count(pattern: str) -> int:
    """How many paths ``braceexpand(pattern)`` gives, computed from its ranges and lists (never expanded: a range
    of 10^8 is counted at once); unbalanced braces are left to braceexpand, which says what is wrong."""
    count, depth, start, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                count *= _group_count(pattern[start + 1:pos])
        pos += 1
    return count


def tar_paths(pattern: str, follow_links: bool = False) -> list[Path]:
    """The tars a ``data.path`` names, in order, each passing ``data_file``'s rule (a regular file; inside the
    folder it is in, that of the pattern, unless ``follow_links``); a one-line error where it names none, or more
    than ``MAX_SHARDS`` (counted before the pattern is expanded)."""
    import braceexpand

    p = Path(pattern)
    if p.is_dir():
        found = sorted(p.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"no .tar shards in {p}; data.path takes a folder of webdataset .tar files or "
                                    "a pattern such as shards/{00000..00099}.tar")
        return [data_file(f, p, follow_links) for f in found]
    n = pattern_count(pattern)
    if n > MAX_SHARDS:
        raise ValueError(f"data.path {pattern!r} expands to {n:,} shard paths, more than the {MAX_SHARDS:,} one "
                         "pattern may name; name the shards that exist (a narrower range), or set data.path to "
                         "their folder")
    folder = Path(pattern.split("{")[0] + "x").parent  # the folder the pattern's shards are in
    found = [data_file(s, folder, follow_links) for s in map(Path, braceexpand.braceexpand(pattern))]
    missing = [s for s in found if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"data.path {pattern!r} names {len(found)} shard(s), {len(missing)} of them missing "
                                f"(first: {missing[0]})")
    return found


def is_tar_pattern(path: str) -> bool:
    """Whether ``data.path`` names webdataset shards (a .tar, a brace pattern, or a folder holding .tar files)."""
    p = Path(path)
    return p.suffix == ".tar" or "{" in path or (p.is_dir() and any(p.glob("*.tar")))


def cut_short(path: Path) -> str | None:
    """Why the tar at ``path`` ends before its end-of-archive marker (cut mid-member, mid-header, or at a member's
    end: the samples after the cut are gone, which a streamed read cannot tell from the end), or None. Reads the
    headers only (member data is seeked over) and the bytes after the last member."""
    size = path.stat().st_size
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.TarError:
        return None  # not a plain tar (compressed, or no tar at all): the streamed read says what it is
    with tar:
        try:
            members = tar.getmembers()
        except tarfile.TarError:
            members = None
    if members is not None:
        end = max((m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for m in members), default=0)
        with open(path, "rb") as f:
            f.seek(end)
            rest = f.read(2 * tarfile.BLOCKSIZE)
        if len(rest) == 2 * tarfile.BLOCKSIZE and not rest.strip(b"\0"):
            return None  # the two zero blocks that end an archive
    return f"{CUT_SHORT} at byte {size:,}, before the tar's end: the samples after it are missing"


def _image_and_caption(sample: dict, keys=IMAGE_KEYS, what: str = "image") -> tuple[bytes, str]:
    image = next((sample[k] for k in keys if k in sample), None)
    if image is None:
        raise ValueError(f"no {what} ({', '.join(keys)})")
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
    """``image_size``: the side of the square crops, or their (height, width)."""
    media = (IMAGE_KEYS, "image")  # a sample's file extensions read, and their name (``video_clips``: clips)

    def __init__(self, pattern: str, image_size, crop: str = "center", seed: int = 0,
                 follow_links: bool = False):
        height, width = map(int, image_size if isinstance(image_size, tuple | list) else (image_size, image_size))
        if min(height, width) <= 0:
            raise ValueError("webdataset shards need data.image_size (the training resolution images are resized "
                             "and cropped to) where the teacher has no size of its own")
        self.paths = tar_paths(pattern, follow_links)
        self.name = Path(pattern.split("{")[0]).name or "shards"
        self.height, self.width, self.crop, self.seed = height, width, crop, seed
        self.image_size = height if height == width else max(height, width)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def shard_keys(self) -> list[str]:
        keys = []
        # a square's key is its side, as it always was (caches stay valid); a non-square one's is HxW
        size = self._size_key()
        for p in self.paths:
            st = p.stat()
            keys.append(f"tar:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{size}:{self.crop}:{self.seed}")
        return keys

    def _size_key(self) -> str:
        return str(self.height) if self.height == self.width else f"{self.height}x{self.width}"

    def _items(self, shard: int):
        """``(key, read)`` of each sample of the shard's tar; a tar that breaks off, or is cut short (``cut_short``),
        ends with one failing item naming it."""
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        path, why = self.paths[shard], None
        try:
            with open(path, "rb") as f:
                files = ({**entry, "__url__": str(path)} for entry in tar_file_iterator(f))
                for sample in group_by_keys(files):
                    yield sample["__key__"], lambda s=sample: _image_and_caption(s, *self.media)
        except Exception as e:  # noqa: BLE001 - tarfile / webdataset raise their own errors for a damaged tar
            why = f"the tar breaks off ({type(e).__name__}); the rest of it is skipped"
        why = cut_short(path) or why
        if why:
            def broken(why=why):
                raise ValueError(why)
            yield path.name, broken

    def read(self, shard: int, batch: int):
        return decoded_chunks(self, shard, self._items(shard), batch)


PATH_FORMATS.register("webdataset", PathFormat(
    claims=is_tar_pattern,
    load=lambda path, d, seed: StreamedCaptions(TarShards(path, target_size(d), d.crop, seed, d.follow_links)),
    what="webdataset .tar shards: a .tar, a folder of them or a pattern such as shards/{00000..00099}.tar", order=10))
