"""Issue 33, "captioned video data": folders of .mp4 / .webm clips with captions and webdataset shards of them,
decoded with PyAV and sampled to ``data.num_frames`` frames at ``data.fps``, each frame resized and cropped as an
image is, into (3, F, H, W) samples; damaged and too-short clips skipped by key; the latent cache over 5-D samples.

The clips are written here from numpy frames (``mpeg4`` in .mp4, ``libvpx`` in .webm where the installed PyAV has
it): a smooth pattern that moves from frame to frame, so a wrong frame is far from the right one."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")


def _has(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001 - not built into this PyAV
        return False


def frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """``n`` RGB frames (n, h, w, 3) uint8: gradients shifting by a clear step per frame."""
    t, y, x = np.arange(n)[:, None, None], np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    r, g = (x * 3 + t * 24) % 256, (y * 4 + t * 12) % 256
    b = np.full_like(r + g, 128)
    return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)


def write_clip(path, arr: np.ndarray, fps: int = 8, codec: str | None = None) -> None:
    codec = codec or ("libvpx" if str(path).endswith(".webm") else "mpeg4")
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        if codec == "mpeg4":
            s.bit_rate = 4_000_000  # small frames, little codec error
        for f in arr:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def fitted(arr: np.ndarray, size, key: str = "k") -> torch.Tensor:
    """The generator's frames resized and cropped as the reader does (centre crop), (3, F, H, W) in [-1, 1]."""
    from PIL import Image

    from cmkit.data.caption_sources import fit_rgb

    out = np.stack([fit_rgb(Image.fromarray(f), size, "center", 0, key)[0] for f in arr])
    return torch.from_numpy(out).movedim(-1, 0).float() / 127.5 - 1


CLIP = frames(12)  # 1.5 s at 8 fps


