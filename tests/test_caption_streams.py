"""Captioned images streamed from webdataset tars and Hugging Face datasets into the sharded on-disk latent
cache: images prepared as torchvision's transforms prepare them, corrupt samples skipped and counted, two processes
encoding disjoint shares, a killed encode resumed without re-encoding finished shards, batches drawn from the on-disk
shards equal to the same draws from the whole set, and LCM runs on both sources resuming exactly."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.unet import tiny_pipeline

CAPTIONS = ["a red bag", "a green boot", "a blue bag", "a red boot"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three tars of 8 samples (one sample's PNG cut short), the same 24 images as an image folder with a
    metadata.jsonl (one file cut short there too), and a tiny SD teacher."""
    root = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(24)]
    (root / "shards").mkdir()
    (root / "folder").mkdir()
    rows = []
    for s in range(3):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for i in range(8 * s, 8 * s + 8):
                png = _png(images[i])
                if i == 13:
                    png = png[:40]  # a damaged image
                _add(tar, f"{i:04d}.png", png)
                _add(tar, f"{i:04d}.txt", CAPTIONS[i % 4].encode())
                (root / "folder" / f"{i:04d}.png").write_bytes(png)
                rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": CAPTIONS[i % 4]}))
    (root / "folder" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    tiny_pipeline("sd", texts=CAPTIONS, seed=1, image_size=16).save_pretrained(root / "teacher")
    return root


def _source(data, **kw):
    from cmkit.cli.recipes import DataSection
    from cmkit.data import open_dataset

    d = DataSection(image_size=16, **kw)
    return open_dataset(d).source


def test_images_are_prepared_as_torchvision_prepares_them():
    """Short side resized to the size, then cropped: against torchvision's Resize + CenterCrop on the same PIL
    image; a random crop lies inside the image and repeats for the same sample key."""
    from torchvision import transforms

    from cmkit.data.caption_sources import fit_image

    rng = np.random.default_rng(1)
    for h, w in ((20, 36), (40, 24), (16, 16)):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        want = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(16)])(Image.fromarray(arr))
        got, sizes = fit_image(_png(arr), 16, "center", 0, "k")
        assert np.array_equal(got, np.asarray(want)) and sizes[:2] == (h, w)
        a, (_, _, top, left) = fit_image(_png(arr), 16, "random", 3, "sample-7")
        b, again = fit_image(_png(arr), 16, "random", 3, "sample-7")
        nh, nw = (16, int(16 * w / h)) if w > h else (int(16 * h / w), 16)
        assert np.array_equal(a, b) and again[2:] == (top, left) and 0 <= top <= nh - 16 and 0 <= left <= nw - 16


@pytest.mark.parametrize("kind", ["webdataset", "imagefolder"])
def test_every_readable_sample_is_read_once_and_the_damaged_one_is_counted(data, kind):
    src = (_source(data, path=str(data / "shards")) if kind == "webdataset"
           else _source(data, hf_dataset="imagefolder", path=str(data / "folder"), shard_size=10))
    chunks = [c for i in range(len(src.shard_keys())) for c in src.read(i, 5)]
    captions = [c for ch in chunks for c in ch.captions]
    skipped = [s for ch in chunks for s in ch.skipped]
    assert len(captions) == 23 and len(skipped) == 1 and "0013" in skipped[0]
    assert sorted(captions) == sorted(CAPTIONS[i % 4] for i in range(24) if i != 13)
    x = torch.cat([ch.images for ch in chunks])
    assert x.shape == (23, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert all(ch.last == (ch is [c for c in chunks if c.shard == ch.shard][-1]) for ch in chunks)


def _encode(data, src, monkeypatch, tmp_path, rank_world=(0, 1)):
    import cmkit.data.latent_cache as lc
    from cmkit import load_teacher

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lc, "rank_world", lambda: rank_world)
    monkeypatch.setattr(lc, "barrier", lambda: None)
    t = load_teacher(str(data / "teacher"))
    return lc.encode_source(t.vae, t.prompt_encoder, src, batch_size=3, progress=False)


def test_two_processes_encode_disjoint_shares_and_a_killed_encode_keeps_its_finished_shards(data, tmp_path,
                                                                                           monkeypatch):
    import cmkit.data.latent_cache as lc

    src = _source(data, path=str(data / "shards"))
    read = {0: [], 1: []}
    real = src.read
    for rank in (0, 1):
        monkeypatch.setattr(src, "read", lambda i, b, r=rank: (read[r].append(i), real(i, b))[1])
        if rank == 0:
            with pytest.raises(RuntimeError, match="was not encoded"):  # process 1's shard is not there yet
                _encode(data, src, monkeypatch, tmp_path, (0, 2))
        else:
            _encode(data, src, monkeypatch, tmp_path, (1, 2))
    assert read == {0: [0, 2], 1: [1]}  # disjoint, and together every shard
    # the finished shards are kept: a kill during a rebuild of shard 1 and 2 loses only the shard being encoded
    files = {i: lc.cache_root() / f"{lc.shard_key(_encoders(data), k)}.safetensors"
             for i, k in enumerate(src.shard_keys())}
    files[1].unlink(), files[2].unlink()
    writes = []
    real_write = lc._write_shard

    def killed_after_first(*a, **kw):
        if writes:
            raise KeyboardInterrupt  # the process dies before the second shard lands
        writes.append(1)
        real_write(*a, **kw)
    monkeypatch.setattr(lc, "_write_shard", killed_after_first)
    read[0].clear()
    monkeypatch.setattr(src, "read", lambda i, b: (read[0].append(i), real(i, b))[1])
    with pytest.raises(KeyboardInterrupt):
        _encode(data, src, monkeypatch, tmp_path)
    assert files[1].is_file() and not files[2].is_file()
    monkeypatch.setattr(lc, "_write_shard", real_write)
    read[0].clear()
    encoded = _encode(data, src, monkeypatch, tmp_path)
    assert read[0] == [2] and len(encoded) == 23 and len(encoded.skipped) == 1
    read[0].clear()
    _encode(data, src, monkeypatch, tmp_path)
    assert read[0] == []  # a second run encodes nothing


