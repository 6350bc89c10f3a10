"""Issue 33's acceptance: a captioned .mp4 folder encodes into the latent cache (5-D latents of a Wan VAE) and a
3-step ``flow_matching`` teacher run (``objective.pipeline = "WanPipeline"``) reads them, saving a ``WanPipeline``
folder that diffusers and ``cmkit.load_teacher`` open, whose cmkit sampling is the pipeline's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "WanPipeline"):
    pytest.skip("this diffusers has no WanPipeline", allow_module_level=True)

import cmkit  # noqa: E402
from cmkit.cli.jobs import run_job  # noqa: E402
from cmkit.cli.recipes import load_recipe  # noqa: E402

FRAMES, SIZE = 9, 16
CAPTIONS = ["a red bag", "a blue shoe", "a green hat", "the sea at dusk", "a cat, walking", "rain on a window",
            "a yellow kite", "two birds"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def frames(n: int, h: int, w: int, k: int) -> np.ndarray:
    """``n`` RGB frames (n, h, w, 3) uint8: gradients shifting by a clear step per frame (clip ``k``'s own)."""
    t, y, x = np.arange(n)[:, None, None], np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    r, g = (x * (3 + k) + t * 24) % 256, (y * 4 + t * (12 + 5 * k)) % 256
    b = np.full_like(r + g, 32 * k)
    return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)


def write_clip(path, arr: np.ndarray, fps: int = 8) -> None:  # as tests/test_video_data.py writes them
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        s.bit_rate = 4_000_000
        for f in arr:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from cmkit.latent.families.wan import tiny_wan_pipeline

    root = tmp_path_factory.mktemp("wan_teacher")
    clips = root / "clips"
    clips.mkdir()
    for k, caption in enumerate(CAPTIONS):
        write_clip(clips / f"c{k}.mp4", frames(FRAMES, SIZE, SIZE, k))
        (clips / f"c{k}.txt").write_text(caption)
    vae = root / "vae"
    tiny_wan_pipeline(seed=3).vae.vae.save_pretrained(vae)
    recipe = load_recipe(None, [
        f'data.path="{clips}"', f"data.num_frames={FRAMES}", f"data.image_size={SIZE}",
        'objective.kind="flow_matching"', f'objective.vae="{vae}"', 'objective.pipeline="WanPipeline"',
        "objective.layers=1", "objective.heads=2", "objective.head_dim=12", "objective.prompt_dropout=0.25",
        "train.batch_size=4", "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.ema_rates=[]"])
    mp = pytest.MonkeyPatch()
    mp.setenv("CMKIT_CACHE", str(root / "cache"))
    try:
        run_job("train-teacher", recipe, root / "out", progress=False)
    finally:
        mp.undo()
    return root


def test_the_clips_latents_are_cached_in_5d(trained):
    from safetensors import safe_open

    shards = sorted((trained / "cache").rglob("*.safetensors"))
    assert shards
    rows = 0
    for path in shards:
        with safe_open(str(path), "pt") as f:
            if "mean" not in f.keys():
                continue
            mean = f.get_tensor("mean")
        # 8 latent channels, 1 + (9 - 1) / 4 latent frames, 16 / 8 squares
        assert mean.shape[1:] == (8, 3, 2, 2)
        rows += len(mean)
    assert rows == len(CAPTIONS)
    # the three steps ran on them: a finite loss each
    import json

    log = [json.loads(line) for line in (trained / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)


def test_the_cache_is_the_wan_vae_normalised_per_channel(trained):
    """The cached posterior means are the WanVAE wrapper's (``(z - latents_mean) / latents_std``) of the clips."""
    from cmkit.data import PathOptions, open_path
    from cmkit.data.latent_cache import encode_source
    from cmkit.latent.families.wan import WanVAE, tiny_wan_text_side

    vae = WanVAE(diffusers.AutoencoderKLWan.from_pretrained(trained / "vae").eval())
    source = open_path(str(trained / "clips"), PathOptions(image_size=SIZE, num_frames=FRAMES)).caption_source()
    mp = pytest.MonkeyPatch()
    mp.setenv("CMKIT_CACHE", str(trained / "cache"))
    def stamps():
        return sorted((p, p.stat().st_mtime_ns) for p in (trained / "cache").rglob("*.safetensors"))

    before = stamps()
    try:  # the run's cache, read back (its key: this VAE and this text side), nothing written again
        got = encode_source(vae, tiny_wan_text_side(0), source, batch_size=8, progress=False)
    finally:
        mp.undo()
    assert stamps() == before
    x = torch.cat([c.images for c in source.read(0, 8)])
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean
    assert got.mean.shape == want.shape == (len(CAPTIONS), 8, 3, 2, 2)
    assert torch.allclose(got.mean, want, atol=1e-5)


def test_the_teacher_saves_a_wan_pipeline_that_samples_as_cmkit_does(trained):
    folder = trained / "out" / "model"
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.in_channels == 8
    teacher = cmkit.load_teacher(str(folder))
    assert type(teacher.denoiser).__name__ == "WanDenoiser"
    # the clips' size and frame count, recorded (sample_size.json): not the pipeline's 81 frames of 480x832
    assert (teacher.height, teacher.width, teacher.num_frames) == (SIZE, SIZE, FRAMES)
    prompts = ["a red bag", "two birds"]
    latents = torch.randn(2, 8, 1 + (FRAMES - 1) // 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    for g in (4.0, 1.0):
        ours = cmkit.text_to_video(teacher, prompts, steps=4, solver="euler", guidance_scale=g, latents=latents,
                                   spacing=None, height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=48,
                                   output="latent")
        theirs = pipe(prompt=prompts, latents=latents, num_inference_steps=4, guidance_scale=g, height=SIZE,
                      width=SIZE, num_frames=FRAMES, max_sequence_length=48, output_type="latent").frames
        assert ours.shape == theirs.shape == latents.shape
        assert torch.isfinite(ours).all() and (ours - theirs).abs().max() < 1e-4, g


def test_a_wan_teacher_needs_a_vae(tmp_path):
    recipe = load_recipe(None, ['objective.kind="flow_matching"', 'objective.pipeline="WanPipeline"', "train.steps=1"])
    with pytest.raises(ValueError, match="set objective.vae"):
        run_job("train-teacher", recipe, tmp_path / "a", progress=False)
    recipe = load_recipe(None, ['objective.kind="flow_matching"', 'objective.pipeline="Flux"', "train.steps=1"])
    with pytest.raises(ValueError, match="objective.pipeline must be"):
        run_job("train-teacher", recipe, tmp_path / "b", progress=False)
