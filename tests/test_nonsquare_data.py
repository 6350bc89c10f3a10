"""Non-square training sizes (issue 32): ``data.height`` x ``data.width`` resize every captioned image to cover the
size keeping its aspect ratio, then crop to it, in caption folders, webdataset shards and Hugging Face datasets alike;
the latent cache keys and checks shapes on (height, width), SDXL's target-size time ids are (height, width), and a
latent teacher distils at that size. Square runs are unchanged."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import cmkit
from cmkit.cli.jobs import dataset_for, run_job
from cmkit.cli.recipes import DataSection, load_recipe
from cmkit.data import load_dataset, open_dataset

# (width, height) of each image: wider than 3:2, taller, square, exactly 3:2 larger
SIZES = {"wide": (100, 20), "tall": (20, 50), "square": (30, 30), "landscape": (40, 30), "exact": (48, 32)}
CAPTIONS = {"wide": "a red sneaker", "tall": "a green sneaker", "square": "a blue sneaker", "landscape": "a red bag",
            "exact": "a green bag"}  # one each, in the tiny teacher's vocabulary


def _rgb(name: str) -> np.ndarray:
    w, h = SIZES[name]
    rng = np.random.default_rng(list(SIZES).index(name))
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Five images of mixed aspect ratios, a .txt caption beside each (one distinct caption per image)."""
    root = tmp_path / "captioned"
    root.mkdir()
    for name in SIZES:
        (root / f"{name}.png").write_bytes(_png(_rgb(name)))
        (root / f"{name}.txt").write_text(CAPTIONS[name])
    return root