def test_a_second_run_on_the_same_data_waits_for_the_first_encode_and_encodes_nothing(data, tmp_path, monkeypatch):
    import threading

    import cmkit.data.latent_cache as lc

    src = _source(data, path=str(data / "shards"))
    encodes, inside, release = [], threading.Event(), threading.Event()
    real = lc._encode_shards

    def first_encode(*a, **kw):
        encodes.append(threading.current_thread().name)
        inside.set()
        release.wait(60)  # the first run is mid-encode while the second starts
        real(*a, **kw)
    monkeypatch.setattr(lc, "_encode_shards", first_encode)
    results = {}
    first = threading.Thread(target=lambda: results.update(a=_encode(data, src, monkeypatch, tmp_path)), name="a")
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: results.update(b=_encode(data, src, monkeypatch, tmp_path)), name="b")
    second.start()
    second.join(1.0)
    assert second.is_alive()  # waiting on the first run's lock, not encoding beside it
    release.set()
    first.join(120), second.join(120)
    assert not first.is_alive() and not second.is_alive(), "an encoding run did not finish"
    assert encodes == ["a"] and len(results["a"]) == len(results["b"]) == 23


def _encoders(data):
    import cmkit.data.latent_cache as lc
    from cmkit import load_teacher

    t = load_teacher(str(data / "teacher"))
    return lc.encoders_key(t.vae, t.prompt_encoder)


def test_batches_from_cached_shards_equal_the_same_draws_from_the_whole_set(data, tmp_path, monkeypatch):
    encoded = _encode(data, _source(data, path=str(data / "shards")), monkeypatch, tmp_path)
    assert len(encoded.shards) == 3
    mean, std = encoded.mean, encoded.std
    embeds = torch.cat([s.t["embeds.prompt_embeds"].all()[s.t["caption_index"].all()] for s in encoded.shards])
    torch.manual_seed(5)
    z, cond = encoded.batch(16, "cpu", (0.1, 2.0), prompt_dropout=0.5)
    torch.manual_seed(5)
    rows = torch.randint(0, 23, (16,))
    want = ((mean[rows] + std[rows] * torch.randn(16, *mean.shape[1:])) - 0.1) * 2.0
    drop = torch.rand(16) < 0.5
    negative = encoded.shards[0].t["embeds.negative_prompt_embeds"].all()[:1]
    want_embeds = torch.where(drop[:, None, None], negative, embeds[rows])
    assert torch.equal(z, want) and torch.equal(cond["prompt_embeds"], want_embeds) and drop.any() and (~drop).any()


def test_sdxl_time_ids_carry_each_images_original_size_and_crop(tmp_path, monkeypatch):
    from cmkit.cli.recipes import DataSection
    from cmkit.data import open_dataset
    from cmkit.data.latent_cache import encode_source

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i, (h, w) in enumerate(((20, 16), (16, 30))):
            _add(tar, f"{i}.png", _png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
            _add(tar, f"{i}.json", json.dumps({"caption": CAPTIONS[i]}).encode())
    xl = tiny_pipeline("sdxl", texts=CAPTIONS, seed=1, image_size=16)
    src = open_dataset(DataSection(path=str(tmp_path / "a.tar"), image_size=16)).source
    encoded = encode_source(xl.vae, xl.prompt_encoder, src, progress=False)
    ids = encoded.cond(torch.tensor([0, 1]))["add_time_ids"]
    # 20x16 -> 20x16 (short side 16), centre crop top 2; 16x30 -> 16x30, crop left 7
    assert ids.tolist() == [[20, 16, 2, 0, 16, 16], [16, 30, 0, 7, 16, 16]]


def _recipe(data, steps, extra):
    base = [f'teacher.path="{data / "teacher"}"', 'objective.kind="lcm_lora"', "objective.w_min=1.0",
            "objective.w_max=3.0", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
            f"train.steps={steps}", "train.lr=1e-3", "objective.lora_rank=2", "objective.lora_alpha=2.0",
            "train.ema_rates=[]", 'objective.lora_targets=["to_q","to_v","conv1"]', "data.image_size=16"]
    return load_recipe(None, [*base, *extra])


def test_streamed_shards_without_an_image_size_take_the_teachers_own(data, tmp_path, monkeypatch):
    """webdataset shards with no data.image_size are cropped to the teacher's own size (its UNet's 16 px here);
    they were refused with "webdataset shards need data.image_size"."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(data, 1, [f'data.path="{data / "shards"}"', "data.image_size=0"])
    run_job("distill", recipe, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "model" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("where", ["webdataset", "imagefolder"])
def test_lcm_on_streamed_data_resumes_exactly(data, tmp_path, monkeypatch, capsys, where):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    extra = ([f'data.path="{data / "shards"}"'] if where == "webdataset" else
             ['data.hf_dataset="imagefolder"', f'data.path="{data / "folder"}"', "data.shard_size=10"])
    run_job("distill", _recipe(data, 4, extra), tmp_path / "whole", progress=False)
    assert "1 sample(s) of" in capsys.readouterr().err  # the damaged image, counted
    run_job("distill", _recipe(data, 2, extra), tmp_path / "split", progress=False)
    run_job("distill", _recipe(data, 4, extra), tmp_path / "split", progress=False)
    a = load_file(tmp_path / "whole" / "model" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "model" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
