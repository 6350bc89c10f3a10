"""A ``data.path`` format is one loader plus one registration: a toy format registered from this file alone (a
``.toycap`` file, a line per sample: a colour and a caption) is found by the dispatch ahead of the built-in formats,
and a 3-step LCM-LoRA run of the shipped tiny text-to-image teacher trains on its samples through the latent cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.data import PATH_FORMATS, Dataset, PathFormat, load_dataset
from cmkit.data.formats import asking_order, path_format

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def load_toycap(path, d, seed) -> Dataset:
    """A ``.toycap`` file: ``colour<TAB>caption`` a line, each a solid ``data.image_size`` square (32 if unset) of
    that colour; the last line held out."""
    rows = [line.split("\t", 1) for line in Path(path).read_text().splitlines() if line.strip()]
    size = d.image_size or 32
    x = torch.stack([torch.tensor(COLOURS[c]).view(3, 1, 1).expand(3, size, size) for c, _ in rows])
    captions = [caption for _, caption in rows]
    return Dataset(Path(path).stem, x[:-1], x[-1:], train_captions=captions[:-1], test_captions=captions[-1:])


PATH_FORMATS.register("toycap", PathFormat(claims=lambda path: str(path).endswith(".toycap"), load=load_toycap,
                                           what="a .toycap file of colours and captions"))


@pytest.fixture
def toycap(tmp_path):
    lines = [(c, f"a {c} {item}") for item in ("bag", "boot", "dress", "sneaker") for c in COLOURS]  # 11 to train on
    path = tmp_path / "squares.toycap"
    path.write_text("".join(f"{c}\t{caption}\n" for c, caption in lines))
    return path, [caption for _, caption in lines]


def test_a_registered_format_is_asked_first_and_named_in_the_unknown_path_error(toycap, tmp_path):
    path, captions = toycap
    assert asking_order()[0] == "toycap" and asking_order()[-2:] == ["image_folder", "npy"]
    assert path_format(str(path)) == "toycap"  # not the .npy reader, which takes any other file
    data = load_dataset(path=str(path))
    assert data.train_captions == captions[:-1] and data.sample_shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"does not exist; data.path takes: toycap \(a .toycap file"):
        load_dataset(path=str(tmp_path / "no-such-folder"))


def test_lcm_lora_trains_on_a_format_registered_here(toycap, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    path, captions = toycap
    recipe = load_recipe("tiny-t2i-lcm-lora", [f'data.path="{path}"', "train.steps=3", "train.batch_size=2",
                                               "train.log_every=1", "train.checkpoint_every=3", "train.warmup=0",
                                               "objective.lora_rank=2", "objective.lora_alpha=2.0",
                                               "eval.schedule_max_steps=0"])
    run_job("distill", recipe, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model" / "pytorch_lora_weights.safetensors").is_file()
    (shard,) = (tmp_path / "cache" / "latents").glob("*.safetensors")  # 11 images: one shard
    with safe_open(shard, "pt") as f:
        meta, rows = f.metadata(), f.get_slice("mean").get_shape()[0]
    assert json.loads(meta["captions"]) == sorted(captions[:-1]) and rows == 11
