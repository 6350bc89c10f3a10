"""Scoring text-to-video samples of the moving Fashion-MNIST prompts ("a {colour} {item} moving {direction}")
offline, on three axes, each decided per video:

- item: an item classifier reads every frame's item: a window of the generator's item size (16x16) centred on the
  box of the frame's bright pixels, scaled back (bicubic) to 28x28 and padded to 32x32 (``item_crops``); the video's
  item is the majority of its frames. The classifier is trained on exactly such crops of single frames of the moving
  set (``load_moving_items``: items shrunk to 16x16, painted, placed, cropped back), not on the sharp 28x28 items:
  read through the crop, the sharp-item classifier of ``PromptScorer`` found the item of only 86-91% of real
  held-out clips;
- colour: ``PromptScorer``'s colour rule (mean chromaticity of the bright pixels, nearest named colour) per frame,
  majority of the frames;
- direction: the item's track, its intensity-weighted centroid per frame (pixels above ``BRIGHT``); the direction is
  the larger axis of the net displacement from the first frame to the last (None where a frame shows no item).

and on fidelity: the Frechet distance in the item classifier's features (of the item crops above) to held-out real
clips, per frame (every frame of every video a point; the default) or per video (the mean of its frames' features).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..data.dataset import Dataset
from ..data.fashion_colours import ITEM_NAMES
from ..data.moving_fashion import DIRECTION_NAMES, ITEM, fashion_item_pool, moving_fashion, parse_moving_prompt
from .classifier import load_or_train_classifier
from .metrics import frechet_distance
from .prompt_scores import BRIGHT, colour_of

FEATURES_PER = ("frame", "video")


def majority(votes: list) -> object:
    """The most common vote other than None (ties: the first of them to appear); None where all are None."""
    counts = Counter(v for v in votes if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _weights(videos: torch.Tensor) -> torch.Tensor:
    """Per-pixel item weights (N, F, H, W): intensity in [0, 1] (channel maximum) where above ``BRIGHT``, else 0."""
    peak = (videos.float().clamp(-1, 1).amax(1) + 1) / 2
    return peak * (peak > BRIGHT)


def centroids(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The intensity-weighted centroid (y, x) in pixels of each frame, (N, F, 2), and whether the frame shows any
    bright pixel, (N, F)."""
    w = _weights(videos)
    ys = torch.arange(w.shape[-2], dtype=w.dtype)[:, None]
    xs = torch.arange(w.shape[-1], dtype=w.dtype)[None, :]
    mass = w.sum((-2, -1))
    cy = (w * ys).sum((-2, -1)) / mass.clamp_min(1e-6)
    cx = (w * xs).sum((-2, -1)) / mass.clamp_min(1e-6)
    return torch.stack([cy, cx], -1), mass > 0


def direction_of(videos: torch.Tensor) -> list[str | None]:
    """Each video's direction from its net centroid displacement, first frame to last, along the larger axis."""
    c, seen = centroids(videos)
    d = c[:, -1] - c[:, 0]
    out = []
    for (dy, dx), ok in zip(d.tolist(), (seen[:, 0] & seen[:, -1]).tolist(), strict=True):
        if not ok or (dy == 0 and dx == 0):
            out.append(None)
        elif abs(dx) >= abs(dy):
            out.append("right" if dx > 0 else "left")
        else:
            out.append("down" if dy > 0 else "up")
    return out


def colour_of_video(videos: torch.Tensor) -> list[str | None]:
    """Each video's colour: the majority of ``colour_of`` over its frames."""
    n, _, f = videos.shape[:3]
    per_frame = colour_of(videos.transpose(1, 2).flatten(0, 1))
    return [majority(per_frame[i * f: (i + 1) * f]) for i in range(n)]


def box_centres(videos: torch.Tensor) -> torch.Tensor:
    """The centre (y, x) in pixels of each frame's bounding box of bright pixels, (N * F, 2) (the frame's centre
    where none is bright): Fashion-MNIST centres its items' boxes, not their mass."""
    bright = (_weights(videos) > 0).flatten(0, 1)
    out = []
    for axis in (2, 1):  # rows: any over x; columns: any over y
        seen = bright.any(axis)
        idx = torch.arange(seen.shape[1], dtype=torch.float32)
        first = torch.where(seen, idx, float("inf")).amin(1)
        last = torch.where(seen, idx, -float("inf")).amax(1)
        out.append(torch.where(seen.any(1), (first + last) / 2, (seen.shape[1] - 1) / 2))
    return torch.stack(out, -1)


