"""Captioned video clips for text-to-video training, decoded with PyAV (the ``video`` extra: ``pip install
cmkit[video]``): a folder of ``.mp4`` / ``.webm`` clips, each with a same-name ``.txt`` caption or rows of a
``metadata.jsonl`` (as captioned image folders), or webdataset tar shards whose samples hold a clip (``mp4`` /
``webm``) and a caption (``txt``, or ``json`` with a ``caption`` or ``text`` field). Both are read as streamed
shards (``StreamedCaptions``): the latent cache reads them once.

A clip is sampled to ``data.num_frames`` frames at ``data.fps`` (0: the clip's own rate): frame k is the decoded frame
nearest the time ``start + k / fps``, ``start`` 0 (or, with ``data.crop = "random"``, drawn from the run's seed and
the clip's key within the clip's length); every frame is resized and cropped as an image is (``fit_rgb``: one crop
for the whole clip), so a sample is (3, F, H, W) in [-1, 1]. A clip that cannot be decoded, or is shorter than
``num_frames / fps`` seconds, is skipped and reported with its key, never a crash mid-encode."""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
from functools import partial
from pathlib import Path

import numpy as np

from .caption_sources import CaptionSource, decoded_chunks, fit_rgb
from .caption_streams import StreamedCaptions
from .captions import METADATA, _captions_from_metadata, _captions_from_txt
from .formats import PATH_FORMATS, PathFormat, target_size
from .image_folders import IMAGE_SUFFIXES
from .paths import data_file
from .tar_shards import TarShards, is_tar_pattern, tar_paths

VIDEO_SUFFIXES = (".mp4", ".webm")
VIDEO_KEYS = ("mp4", "webm")
FOLDER_SHARD = 1000  # clips of a folder per latent-cache shard


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video clips needs PyAV: pip install 'cmkit[video]' (or pip install av)") from None
    return av


def frame_times(container, stream) -> tuple[list[int], np.ndarray, float, float]:
    """The presentation stamps of a stream's frames, in order (read from the packets: nothing is decoded), their
    times in seconds from the first, the clip's length in seconds (the last frame's time plus one frame) and its
    frame rate."""
    pts = sorted({p.pts for p in container.demux(stream) if p.pts is not None and p.size})
    if not pts:
        raise ValueError("no video frames")
    times = np.array([float((p - pts[0]) * stream.time_base) for p in pts])
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if not rate and len(times) > 1:
        rate = 1 / float(np.median(np.diff(times)))
    return pts, times, float(times[-1] + (1 / rate if rate else 0)), rate


def pick_frames(times: np.ndarray, length: float, rate: float, num_frames: int, fps: float, crop: str, seed: int,
                key: str) -> list[int]:
    """Indices into ``times`` of the frames nearest ``start + k / fps`` (k < ``num_frames``; ``fps`` 0: ``rate``,
    the clip's own); ``start`` 0, or for a ``"random"`` crop drawn from ``seed`` and ``key`` so that every frame
    lies within the clip. Raises where the clip is shorter than ``num_frames / fps``."""
    fps = fps or rate
    if not fps:
        raise ValueError("the clip has no frame rate; set data.fps")
    need = num_frames / fps
    if length + 1e-6 < need:
        raise ValueError(f"too short: {length:.3g} s, and {num_frames} frames at {fps:g} fps need {need:.3g} s")
    start = 0.0
    if crop != "center" and length > need:
        digest = int.from_bytes(hashlib.sha256(f"{key}|start".encode()).digest()[:8], "little")
        start = float(np.random.default_rng([seed, digest]).uniform(0, length - need))
    targets = start + np.arange(num_frames) / fps
    return np.abs(times[None, :] - targets[:, None]).argmin(1).tolist()


