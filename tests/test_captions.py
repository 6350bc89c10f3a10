"""Caption data sources, the coloured Fashion-MNIST prompts and their scorer's colour rule, and the latent cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.data import load_dataset
from cmkit.data.captions import load_caption_folder
from cmkit.data.fashion_colours import COLOURS, all_prompts, intensity, paint, parse_prompt


def _images(folder, n, size=8):
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_txt_captions(tmp_path):
    for i, name in enumerate(_images(tmp_path, 5)):
        (tmp_path / name).with_suffix(".txt").write_text(f"caption {i}\n")
    d = load_caption_folder(tmp_path)
    assert d.train.shape == (4, 3, 8, 8) and len(d.train_captions) == 4 and len(d.test_captions) == 1
    assert sorted(d.train_captions + d.test_captions) == [f"caption {i}" for i in range(5)]
    # captions stay with their images
    first = np.asarray(Image.open(tmp_path / "img0.png"), dtype=np.float32) / 127.5 - 1
    all_x = torch.cat([d.train, d.test])
    caps = d.train_captions + d.test_captions
    row = [i for i, x in enumerate(all_x) if torch.allclose(x, torch.from_numpy(first).permute(2, 0, 1))][0]
    assert caps[row] == "caption 0"
    # load_dataset finds a caption folder by itself
    assert load_dataset(path=str(tmp_path)).train_captions is not None


def test_metadata_jsonl(tmp_path):
    names = _images(tmp_path, 3)
    rows = [{"file_name": n, "text": f"a picture number {i}"} for i, n in enumerate(names)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = load_caption_folder(tmp_path, size=4)
    assert d.train.shape == (2, 3, 4, 4)
    assert set(d.train_captions + d.test_captions) == {r["text"] for r in rows}


def test_caption_folder_errors(tmp_path):
    names = _images(tmp_path, 3)
    (tmp_path / names[0]).with_suffix(".txt").write_text("only one")
    with pytest.raises(FileNotFoundError, match="2 of 3 images .* have no caption"):
        load_caption_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="names 1 images that are not there"):
        load_caption_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file": "img0.png"}\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object with 'file_name' and 'text'"):
        load_caption_folder(tmp_path)


def test_prompts_paint_and_colour_rule():
    from cmkit.eval.prompt_scores import colour_of

    assert len(all_prompts()) == 40 and parse_prompt("a red sneaker") == ("red", "sneaker")
    with pytest.raises(ValueError, match="not a prompt of the coloured Fashion-MNIST set"):
        parse_prompt("a purple sneaker")
    gray = torch.rand(5, 1, 8, 8) * 2 - 1
    painted = paint(gray, torch.arange(5))
    assert torch.allclose(intensity(painted), gray, atol=1e-6)  # every colour has a channel at 1
    assert colour_of(painted) == list(COLOURS)
    assert colour_of(-torch.ones(1, 3, 8, 8)) == [None]


def test_latent_cache_reads_back_and_keys_on_weights(tmp_path, monkeypatch):
    from cmkit.data.latent_cache import cache_root, encode_set
    from cmkit.latent.families.unet import tiny_pipeline

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path))
    model = tiny_pipeline("sd")
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    caps = ["a red sneaker", "a green bag"] * 3
    first = encode_set(model.vae, model.prompt_encoder, x, caps, progress=False)
    assert len(list(cache_root().glob("*.safetensors"))) == 1
    assert first.embeds["prompt_embeds"].shape[0] == 2  # one row per distinct caption
    calls = []
    hook = model.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    again = encode_set(model.vae, model.prompt_encoder, x, caps, progress=False)
    assert not calls and torch.equal(again.mean, first.mean)
    assert torch.equal(again.cond(torch.tensor([1]))["prompt_embeds"], model.encode_prompt(["a green bag"])[
        "prompt_embeds"])
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.add_(1.0)  # other VAE weights: another key
    encode_set(model.vae, model.prompt_encoder, x, caps, progress=False)
    hook.remove()
    assert calls and len(list(cache_root().glob("*.safetensors"))) == 2
    with pytest.raises(ValueError, match="5 captions for 6 images"):
        encode_set(model.vae, model.prompt_encoder, x, caps[:5], progress=False)
