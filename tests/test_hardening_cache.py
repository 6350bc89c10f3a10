"""Issue 31, "caches and data that lie": a latent cache shard whose key is valid but whose contents are not what the
run expects (non-finite or absurd latents, another resolution's latents, another dtype) is found when the cache is
opened, named in one line and encoded again, never trained on.

The cache is built through the real path (``encode_set`` with the tiny teacher ``cmkit:tiny-t2i``, 32x32 images,
8x8 latents) and then tampered with, its key left in place."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CAPTIONS = ["a red bag", "a green boot", "a blue bag", "a red boot"]


@pytest.fixture(scope="module")
def teacher():
    from cmkit import load_teacher

    return load_teacher("cmkit:tiny-t2i")


def _encode(teacher, images, captions=CAPTIONS, shard_size=4096):
    from cmkit.data.latent_cache import encode_set

    return encode_set(teacher.vae, teacher.prompt_encoder, images, captions, progress=False, shard_size=shard_size)


def _images(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _notes(err: str) -> list[str]:
    """The lines cmkit wrote to stderr (the cache's "encoding N shards" aside)."""
    return [line for line in err.splitlines() if line.startswith("cmkit:") and "latent cache: encoding" not in line]


def _tamper(path, change) -> None:
    """Rewrite the cached shard at ``path`` with ``change(tensors)`` applied, its metadata (its key) kept."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)


def _fill(key, value, rows=slice(None)):
    def change(t):
        t[key][rows] = value
    return change


def _other_resolution(t):  # 16x16 latents: the encoding of 128x128 images, not of this run's 32x32
    n = len(t["mean"])
    t["mean"], t["std"] = torch.randn(n, 4, 16, 16), torch.rand(n, 4, 16, 16)


def _half(t):
    t["mean"], t["std"] = t["mean"].half(), t["std"].half()


TAMPER = {
    "nan-latents": (_fill("mean", float("nan")), "non-finite"),
    "huge-latents": (_fill("mean", 1e30), "absurd"),
    "nan-std-last-row": (_fill("std", float("nan"), -1), "non-finite"),
    # one value in a row the old check (first and last rows only) never read: every row is read now
    "nan-mean-middle-row": (_fill("mean", float("nan"), (2, 1, 3, 5)), "non-finite"),
    "huge-std-middle-row": (_fill("std", 1e30, (1, 3)), "absurd"),
    "inf-embeds-middle-row": (_fill("embeds.prompt_embeds", float("inf"), (1, 2, 5)), "non-finite"),
    "negative-std": (_fill("std", -1.0), "absurd"),
    "other-resolution": (_other_resolution, "4x16x16"),
    "float16": (_half, "float16"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_keyed_cache_holding_what_the_run_does_not_expect_is_encoded_again(case, teacher, tmp_path, monkeypatch,
                                                                             capsys):
    from cmkit.data.latent_cache import cache_root

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    images = _images()
    want = _encode(teacher, images)
    (path,) = cache_root().glob("*.safetensors")
    capsys.readouterr()
    change, words = TAMPER[case]
    _tamper(path, change)
    got = _encode(teacher, images)  # opened: checked, named, encoded again
    err = _notes(capsys.readouterr().err)
    assert len(err) == 1 and path.name in err[0] and words in err[0] and "encoding it again" in err[0], err
    assert got.latent_shape == (4, 8, 8) and torch.equal(got.mean, want.mean) and torch.equal(got.std, want.std)
    assert got.mean.dtype == torch.float32 and got.captions == want.captions
    # the shard on disk was rebuilt: the next open reads it without a word
    assert torch.equal(_encode(teacher, images).mean, want.mean) and _notes(capsys.readouterr().err) == []


def test_only_the_tampered_shard_of_several_is_encoded_again(teacher, tmp_path, monkeypatch, capsys):
    from cmkit.data.latent_cache import cache_root

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    images = _images(1, 8)
    want = _encode(teacher, images, CAPTIONS * 2, shard_size=4)
    files = sorted(cache_root().glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2
    capsys.readouterr()
    _tamper(files[1], _fill("mean", float("inf"), 0))
    untouched = files[0].stat().st_mtime_ns
    got = _encode(teacher, images, CAPTIONS * 2, shard_size=4)
    out = capsys.readouterr().err
    err = _notes(out)
    assert len(err) == 1 and files[1].name in err[0] and "non-finite" in err[0], err
    assert "encoding 1 of the 2 shard(s)" in out, out
    assert files[0].stat().st_mtime_ns == untouched and torch.equal(got.mean, want.mean)


def _tar(path, seed: int) -> None:
    """A webdataset shard of 2 captioned 32x32 PNGs."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            for name, data in ((f"{seed:03d}{i}.png", buf.getvalue()), (f"{seed:03d}{i}.txt", CAPTIONS[i].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_shard_set_changed_between_a_stop_and_its_resume_is_noted(tmp_path, monkeypatch, capsys):
    """The run's checkpoint records its shard set; a resume over other shards names them in one line. Another run
    opening the same (changed) shards afresh has nothing to compare with and says nothing."""
    from conftest import lcm_lora_folders

    from cmkit.cli.commands import main

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    lcm_lora_folders(tmp_path, 0)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        _tar(shards / f"{s:03d}.tar", s)

    def run(out: str, steps: int) -> list[str]:
        sets = [f'data.path="{shards}"', "data.image_size=16", f'teacher.path="{tmp_path / "teacher"}"',
                "objective.lora_rank=2", "objective.lora_alpha=2.0", 'objective.lora_targets=["to_q","to_v"]',
                "train.batch_size=2", "train.checkpoint_every=1", "train.warmup=0", f"train.steps={steps}"]
        capsys.readouterr()
        argv = ["distill", "tiny-t2i-lcm-lora", "--out", str(tmp_path / out), "--no-progress",
                *[a for kv in sets for a in ("--set", kv)]]
        assert main(argv) == 0, capsys.readouterr().err
        return [line for line in _notes(capsys.readouterr().err) if "shards" in line]

    assert run("run", 1) == []  # the first run: nothing to compare with
    assert run("run", 2) == []  # its resume on the same shards: nothing to say
    _tar(shards / "003.tar", 3)
    _tar(shards / "004.tar", 4)
    err = run("run", 3)
    assert len(err) == 1 and "checkpoint" in err[0] and "2 added (003.tar, 004.tar)" in err[0], err
    assert "0 removed" in err[0] and "(5 now)" in err[0], err
    assert run("other", 1) == []  # another run over the same shards: its first, not a resume
    (shards / "000.tar").unlink()
    _tar(shards / "001.tar", 11)  # rewritten in place: the same name, other contents
    err = run("run", 4)
    assert len(err) == 1 and "0 added" in err[0] and "1 removed (000.tar)" in err[0], err
    assert "1 changed (001.tar)" in err[0] and "(4 now)" in err[0], err
    assert run("run", 5) == []