def decode_clip(data: bytes, size, crop: str, seed: int, key: str, num_frames: int, fps: float = 0
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An encoded clip as ``num_frames`` RGB frames ``(F, height, width, 3)`` uint8, each resized and cropped as
    ``fit_image`` does an image (one crop for the clip); the frames as ``pick_frames`` chooses them. Returns the
    array and (original height, width, crop top, crop left)."""
    av = _av()
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        pts, times, length, rate = frame_times(container, stream)
    chosen = pick_frames(times, length, rate, num_frames, fps, crop, seed, key)
    wanted, fitted, where = {pts[i] for i in chosen}, {}, None
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(container.streams.video[0]):
            if frame.pts in wanted and frame.pts not in fitted:
                fitted[frame.pts], where = fit_rgb(frame.to_image(), size, crop, seed, key)
                if len(fitted) == len(wanted):
                    break
    missing = [i for i in chosen if pts[i] not in fitted]
    if missing:
        raise ValueError(f"{len(set(missing))} of its frames could not be decoded (first at {times[missing[0]]:.3g} s)")
    return np.stack([fitted[pts[i]] for i in chosen]), where


def clip_options(d, path: str) -> tuple[int, float]:
    """``(data.num_frames, data.fps)`` for the clips at ``path``; one-line errors where no frame count is set or
    the rate is negative."""
    frames, fps = int(getattr(d, "num_frames", 0) or 0), float(getattr(d, "fps", 0) or 0)
    if frames < 1:
        raise ValueError(f"data.path {path!r} holds video clips; set data.num_frames (the frames each clip is "
                         f"sampled to, >= 1; got {frames}) and data.fps (0: each clip's own rate)")
    if fps < 0:
        raise ValueError(f"data.fps must be >= 0 (0: each clip's own rate), got {fps:g}")
    return frames, fps


def _clip_size(size, what: str) -> tuple[int, int]:
    height, width = map(int, size if isinstance(size, tuple | list) else (size, size))
    if min(height, width) <= 0:
        raise ValueError(f"{what} need data.image_size (or data.height and data.width: the size frames are resized "
                         "and cropped to) where the teacher has no size of its own")
    return height, width


class VideoFolder(CaptionSource):
    """A folder of captioned clips (a ``.txt`` beside each or a ``metadata.jsonl``), as shards of ``shard_size``
    clips in path order; a shard's key hashes its clips' paths, sizes, times and captions and the sampling
    settings, so a changed clip or caption is encoded again."""

    def __init__(self, path, size, num_frames: int, fps: float = 0, crop: str = "center", seed: int = 0,
                 follow_links: bool = False, shard_size: int = FOLDER_SHARD):
        self.root = Path(path)
        self.height, self.width = _clip_size(size, "video clips")
        self.image_size = self.height if self.height == self.width else max(self.height, self.width)
        self.num_frames, self.fps, self.crop, self.seed = int(num_frames), float(fps), crop, seed
        self.follow_links, self.shard_size, self.name = follow_links, shard_size, self.root.name or "clips"
        read = _captions_from_metadata if (self.root / METADATA).exists() else \
            partial(_captions_from_txt, suffixes=VIDEO_SUFFIXES, what="video clips")
        self.clips = list(read(self.root, follow_links).items())
        self._keys = None

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def _key(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else str(p)

    def shard_keys(self) -> list[str]:
        if self._keys is None:
            settings = f"{self.height}x{self.width}x{self.num_frames}@{self.fps:g}:{self.crop}:{self.seed}"
            self._keys = []
            for start in range(0, len(self.clips), self.shard_size):
                h = hashlib.sha256(settings.encode())
                for p, caption in self.clips[start: start + self.shard_size]:
                    st = p.stat()
                    h.update(f"\0{self._key(p)}\0{st.st_size}\0{st.st_mtime_ns}\0{caption}".encode())
                self._keys.append(f"video:{h.hexdigest()[:32]}")
        return self._keys

    def _fit(self, data, size, crop, seed, key):
        return decode_clip(data, size, crop, seed, key, self.num_frames, self.fps)

    def read(self, shard: int, batch: int):
        clips = self.clips[shard * self.shard_size: (shard + 1) * self.shard_size]
        items = ((self._key(p), lambda p=p, c=c: (data_file(p, self.root, self.follow_links).read_bytes(), c))
                 for p, c in clips)
        return decoded_chunks(self, shard, items, batch, self._fit)


class VideoTarShards(TarShards):
    """webdataset shards whose samples are captioned clips; a shard's key adds the frame count and rate."""
    media = (VIDEO_KEYS, "video clip")

    def __init__(self, pattern: str, size, num_frames: int, fps: float = 0, crop: str = "center", seed: int = 0,
                 follow_links: bool = False):
        super().__init__(pattern, _clip_size(size, "webdataset shards of video clips"), crop, seed, follow_links)
        self.num_frames, self.fps = int(num_frames), float(fps)

    def _size_key(self) -> str:
        return f"{self.height}x{self.width}x{self.num_frames}@{self.fps:g}"

    def _fit(self, data, size, crop, seed, key):
        return decode_clip(data, size, crop, seed, key, self.num_frames, self.fps)

    def read(self, shard: int, batch: int):
        return decoded_chunks(self, shard, self._items(shard), batch, self._fit)


def is_video_folder(path: str) -> bool:
    """A folder holding ``.mp4`` / ``.webm`` clips and no images (a folder of both is read as images)."""
    root = Path(path)
    if not root.is_dir():
        return False
    found = False
    for p in root.rglob("*"):
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return False
        found = found or suffix in VIDEO_SUFFIXES
    return found


def is_video_tar(path: str) -> bool:
    """webdataset shards whose first sample holds a clip (an ``mp4`` / ``webm`` among its files)."""
    if not is_tar_pattern(path):
        return False
    try:  # a sniff: the loader applies data_file's rule (links out of the folder) itself
        with tarfile.open(tar_paths(path, follow_links=True)[0], "r:") as tar:
            names = [Path(m.name) for m in itertools.islice((m for m in tar if m.isfile()), 64)]
    except (OSError, ValueError, tarfile.TarError):
        return False  # the webdataset format says what is wrong with it
    if not names:
        return False
    key = lambda p: (p.parent, p.name.partition(".")[0])  # noqa: E731 - webdataset's sample key
    first = itertools.takewhile(lambda p: key(p) == key(names[0]), names)
    return any(p.name.partition(".")[2].lower() in VIDEO_KEYS for p in first)


def _open_folder(path: str, d, seed: int) -> StreamedCaptions:
    frames, fps = clip_options(d, path)
    return StreamedCaptions(VideoFolder(path, target_size(d), frames, fps, d.crop, seed, d.follow_links))


def _open_tars(path: str, d, seed: int) -> StreamedCaptions:
    frames, fps = clip_options(d, path)
    return StreamedCaptions(VideoTarShards(path, target_size(d), frames, fps, d.crop, seed, d.follow_links))


PATH_FORMATS.register("video_folder", PathFormat(
    claims=is_video_folder, load=_open_folder, order=5, video=True,
    what=f"a folder of .mp4 / .webm clips with captions, a .txt beside each or a {METADATA}"))
PATH_FORMATS.register("video_webdataset", PathFormat(
    claims=is_video_tar, load=_open_tars, order=5, video=True,
    what="webdataset .tar shards of clips (mp4 / webm with a txt or json caption)"))