def item_crops(videos: torch.Tensor, item: int = ITEM) -> torch.Tensor:
    """Every frame's item as the classifier sees items, (N * F, 1, 32, 32) grayscale in [-1, 1]: an ``item`` x
    ``item`` window centred on the box of the frame's bright pixels, resampled (bicubic) to 28x28, padded with
    black to 32x32."""
    n, _, f, h, w = videos.shape
    c = box_centres(videos)
    gray = (videos.float().clamp(-1, 1).amax(1).flatten(0, 1)[:, None] + 1) / 2  # (N*F, 1, H, W) in [0, 1]
    theta = torch.zeros(n * f, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = item / w, item / h
    theta[:, 0, 2] = (2 * c[:, 1] + 1) / w - 1
    theta[:, 1, 2] = (2 * c[:, 0] + 1) / h - 1
    grid = torch.nn.functional.affine_grid(theta, (n * f, 1, 28, 28), align_corners=False)
    crops = torch.nn.functional.grid_sample(gray, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return torch.nn.functional.pad(crops.clamp(0, 1), (2, 2, 2, 2)) * 2 - 1


def load_moving_items(per_split: tuple[int, int] = (48_000, 8_000)) -> Dataset:
    """What the video item classifier is trained on: ``item_crops`` of one frame of moving-set clips (drawn with
    fixed seeds from Fashion-MNIST's training and test items; all colours, positions and items), with their item
    labels, (n, 1, 32, 32) in [-1, 1]."""
    crops, labels = [], []
    for split, n, seed in (("train", per_split[0], 11), ("test", per_split[1], 12)):
        clips = moving_fashion(n, seed=seed, num_frames=2, items=fashion_item_pool(split))
        crops.append(item_crops(clips.videos[:, :, :1]))
        labels.append(clips.items)
    return Dataset("moving_fashion_items", crops[0], crops[1], labels[0], labels[1], len(ITEM_NAMES))


@torch.no_grad()
def item_of_video(net, videos: torch.Tensor) -> list[str | None]:
    """Each video's item: the majority of the classifier's per-frame items."""
    n, f = videos.shape[0], videos.shape[2]
    labels = net(item_crops(videos)).argmax(1).tolist()
    return [majority([ITEM_NAMES[k] for k in labels[i * f: (i + 1) * f]]) for i in range(n)]


@torch.no_grad()
def video_features(net, videos: torch.Tensor, per: str = "frame") -> torch.Tensor:
    """The item classifier's features of videos (N, 3, F, H, W) in [-1, 1], read on ``item_crops``: one row per
    frame, (N * F, D) (``per="frame"``), or per video the mean of its frames', (N, D) (``per="video"``)."""
    if per not in FEATURES_PER:
        raise ValueError(f"per must be one of {', '.join(FEATURES_PER)}, got {per!r}")
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (N, 3, F, H, W), got shape {tuple(videos.shape)}")
    feats = net.features(item_crops(videos))
    return feats if per == "frame" else feats.unflatten(0, videos.shape[:1] + videos.shape[2:3]).mean(1)


def video_frechet_distance(net, videos: torch.Tensor, reference: torch.Tensor, per: str = "frame") -> float:
    """The Frechet distance between ``videos`` and ``reference`` (held-out clips; any number of frames where
    ``per="frame"``) in the item classifier ``net``'s features (``video_features``)."""
    return frechet_distance(video_features(net, videos, per), video_features(net, reference, per))


def score_videos(videos: torch.Tensor, prompts: list[str], net=None) -> dict:
    """``{"item_acc", "colour_acc", "direction_acc"}`` for videos (N, 3, F, H, W) in [-1, 1] and their prompts;
    ``item_acc`` only where an item classifier ``net`` is given."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (N, 3, F, H, W), got shape {tuple(videos.shape)}")
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    wanted = [parse_moving_prompt(p) for p in prompts]
    n = len(prompts)
    out = {}
    if net is not None:
        out["item_acc"] = sum(i == w[1] for i, w in zip(item_of_video(net, videos), wanted, strict=True)) / n
    out["colour_acc"] = sum(c == w[0] for c, w in zip(colour_of_video(videos), wanted, strict=True)) / n
    out["direction_acc"] = sum(d == w[2] for d, w in zip(direction_of(videos), wanted, strict=True)) / n
    return out


class VideoScorer:
    """``scorer(videos, prompts) -> {"item_acc", "colour_acc", "direction_acc"}`` for the moving Fashion-MNIST
    prompts, with ``"fd"`` too where ``reference`` clips are given (``video_frechet_distance`` to them, ``per``
    frame or video); the item classifier is trained on ``load_moving_items`` (cached, trained on first use), or
    ``net`` where given."""

    directions = DIRECTION_NAMES

    def __init__(self, net=None, progress: bool = True, reference: torch.Tensor | None = None, per: str = "frame"):
        self.info = {}
        if net is None:
            net, self.info = load_or_train_classifier(load_moving_items(), progress=progress)
        self.net = net.eval()
        self.per = per
        self.reference_features = None if reference is None else video_features(self.net, reference.float(), per)

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        out = score_videos(videos, prompts, self.net)
        if self.reference_features is not None:
            out["fd"] = frechet_distance(video_features(self.net, videos.float(), self.per),
                                         self.reference_features)
        return out