def _by_hand(arr: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """The image resized (bilinear) so it covers height x width keeping its aspect (scale = max(H/h, W/w)), then
    centre-cropped to height x width; with the crop's top and left."""
    h, w = arr.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = round(h * scale), round(w * scale)
    im = Image.fromarray(arr).resize((nw, nh), Image.BILINEAR)
    top, left = round((nh - height) / 2), round((nw - width) / 2)
    return np.asarray(im.crop((left, top, left + width, top + height))), top, left


def test_a_caption_folder_is_resized_to_cover_and_cropped_to_height_by_width(folder):
    ds = load_dataset(path=str(folder), height=16, width=24)
    assert ds.sample_shape == (3, 16, 24) and ds.test.shape[1:] == (3, 16, 24)
    images, captions = torch.cat([ds.train, ds.test]), ds.train_captions + ds.test_captions
    for name in ("landscape", "tall", "wide", "exact"):  # the width binds, the width, the height, both
        row = captions.index(CAPTIONS[name])
        expected, top, left = _by_hand(_rgb(name), 16, 24)
        ours = ((images[row].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(ours, expected)
        w, h = SIZES[name]
        if row < len(ds.train):  # (one image is held out)
            assert ds.train_sizes[row].tolist() == [h, w, top, left]  # SDXL's original size and crop
    # the cache's source hands the original sizes on
    chunk = next(ds.caption_source().read(0, 64))
    assert chunk.images.shape[1:] == (3, 16, 24) and torch.equal(chunk.sizes, ds.train_sizes)
    # a random crop: the same size, drawn from the seed (the same twice), within the resized image
    random = [open_dataset(DataSection(path=str(folder), height=16, width=24, crop="random"), seed=3)
              for _ in range(2)]
    assert random[0].sample_shape == (3, 16, 24) and torch.equal(random[0].train, random[1].train)


def test_square_sizes_are_read_as_data_image_size_reads_them(folder):
    """height == width is data.image_size's square (a caption folder squashed to it, as it always was)."""
    square = load_dataset(path=str(folder), image_size=16)
    assert square.train_sizes is None
    for same in (load_dataset(path=str(folder), height=16, width=16),
                 load_dataset(path=str(folder), image_size=16, height=16, width=16)):
        assert torch.equal(same.train, square.train) and same.train_captions == square.train_captions
        assert same.train_sizes is None


def _tars(root) -> None:
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name in SIZES:
            for ext, data in (("png", _png(_rgb(name))), ("txt", f"a {name}".encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_crop_to_height_by_width_and_key_on_it(tmp_path):
    _tars(tmp_path / "shards")
    data = open_dataset(DataSection(path=str(tmp_path / "shards"), height=16, width=24))
    assert data.sample_shape == (3, 16, 24) and data.caption_source().size == (16, 24)
    chunk = next(data.caption_source().read(0, 64))
    assert chunk.images.shape == (len(SIZES), 3, 16, 24) and not chunk.skipped
    row = chunk.captions.index("a landscape")
    expected, top, left = _by_hand(_rgb("landscape"), 16, 24)
    ours = ((chunk.images[row].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, expected)
    assert chunk.sizes[row].tolist() == [30, 40, top, left]
    (key,) = data.caption_source().shard_keys()
    assert key.endswith(":16x24:center:0")
    square = open_dataset(DataSection(path=str(tmp_path / "shards"), image_size=16)).caption_source()
    assert square.size == (16, 16) and square.shard_keys()[0].endswith(":16:center:0")  # as before: caches valid
    same = open_dataset(DataSection(path=str(tmp_path / "shards"), height=16, width=16)).caption_source()
    assert same.shard_keys() == square.shard_keys()


def test_sdxl_target_size_time_ids_are_height_by_width(tmp_path):
    from safetensors.torch import load_file

    from cmkit.data.latent_cache import _write_shard

    def encoder(prompts, negatives=None):
        n = len(prompts)
        return {"prompt_embeds": torch.zeros(n, 2, 3), "negative_prompt_embeds": torch.zeros(n, 2, 3),
                "add_time_ids": torch.zeros(n, 6)}

    acc = {"mean": [torch.zeros(1, 4, 4, 6)], "std": [torch.ones(1, 4, 4, 6)], "captions": ["a bag"],
           "sizes": [torch.tensor([[30, 40, 1, 0]])], "skipped": []}
    _write_shard(tmp_path / "s.safetensors", "k", acc, encoder, 8, (16, 24))
    assert load_file(tmp_path / "s.safetensors")["add_time_ids"].tolist() == [[30, 40, 1, 0, 16, 24]]


@pytest.mark.parametrize(("sets", "message"), [
    (["data.height=16"], r"^data.height = 16 needs data.width too"),
    (["data.width=24"], r"^data.width = 24 needs data.height too"),
    (["data.height=-16", "data.width=24"], r"^data.height must be a positive number of pixels"),
    (["data.height=16", "data.width=-1"], r"^data.width must be a positive number of pixels"),
    (["data.image_size=32", "data.height=16", "data.width=24"],
     r"^data.image_size = 32 disagrees with data.height x data.width = 16x24"),
    (["data.image_size=16", "data.height=16", "data.width=24"], r"^data.image_size = 16 disagrees"),
])
def test_bad_sizes_are_one_line_errors(sets, message):
    recipe = load_recipe(None, sets)
    with pytest.raises(ValueError, match=message) as e:
        dataset_for(recipe)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        load_dataset(path=".", image_size=recipe.data.image_size, height=recipe.data.height,
                     width=recipe.data.width)


def test_sizes_a_source_cannot_take_are_one_line_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("a", "b"):
        (plain / f"{name}.png").write_bytes(_png(_rgb("square")))
    with pytest.raises(ValueError, match=r"^data.height x data.width = 16x24: plain image folders are resized to "
                                         "squares only"):
        load_dataset(path=str(plain), height=16, width=24)
    with pytest.raises(ValueError, match=r"^data.height / data.width size images read from data.path"):
        load_dataset("digits", height=8, width=8)


def test_an_sd3_teacher_distils_at_a_non_square_data_size(folder, tmp_path, monkeypatch):
    """A flow_cd_lora run of a tiny SD3 teacher (32 px by default) on a caption folder read at 16x24: the teacher
    samples at the data's size, and the exported student samples 16x24 images."""
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    tiny_sd3_pipeline(seed=7).save_pretrained(tmp_path / "teacher")
    recipe = load_recipe(None, ['objective.kind="flow_cd_lora"', "objective.num_grid_steps=4", "train.batch_size=2",
                                "train.steps=1", "train.ema_rates=[]", "objective.lora_rank=2",
                                "objective.lora_alpha=2.0", f'data.path="{folder}"', "data.height=16",
                                "data.width=24"])
    run_job("distill", recipe, tmp_path / "run", str(tmp_path / "teacher"), progress=False)
    student = cmkit.load_model(tmp_path / "run" / "model")
    assert student.sample_shape == (4, 4, 6)
    images = cmkit.text_to_image(student, ["a red sneaker", "a green bag"], steps=1,
                                 generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 24) and torch.isfinite(images).all()
