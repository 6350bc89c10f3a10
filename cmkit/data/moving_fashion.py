"""Moving coloured Fashion-MNIST with prompts: a toy captioned video set cmkit generates offline, built so that
prompt adherence is measurable on three axes, the item (a classifier per frame), the colour (a rule per frame) and
the direction (the item's track).

Each video holds one Fashion-MNIST item (the eight classes of ``fashion_colours``), its 28x28 image shrunk to
``ITEM`` x ``ITEM`` (16: area averaging), moving in a straight line across a ``FRAME`` x ``FRAME`` (32) frame over
``num_frames`` frames (9; 2 to 17) in one of four directions, painted as ``fashion_colours.paint`` paints images
(``rgb = intensity * colour``) on a black background; its caption is ``"a {colour} {item} moving {direction}"``.
The item stays whole inside the frame: it starts within ``MARGIN`` pixels of one side and ends within ``MARGIN`` of
the other (a travel of 8 to 16 pixels), at a fixed position across the other axis, each frame on whole pixels. Every
draw comes from one seed, so a seed gives the same videos.

Videos are (N, 3, F, 32, 32) in [-1, 1]. ``write_clip_folder`` and ``write_clip_shards`` save them as a captioned
folder of ``.mp4`` clips with ``.txt`` captions and as webdataset ``.tar`` shards (``mp4`` + ``txt``), which the video
path (``data.path`` with ``data.num_frames``) reads back; clips are ``mpeg4`` in ``.mp4`` (PyAV, the ``video``
extra) at ``fps`` frames a second.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset
from .fashion_colours import COLOUR_NAMES, ITEM_NAMES, load_fashion_items, paint
from .images import FASHION_DIR
from .video_clips import _av

FRAME, ITEM, MARGIN = 32, 16, 4
MAX_FRAMES = 17
# direction -> the unit step (dy, dx) in image coordinates (y down)
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIRECTION_NAMES = list(DIRECTIONS)


def moving_prompt(colour: str, item: str, direction: str) -> str:
    return f"a {colour} {item} moving {direction}"


def all_moving_prompts() -> list[str]:
    """Every prompt of the set, item-major, then colour, then direction."""
    return [moving_prompt(c, i, d) for i in ITEM_NAMES for c in COLOUR_NAMES for d in DIRECTION_NAMES]


def parse_moving_prompt(text: str) -> tuple[str, str, str]:
    """``"a red sneaker moving left"`` -> ``("red", "sneaker", "left")``; a one-line error for anything else."""
    words = text.strip().split(" ")
    ok = (len(words) == 5 and words[0] == "a" and words[1] in COLOUR_NAMES and words[2] in ITEM_NAMES
          and words[3] == "moving" and words[4] in DIRECTIONS)
    if not ok:
        raise ValueError(f"{text!r} is not a prompt of the moving Fashion-MNIST set: expected 'a COLOUR ITEM moving "
                         f"DIRECTION' with COLOUR in {', '.join(COLOUR_NAMES)}, ITEM in {', '.join(ITEM_NAMES)} and "
                         f"DIRECTION in {', '.join(DIRECTION_NAMES)}")
    return words[1], words[2], words[4]


@dataclass
class MovingFashion:
    videos: torch.Tensor        # (N, 3, F, 32, 32) in [-1, 1]
    captions: list[str]
    items: torch.Tensor         # (N,) 0..7 as ITEM_NAMES
    colours: torch.Tensor       # (N,) 0..4 as COLOUR_NAMES
    directions: torch.Tensor    # (N,) 0..3 as DIRECTION_NAMES


def shrink(gray: torch.Tensor, size: int = ITEM) -> torch.Tensor:
    """Grayscale items (n, 1, h, w) in [-1, 1] shrunk to (n, 1, size, size) by area averaging."""
    return torch.nn.functional.interpolate(gray.float(), size=(size, size), mode="area").clamp(-1, 1)


def fashion_item_pool(split: str = "train", root=FASHION_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The 28x28 grayscale items of Fashion-MNIST's ``split`` ("train" or "test") and their labels (0..7), from
    Debian's ``dataset-fashion-mnist`` (``load_fashion_mnist``'s one-line error where it is not installed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = load_fashion_items(root)
    gray, labels = (d.train, d.train_labels) if split == "train" else (d.test, d.test_labels)
    return gray[:, :, 2:30, 2:30], labels  # the items are padded to 32: their own 28x28 back


def _tracks(rng: np.random.Generator, n: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Directions (n,) and the item's top-left corner per frame (n, F, 2) in whole pixels (y, x)."""
    span = FRAME - ITEM
    directions = rng.integers(0, len(DIRECTIONS), n)
    start = rng.integers(0, MARGIN + 1, n)
    end = span - rng.integers(0, MARGIN + 1, n)
    across = rng.integers(0, span + 1, n)
    t = np.linspace(0, 1, num_frames)[None, :]
    along = np.rint(start[:, None] + (end - start)[:, None] * t).astype(np.int64)
    corners = np.empty((n, num_frames, 2), dtype=np.int64)
    for k, name in enumerate(DIRECTION_NAMES):
        rows = directions == k
        dy, dx = DIRECTIONS[name]
        axis = 0 if dy else 1
        path = along[rows] if (dy + dx) > 0 else span - along[rows]
        corners[rows, :, axis] = path
        corners[rows, :, 1 - axis] = across[rows, None]
    return directions, corners


