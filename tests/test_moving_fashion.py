"""Issue 33, the toy captioned video set and its prompt scorer: moving coloured Fashion-MNIST items
(``cmkit.data.moving_fashion``) and ``cmkit.eval.video_scores`` (item per frame by the offline classifier, colour per
frame by PromptScorer's rule, direction from the item's track).

Fashion-MNIST (Debian's ``dataset-fashion-mnist``) is not needed: the generator takes any pool of grayscale items,
and the tests hand it synthetic ones (discs of eight brightness levels standing for the eight classes) with a
stand-in classifier that reads the level. The real items and the real classifier are tested only where the package
is installed."""

from __future__ import annotations

import pytest
import torch

from cmkit.data import FASHION_DIR
from cmkit.data.moving_fashion import (
    DIRECTION_NAMES,
    ITEM,
    MAX_FRAMES,
    moving_fashion,
    parse_moving_prompt,
    shrink,
    write_clip_folder,
    write_clip_shards,
)
from cmkit.eval.video_scores import colour_of_video, direction_of, item_crops, item_of_video, score_videos

LEVELS = torch.linspace(0.35, 1.0, 8)  # intensity of each synthetic class, in [0, 1]


def synthetic_items() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 28x28 items per class: filled ellipses (round and tall) of the class's intensity, in [-1, 1]."""
    y, x = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    shapes = [(x / 11) ** 2 + (y / 11) ** 2 <= 1, (x / 7) ** 2 + (y / 12) ** 2 <= 1]
    gray = torch.stack([torch.where(s, LEVELS[k], 0.0) for k in range(8) for s in shapes])[:, None] * 2 - 1
    return gray, torch.arange(8).repeat_interleave(2)


class LevelNet(torch.nn.Module):
    """A stand-in item classifier: the class whose level is nearest the median of the image's bright pixels (the
    median: resampling rings at the item's edge)."""

    def forward(self, x):
        v = ((x + 1) / 2).flatten(1)
        level = torch.stack([row[row > 0.25].median() if (row > 0.25).any() else row.new_tensor(0.0) for row in v])
        return -(level[:, None] - LEVELS[None, :]).abs()


@pytest.fixture(scope="module")
def toy():
    return moving_fashion(48, seed=7, items=synthetic_items())


def test_generator_is_seeded_shaped_and_captioned(toy):
    again = moving_fashion(48, seed=7, items=synthetic_items())
    assert torch.equal(toy.videos, again.videos) and toy.captions == again.captions
    other = moving_fashion(48, seed=8, items=synthetic_items())
    assert not torch.equal(toy.videos, other.videos)
    assert toy.videos.shape == (48, 3, 9, 32, 32)
    assert toy.videos.min() >= -1 and toy.videos.max() <= 1
    assert (toy.videos[:, :, :, 0, 0] == -1).float().mean() > 0.5  # a dark background
    for cap, d in zip(toy.captions, toy.directions.tolist(), strict=True):
        assert parse_moving_prompt(cap)[2] == DIRECTION_NAMES[d]
    assert set(toy.directions.tolist()) == {0, 1, 2, 3}
    # the frame count is a parameter, 2 to 17
    assert moving_fashion(3, seed=0, num_frames=MAX_FRAMES, items=synthetic_items()).videos.shape[2] == MAX_FRAMES
    with pytest.raises(ValueError, match="num_frames must be 2 to 17"):
        moving_fashion(3, num_frames=18, items=synthetic_items())
    with pytest.raises(ValueError, match="not a prompt of the moving"):
        parse_moving_prompt("a red sneaker moving sideways")