@pytest.fixture
def clip_folder(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    write_clip(root / "a.mp4", CLIP)
    write_clip(root / "b.mp4", CLIP[::-1].copy())
    (root / "a.txt").write_text("a clip")
    (root / "b.txt").write_text("the clip backwards")
    return root


def _read(path, **kw):
    from cmkit.data import PathOptions, open_path

    data = open_path(str(path), PathOptions(**{"image_size": 16, **kw}))
    chunks = list(data.caption_source().read(0, 8))
    return data, torch.cat([c.images for c in chunks]), [x for c in chunks for x in c.captions], \
        [x for c in chunks for x in c.skipped]


def test_folder_clips_decode_to_frames_at_the_asked_rate(clip_folder):
    data, x, captions, skipped = _read(clip_folder, num_frames=4, fps=4)
    assert data.sample_shape == (3, 4, 16, 16) and x.shape == (2, 3, 4, 16, 16) and not skipped
    assert captions == ["a clip", "the clip backwards"]
    assert x.min() >= -1 and x.max() <= 1
    # 4 fps from an 8 fps clip: frames 0, 2, 4, 6 (and of the reversed clip, 11, 9, 7, 5)
    assert (x[0] - fitted(CLIP[[0, 2, 4, 6]], 16)).abs().mean() < 0.1
    assert (x[1] - fitted(CLIP[[11, 9, 7, 5]], 16)).abs().mean() < 0.1
    assert (x[0] - fitted(CLIP[[0, 1, 2, 3]], 16)).abs().mean() > 0.1  # a wrong frame would be caught
    # fps 0: the clip's own rate; a non-square size covers and crops every frame alike
    _, x, _, _ = _read(clip_folder, image_size=0, height=16, width=24, num_frames=3)
    assert x.shape == (2, 3, 3, 16, 24)
    assert (x[0] - fitted(CLIP[:3], (16, 24))).abs().mean() < 0.1


def test_random_start_is_seeded_and_inside_the_clip(clip_folder):
    from cmkit.data import PathOptions, open_path

    def read(seed):
        data = open_path(str(clip_folder), PathOptions(image_size=32, num_frames=3, fps=4, crop="random"), seed)
        return torch.cat([c.images for c in data.caption_source().read(0, 8)])

    a, b = read(1), read(1)
    assert torch.equal(a, b)
    # some start frame s: frames s, s + 2, s + 4 of the clip (32 px: no spatial crop of a 32x48 clip's height)
    from PIL import Image

    from cmkit.data.caption_sources import fit_rgb

    errs = []
    for s in range(0, 7):
        want = [fit_rgb(Image.fromarray(CLIP[i]), 32, "random", 1, "a.mp4")[0] for i in (s, s + 2, s + 4)]
        want = torch.from_numpy(np.stack(want)).movedim(-1, 0).float() / 127.5 - 1
        errs.append(float((a[0] - want).abs().mean()))
    assert min(errs) < 0.1


@pytest.mark.skipif(not _has("libvpx"), reason="this PyAV has no libvpx encoder")
def test_webm_clips_decode_too(tmp_path):
    root = tmp_path / "webm"
    root.mkdir()
    for name in ("a", "b"):
        write_clip(root / f"{name}.webm", CLIP)
        (root / f"{name}.txt").write_text(name)
    _, x, _, skipped = _read(root, num_frames=4, fps=8)
    assert x.shape == (2, 3, 4, 16, 16) and not skipped
    assert (x[0] - fitted(CLIP[:4], 16)).abs().mean() < 0.1


def test_damaged_and_short_clips_are_skipped_by_key(clip_folder):
    (clip_folder / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (clip_folder / "bad.txt").write_text("broken")
    write_clip(clip_folder / "short.mp4", CLIP[:3])  # 0.375 s: 4 frames at 4 fps need 1 s
    (clip_folder / "short.txt").write_text("short")
    cut = (clip_folder / "a.mp4").read_bytes()
    (clip_folder / "cut.mp4").write_bytes(cut[: len(cut) // 3])
    (clip_folder / "cut.txt").write_text("cut")
    _, x, captions, skipped = _read(clip_folder, num_frames=4, fps=4)
    assert captions == ["a clip", "the clip backwards"] and x.shape[0] == 2
    keys = {s.split(":")[0]: s for s in skipped}
    assert set(keys) == {"bad.mp4", "short.mp4", "cut.mp4"}, skipped
    assert "too short" in keys["short.mp4"] and "1 s" in keys["short.mp4"]


def _tar(path, clips: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for name, (data, caption) in clips.items():
            for ext, payload in (("txt", caption.encode()), ("mp4", data)):  # the caption first, as writers may
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tar_shards_of_clips_give_the_folder_s_samples(clip_folder, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", {"a": ((clip_folder / "a.mp4").read_bytes(), "a clip"),
                                "b": ((clip_folder / "b.mp4").read_bytes(), "the clip backwards"),
                                "c": (b"not a video at all", "broken")})
    data, x, captions, skipped = _read(shards, num_frames=4, fps=4)
    _, want, want_captions, _ = _read(clip_folder, num_frames=4, fps=4)
    assert type(data.caption_source()).__name__ == "VideoTarShards" and data.sample_shape == (3, 4, 16, 16)
    assert captions == want_captions and torch.equal(x, want)
    assert [s.split(":")[0] for s in skipped] == ["c"]
    # the frame count and rate are part of a shard's key: another sampling is encoded again
    other, _, _, _ = _read(shards, num_frames=3, fps=4)
    assert other.caption_source().shard_keys() != data.caption_source().shard_keys()
    with pytest.raises(ValueError, match="holds video clips; set data.num_frames"):
        _read(shards)
    images = tmp_path / "image_shards"
    images.mkdir()
    with tarfile.open(images / "00000.tar", "w") as tar:
        for name, payload in (("a.png", b"png"), ("a.txt", b"a")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="not video clips; remove data.num_frames"):
        _read(images, num_frames=4)


class TinyVideoVAE(torch.nn.Module):
    """A stand-in 3-D VAE with ``AutoencoderKL``'s interface over (B, 3, F, H, W): the first frame kept, the rest
    averaged in pairs (temporal factor 2: F' = 1 + (F - 1) // 2), then a strided 3-D convolution (spatial factor 2)
    giving a mean and log-variance."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, (1, 2, 2), stride=(1, 2, 2))
        self.config = {"latent_channels": 4, "block_out_channels": [8, 8], "temporal_compression_ratio": 2}

    @property
    def device(self):
        return self.conv.weight.device

    def encode(self, x):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        rest = x[:, :, 1: 1 + 2 * ((x.shape[2] - 1) // 2)]
        rest = torch.nn.functional.avg_pool3d(rest, (2, 1, 1)) if rest.shape[2] else rest
        h = self.conv(torch.cat([x[:, :, :1], rest], 2))

        class Out:
            latent_dist = DiagonalGaussianDistribution(h)
        return Out()


class TinyPromptEncoder(torch.nn.Module):
    tokenizers = ()

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(256, 4, generator=torch.Generator().manual_seed(0)))

    def settings(self):
        return {}

    def forward(self, prompts, negatives=None):
        def embed(texts):
            return torch.stack([self.table[list(t.encode()[:3].ljust(3, b" "))] for t in texts]).detach()
        out = {"prompt_embeds": embed(prompts)}
        if negatives is not None:
            out["negative_prompt_embeds"] = embed(negatives)
        return out


def test_latent_cache_encodes_clips(clip_folder, tmp_path, monkeypatch):
    from cmkit.data import PathOptions, open_path
    from cmkit.data.latent_cache import encode_source, expected_latent

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    vae, prompts = TinyVideoVAE(), TinyPromptEncoder()
    source = open_path(str(clip_folder), PathOptions(image_size=16, num_frames=5, fps=4)).caption_source()
    assert expected_latent(vae, (16, 16), 5) == (4, 3, 8, 8)
    got = encode_source(vae, prompts, source, batch_size=1, progress=False)
    assert got.latent_shape == (4, 3, 8, 8) and len(got) == 2
    x = torch.cat([c.images for c in source.read(0, 8)])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert torch.allclose(got.mean, dist.mean, atol=1e-6) and torch.allclose(got.std, dist.std, atol=1e-6)
    assert got.captions == ["a clip", "the clip backwards"]
    z, cond = got.batch(3, "cpu", (0.0, 1.0))
    assert z.shape == (3, 4, 3, 8, 8) and cond["prompt_embeds"].shape == (3, 3, 4)
    # read back from the cache (nothing encoded again), the same numbers
    again = encode_source(vae, prompts, source, batch_size=1, progress=False)
    assert torch.equal(again.mean, got.mean)


def test_expected_latent_of_video_vaes():
    from types import SimpleNamespace

    from cmkit.data.latent_cache import _fits, expected_latent

    hunyuan = SimpleNamespace(config={"latent_channels": 16, "block_out_channels": [1, 2, 3, 4],
                                      "spatial_compression_ratio": 8, "temporal_compression_ratio": 4})
    assert expected_latent(hunyuan, (64, 96), 17) == (16, 5, 8, 12)
    wan = SimpleNamespace(config={"latent_channels": 16, "block_out_channels": [8] * 4, "scale_factor_temporal": 4})
    assert expected_latent(wan, (64, 64), 9) == (16, 3, 8, 8)
    unknown = SimpleNamespace(config={"latent_channels": 4, "block_out_channels": [8, 8]})
    assert expected_latent(unknown, (16, 16), 9) == (4, None, 8, 8)  # the frame count is not guessed
    assert _fits((4, 7, 8, 8), (4, None, 8, 8)) and not _fits((4, 7, 4, 8), (4, None, 8, 8))
    assert not _fits((4, 8, 8), (4, None, 8, 8))
    assert expected_latent(unknown, (16, 16)) == (4, 8, 8)  # images: as before


def test_one_line_errors(clip_folder, tmp_path):
    from PIL import Image

    from cmkit.cli.recipes import DataSection
    from cmkit.data import PathOptions, open_path

    with pytest.raises(ValueError, match="holds video clips; set data.num_frames"):
        open_path(str(clip_folder), PathOptions(image_size=16))
    with pytest.raises(ValueError, match="data.fps must be >= 0"):
        open_path(str(clip_folder), PathOptions(image_size=16, num_frames=2, fps=-1))
    with pytest.raises(ValueError, match="need data.image_size"):
        open_path(str(clip_folder), PathOptions(num_frames=2))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(name)
    with pytest.raises(ValueError, match="not video clips; remove data.num_frames"):
        open_path(str(images), PathOptions(image_size=8, num_frames=4))
    for kw, match in (({"num_frames": -1}, "data.num_frames must be >= 1"), ({"num_frames": 2, "fps": -2.0},
                      "data.fps must be >= 0"), ({"fps": 8.0}, "set data.num_frames too")):
        with pytest.raises(ValueError, match=match) as e:
            DataSection(**kw).check()
        assert "\n" not in str(e.value)
    DataSection(num_frames=8, fps=8).check()


def test_latent_cache_takes_a_wan_vae(clip_folder, tmp_path, monkeypatch):
    """A tiny diffusers ``AutoencoderKLWan`` as it comes (``z_dim``, ``dim_mult``, ``scale_factor_temporal``)."""
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "AutoencoderKLWan"):
        pytest.skip("this diffusers has no AutoencoderKLWan")
    from cmkit.data import PathOptions, open_path
    from cmkit.data.latent_cache import encode_source, expected_latent

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    source = open_path(str(clip_folder), PathOptions(image_size=16, num_frames=5, fps=4)).caption_source()
    want = expected_latent(vae, (16, 16), 5)
    got = encode_source(vae, TinyPromptEncoder(), source, batch_size=2, progress=False)
    x = torch.cat([c.images for c in source.read(0, 8)])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert got.latent_shape == tuple(dist.mean.shape[1:])
    if "scale_factor_temporal" in vae.config:
        assert want == (4, 2, 2, 2) == got.latent_shape
    assert torch.allclose(got.mean, dist.mean, atol=1e-5) and torch.allclose(got.std, dist.std, atol=1e-5)