def moving_fashion(n: int, seed: int = 0, num_frames: int = 9, items: tuple[torch.Tensor, torch.Tensor] | None = None,
                   split: str = "train", root=FASHION_DIR) -> MovingFashion:
    """``n`` captioned videos drawn from ``seed``: items (with replacement), colours, directions and tracks.
    ``items``: (gray (m, 1, h, w) in [-1, 1], labels (m,) 0..7) to draw from; default Fashion-MNIST's ``split``."""
    if not 2 <= int(num_frames) <= MAX_FRAMES:
        raise ValueError(f"num_frames must be 2 to {MAX_FRAMES} (an item needs two frames to move), got {num_frames}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gray, labels = items if items is not None else fashion_item_pool(split, root)
    small = shrink(gray)
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.integers(0, len(small), n))
    colours = torch.from_numpy(rng.integers(0, len(COLOUR_NAMES), n))
    directions, corners = _tracks(rng, n, int(num_frames))
    canvas = torch.full((n, num_frames, 1, FRAME, FRAME), -1.0)
    for i in range(n):
        for f in range(num_frames):
            y, x = corners[i, f].tolist()
            canvas[i, f, :, y: y + ITEM, x: x + ITEM] = small[pick[i]]
    painted = paint(canvas.flatten(0, 1), colours.repeat_interleave(num_frames))
    videos = painted.unflatten(0, (n, num_frames)).transpose(1, 2).contiguous()
    item_idx = labels[pick].long()
    captions = [moving_prompt(COLOUR_NAMES[c], ITEM_NAMES[i], DIRECTION_NAMES[d])
                for c, i, d in zip(colours.tolist(), item_idx.tolist(), directions.tolist(), strict=True)]
    return MovingFashion(videos, captions, item_idx, colours, torch.from_numpy(directions))


def encode_mp4(video: torch.Tensor, fps: int = 8, bit_rate: int = 4_000_000) -> bytes:
    """One video (3, F, H, W) in [-1, 1] as the bytes of an ``mpeg4`` ``.mp4`` clip at ``fps``."""
    av = _av()
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = frames.shape[2], frames.shape[1], "yuv420p", bit_rate
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _check(videos: torch.Tensor, captions: list[str]) -> None:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (N, 3, F, H, W), got shape {tuple(videos.shape)}")
    if len(captions) != len(videos):
        raise ValueError(f"{len(captions)} captions for {len(videos)} videos; every video needs one caption")


def write_clip_folder(videos: torch.Tensor, captions: list[str], folder, fps: int = 8) -> list[Path]:
    """Each video as ``{i:05d}.mp4`` with its caption in ``{i:05d}.txt`` in ``folder`` (made if missing)."""
    _check(videos, captions)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (video, caption) in enumerate(zip(videos, captions, strict=True)):
        (root / f"{i:05d}.mp4").write_bytes(encode_mp4(video, fps))
        (root / f"{i:05d}.txt").write_text(caption)
        paths.append(root / f"{i:05d}.mp4")
    return paths


def write_clip_shards(videos: torch.Tensor, captions: list[str], folder, per_shard: int = 1000,
                      fps: int = 8) -> list[Path]:
    """The videos as webdataset shards ``{k:05d}.tar`` in ``folder``, ``per_shard`` samples each, a sample
    ``{i:05d}.mp4`` + ``{i:05d}.txt``."""
    _check(videos, captions)
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(videos), per_shard)):
        shards.append(root / f"{k:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for i in range(start, min(len(videos), start + per_shard)):
                for ext, payload in (("mp4", encode_mp4(videos[i], fps)), ("txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return shards


TRAIN_CLIPS, TEST_CLIPS = 16_000, 1_000


@DATASETS.register("moving_fashion")
def load_moving_fashion(root=FASHION_DIR) -> Dataset:
    """The moving Fashion-MNIST set in memory: ``TRAIN_CLIPS`` captioned 9-frame clips drawn from Fashion-MNIST's
    training items and ``TEST_CLIPS`` from its test items (fixed seeds), (N, 3, 9, 32, 32) in [-1, 1] with item
    labels; what the shipped tiny video teacher (``cmkit:tiny-wan``) was trained on. About 1.9 GB as float32."""
    train = moving_fashion(TRAIN_CLIPS, TRAIN_SEED, items=fashion_item_pool("train", root))
    test = moving_fashion(TEST_CLIPS, TEST_SEED, items=fashion_item_pool("test", root))
    return Dataset("moving_fashion", train.videos, test.videos, train.items, test.items, len(ITEM_NAMES),
                   train.captions, test.captions)