def test_the_scorer_follows_the_generator_and_a_shuffled_control_does_not(toy):
    scores = score_videos(toy.videos, toy.captions, LevelNet())
    assert scores == {"item_acc": 1.0, "colour_acc": 1.0, "direction_acc": 1.0}
    assert "item_acc" not in score_videos(toy.videos, toy.captions)
    # shuffled captions: direction near chance (1 in 4), so the scorer is not trivially right
    perm = torch.randperm(len(toy.captions), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = score_videos(toy.videos, [toy.captions[i] for i in perm], LevelNet())
    assert shuffled["direction_acc"] < 0.5 and shuffled["item_acc"] < 0.5 and shuffled["colour_acc"] < 0.5
    # played backwards, every video moves the other way
    assert score_videos(toy.videos.flip(2), toy.captions)["direction_acc"] == 0.0
    assert direction_of(torch.full((1, 3, 4, 32, 32), -1.0)) == [None]  # no item, no direction


def test_item_crops_give_the_classifier_its_own_framing():
    gray, labels = synthetic_items()
    gray, labels = gray[::2], labels[::2]  # the round items, one per class: centred in their 28x28 box
    m = moving_fashion(8, seed=1, items=(gray, labels))
    crops = item_crops(m.videos).unflatten(0, (8, 9))
    assert crops.shape == (8, 9, 1, 32, 32) and ITEM == 16
    # each frame's crop is the 28x28 item padded to 32, as the classifier was trained on: exactly the shrunk item
    # scaled back up (on whole-pixel tracks the window sits on the item), within the shrink's blur of the item itself
    F = torch.nn.functional
    pool = F.pad(gray, (2, 2, 2, 2), value=-1.0)
    blurred = F.pad(F.interpolate(shrink(gray), size=(28, 28), mode="bicubic", align_corners=False).clamp(-1, 1),
                    (2, 2, 2, 2), value=-1.0)
    for i in range(8):
        assert (crops[i] - blurred[m.items[i]]).abs().max() < 1e-4
        assert (crops[i] - blurred[m.items[i]].roll(1, -1)).abs().max() > 0.1  # a window a pixel off is caught
        assert (crops[i] - pool[m.items[i]]).abs().mean() < 0.15


def test_majority_votes_over_frames(toy):
    v = toy.videos[:4].clone()
    v[:, :, :3] = -1.0  # three of nine frames blank: the other six still decide
    assert colour_of_video(v) == [parse_moving_prompt(c)[0] for c in toy.captions[:4]]
    assert item_of_video(LevelNet(), v) == [parse_moving_prompt(c)[1] for c in toy.captions[:4]]


def _section(path, **kw):
    from cmkit.cli.recipes import DataSection

    return DataSection(path=str(path), image_size=32, num_frames=9, **kw)


def _read_back(path) -> tuple[torch.Tensor, list[str], list[str]]:
    from cmkit.data import open_dataset

    data = open_dataset(_section(path))
    source = data.caption_source()
    chunks = [c for shard in range(len(source.shard_keys())) for c in source.read(shard, 16)]
    return (torch.cat([c.images for c in chunks]), [x for c in chunks for x in c.captions],
            [x for c in chunks for x in c.skipped])


@pytest.mark.parametrize("writer", ["folder", "shards"])
def test_writers_read_back_through_the_video_path(tmp_path, writer):
    pytest.importorskip("av")
    m = moving_fashion(6, seed=3, items=synthetic_items())
    if writer == "folder":
        write_clip_folder(m.videos, m.captions, tmp_path / "clips")
        path = tmp_path / "clips"
    else:
        shards = write_clip_shards(m.videos, m.captions, tmp_path / "shards", per_shard=4)
        assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
        path = tmp_path / "shards"
    x, captions, skipped = _read_back(path)
    assert not skipped and captions == m.captions and x.shape == m.videos.shape
    err = (x - m.videos).abs()
    assert err.mean() < 0.03 and err.mean((1, 3, 4)).max() < 0.06, (err.mean(), err.mean((1, 3, 4)).max())
    # the decoded clips still move and are coloured as their captions say (the stand-in classifier's levels, 0.09
    # apart, are finer than the codec's error: the item axis is checked before encoding)
    assert score_videos(x, captions) == {"colour_acc": 1.0, "direction_acc": 1.0}


def _classifier_cached() -> bool:
    from cmkit.eval.classifier import cache_dir

    return any(cache_dir().glob("fashion*.safetensors"))


# the item classifier trains on first use (about 5 minutes on this CPU): the suite checks it where one is cached
# (after `cmkit bench text-to-image`, or the benchmark that trains it), not where the check would first train it
@pytest.mark.skipif(not FASHION_DIR.is_dir() or not _classifier_cached(),
                    reason="Debian's dataset-fashion-mnist is not installed, or its item classifier is not trained")
def test_real_items_score_as_their_captions_say():
    from cmkit.eval.video_scores import VideoScorer

    m = moving_fashion(64, seed=0, split="test")
    assert torch.equal(m.videos, moving_fashion(64, seed=0, split="test").videos)
    scores = VideoScorer(progress=False)(m.videos, m.captions)
    # measured here: 0.92 item on these 64 (0.90 on 1,024): the classifier reads 94% of the items at 28x28 and about
    # 89.5% once shrunk to 16x16 and scaled back, the ceiling of a classifier trained on full-size items
    assert scores["direction_acc"] == 1.0 and scores["colour_acc"] >= 0.9 and scores["item_acc"] >= 0.85, scores
