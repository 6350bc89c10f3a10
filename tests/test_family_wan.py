"""Wan (``WanPipeline``) against diffusers' own pipeline, both read from one saved tiny folder each for Wan 2.1 (one
transformer) and Wan 2.2 (two experts, a boundary the 8-step grid crosses): the Euler solve over the folder's grid (a
``FlowMatchEulerDiscreteScheduler`` with the folder's ``flow_shift`` swapped in on both sides, as the pipeline would
run it) with guidance and without, Wan 2.2's second guidance scale, square and not, at 8 steps and 1, on latents and
decoded frames; the prompt embeddings; the per-sample expert choice; the VAE wrapper's normalisation; the grid of
the UniPC scheduler the folders ship; one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import cmkit
from cmkit.latent.families.wan import tiny_wan_pipeline
from cmkit.sampling.text2image import timestep_sigmas

PROMPTS = ["a red  sneaker", "a green bag &amp; a hat, by the sea"]  # cleaned as the pipeline cleans; two lengths
LENGTH = 48  # the prompts' max_sequence_length in every call below
FRAMES = 9  # 3 latent frames
SHIFT = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def _euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def _open(folder):
    """(cmkit's teacher, diffusers' WanPipeline) from ``folder``, each with the Euler scheduler swapped in."""
    import diffusers

    teacher = cmkit.load_teacher(str(folder))
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.flow_shift == SHIFT  # what the folder ships, with the shift the Euler one takes
    pipe.scheduler, teacher.denoiser.scheduler = _euler(), _euler()
    return teacher, pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"2.1": (folder, teacher, pipe), "2.2": ...}: both folders as the Wan repositories ship them (UniPC)."""
    out = {}
    for version, two in (("2.1", False), ("2.2", True)):
        folder = tmp_path_factory.mktemp("wan") / version
        tiny_wan_pipeline(seed=4, two_experts=two, flow_shift=SHIFT).save_pretrained(folder)
        teacher, pipe = _open(folder)
        # the pipeline's defaults
        assert (teacher.height, teacher.width, teacher.num_frames) == (480, 832, 81)
        assert teacher.prompt_encoder.max_sequence_length == 512
        assert (teacher.denoiser.transformer_2 is not None) == two
        out[version] = (folder, teacher, pipe)
    return out


def _theirs(pipe, latents, steps, g, output_type, height, width, **options):
    return pipe(prompt=list(PROMPTS), latents=latents, num_inference_steps=steps, guidance_scale=g, height=height,
                width=width, num_frames=FRAMES, max_sequence_length=LENGTH, output_type=output_type,
                **options).frames


def _ours(teacher, latents, steps, w, height, width, output="image", **options):
    out = cmkit.text_to_video(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=w, latents=latents,
                              spacing=None, height=height, width=width, num_frames=FRAMES,
                              max_sequence_length=LENGTH, output=output, **options)
    assert teacher.denoiser.guidance_scale_2 is None  # a call's option is the call's alone
    return out


def _latents(size, seed):
    h, w = size
    return torch.randn(2, 8, 1 + (FRAMES - 1) // 4, h // 8, w // 8, generator=torch.Generator().manual_seed(seed))


# (guidance_scale, options): guided; guided with a second scale of its own (Wan 2.2 only); unguided
CASES = {"2.1": [(4.0, {}), (1.0, {})], "2.2": [(4.0, {}), (4.0, dict(guidance_scale_2=2.0)), (1.0, {})]}


@pytest.mark.parametrize("size", [(16, 16), (16, 32)])
@pytest.mark.parametrize("steps", [8, 1])
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_text_to_video_is_the_pipeline_with_and_without_guidance(saved, version, steps, size):
    _, teacher, pipe = saved[version]
    h, w_ = size
    latents = _latents(size, steps)
    results = []
    for g, options in CASES[version]:
        ours = _ours(teacher, latents, steps, g, h, w_, output="latent", **options)
        theirs = _theirs(pipe, latents, steps, g, "latent", h, w_, **options)
        assert ours.shape == theirs.shape == (2, 8, 3, h // 8, w_ // 8)
        assert (ours - theirs).abs().max() < 1e-4, (g, options)
        video = _ours(teacher, latents, steps, g, h, w_, **options)
        frames = _theirs(pipe, latents, steps, g, "pt", h, w_, **options)  # (B, F, C, H, W) in [0, 1]
        assert video.shape == (2, 3, FRAMES, h, w_) and frames.shape == (2, FRAMES, 3, h, w_)
        assert ((video / 2 + 0.5).clamp(0, 1) - frames.transpose(1, 2)).abs().max() < 1e-4, (g, options)
        results.append(theirs)
    assert (results[0] - results[-1]).abs().max() > 1e-3  # guidance changes the sample
    if version == "2.2" and steps == 8:  # the low-noise steps guide with guidance_scale_2 (1 step never reaches them)
        assert (results[0] - results[1]).abs().max() > 1e-3
    assert teacher.sample_shape == (8, 21, 60, 104)  # the model's own size, restored after the call


def test_both_experts_run_and_each_sample_takes_its_own(saved):
    """At 8 steps the Wan 2.2 solve crosses the boundary (t = 875): its result is not what the high-noise expert alone
    gives; and a batch straddling the boundary gives each sample what it gets alone."""
    _, teacher, pipe = saved["2.2"]
    den = teacher.denoiser
    latents = _latents((16, 16), 3)
    both = _ours(teacher, latents, 8, 1.0, 16, 16, output="latent")
    ratio = den.boundary_ratio
    den.boundary_ratio = 0.0  # every step on `transformer`
    try:
        alone = _ours(teacher, latents, 8, 1.0, 16, 16, output="latent")
    finally:
        den.boundary_ratio = ratio
    assert (both - alone).abs().max() > 1e-3
    # t = 900 (high noise) and t = 500 (low noise), as sigma = t / (1 - t), in one batch and each alone
    with teacher.sampling_at(16, 16, LENGTH, FRAMES):
        cond = teacher.encode_prompt(PROMPTS, guidance_scale=4.0)
        z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.9 / 0.1, 0.5 / 0.5])
        batch = teacher(z, sigma, **cond)
        for i in range(2):
            one = {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in cond.items()}
            assert (teacher(z[i:i + 1], sigma[i:i + 1], **one) - batch[i:i + 1]).abs().max() < 1e-5
        # the low-noise sample is transformer_2's (guided): replacing it changes that sample alone
        saved_2, den.transformer_2 = den.transformer_2, den.transformer
        try:
            swapped = teacher(z, sigma, **cond)
        finally:
            den.transformer_2 = saved_2
    assert (swapped[0] - batch[0]).abs().max() < 1e-6 and (swapped[1] - batch[1]).abs().max() > 1e-3


def test_prompt_embeddings_are_the_pipelines(saved):
    """Cleaned, trimmed to each prompt's tokens and zero-padded to max_sequence_length, as ``encode_prompt``; the
    negatives default to "" (``negative_prompt=None``)."""
    _, teacher, pipe = saved["2.1"]
    with teacher.sampling_at(max_sequence_length=LENGTH):
        cond = teacher.encode_prompt(PROMPTS)
        given = teacher.encode_prompt(PROMPTS, ["blurry", "dark"])
    pos, neg = pipe.encode_prompt(list(PROMPTS), max_sequence_length=LENGTH)
    assert cond["prompt_embeds"].shape == cond["negative_prompt_embeds"].shape == (2, LENGTH, 32)
    # (the pipeline encodes with autograd on: an ulp apart in places)
    for ours, theirs in ((cond["prompt_embeds"], pos), (cond["negative_prompt_embeds"], neg),
                         (given["negative_prompt_embeds"],
                          pipe.encode_prompt(list(PROMPTS), ["blurry", "dark"], max_sequence_length=LENGTH)[1])):
        assert (ours - theirs).abs().max() < 1e-5 and torch.equal(ours == 0, theirs == 0)
    assert (given["negative_prompt_embeds"] - neg).abs().max() > 1e-2  # the given negatives are not ""'s
    # two prompt lengths, zero after each
    lengths = [int(e.abs().sum(1).gt(0).sum()) for e in cond["prompt_embeds"]]
    assert lengths[0] != lengths[1] and max(lengths) < LENGTH


def test_the_vae_wrapper_normalises_per_channel_as_the_pipeline(saved):
    """cmkit's encode / decode of (B, 3, F, H, W) videos: the posterior mean as ``(z - latents_mean) / latents_std``,
    and decode as the pipeline decodes; the config the latent cache reads."""
    _, teacher, _ = saved["2.1"]
    vae = teacher.vae.vae
    video = torch.rand(1, 3, FRAMES, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = teacher.encode(video)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    raw = vae.encode(video).latent_dist.mean
    assert z.shape == (1, 8, 3, 2, 2) and (z - (raw - mean) / std).abs().max() < 1e-5
    assert not torch.allclose(z, raw, atol=1e-2)  # the statistics are not the identity
    assert (teacher.decode(z) - vae.decode(z * std + mean).sample).abs().max() < 1e-5
    c = teacher.vae.config
    assert (c.latent_channels, teacher.vae_scale_factor, c.scaling_factor, c.shift_factor) == (8, 8, 1.0, 0.0)
    assert teacher.image_shape == (3, 81, 480, 832)


def test_the_grid_is_the_folders_scheduler(saved):
    """The shipped UniPC's flow sigmas, and the Euler one swapped in (from t = 1: sigma = inf), as flow times."""
    from diffusers import UniPCMultistepScheduler

    folder, teacher, _ = saved["2.1"]
    shipped = cmkit.load_teacher(str(folder))
    assert isinstance(shipped.scheduler, UniPCMultistepScheduler)
    for model in (shipped, teacher):
        for n in (8, 3, 1):
            sched = type(model.scheduler).from_config(model.scheduler.config)
            sched.set_timesteps(n)
            grid = torch.tensor(timestep_sigmas(model, n, None), dtype=torch.float64)
            assert len(grid) == n + 1 and grid[-1] == 0
            t = torch.where(grid.isinf(), 1.0, grid / (1 + grid))
            assert torch.allclose(t, sched.sigmas.double(), rtol=0, atol=1e-7)
            assert math.isinf(grid[0]) == (model is teacher)


def test_bad_inputs_are_one_line(saved, tmp_path):
    folder, teacher, _ = saved["2.2"]
    one = saved["2.1"][1]
    cases = [(dict(num_frames=10), "1 + a multiple of 4"), (dict(num_frames=-3), "num_frames must be an integer >= 1"),
             (dict(num_frames=0), "num_frames must be an integer >= 1"),
             (dict(height=24), "multiple of 16"), (dict(width=40), "multiple of 16"),
             (dict(max_sequence_length=513), "use at most 512")]
    for bad, needle in cases:
        with pytest.raises(ValueError) as e:
            cmkit.text_to_video(teacher, PROMPTS[:1], steps=1, **{"height": 16, "width": 16, **bad})
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert teacher.num_frames == 81
    for model, bad, needle in ((one, dict(guidance_scale_2=2.0), "has one transformer"),
                               (teacher, dict(guidance_rescale=0.7), "no guidance option 'guidance_rescale'"),
                               (teacher, dict(guidance_scale_2=float("nan")), "guidance_scale_2")):
        with pytest.raises(ValueError) as e:
            cmkit.text_to_video(model, PROMPTS[:1], steps=1, height=16, width=16, num_frames=FRAMES, **bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        cmkit.text_to_image(saved["2.1"][1], PROMPTS[:1], steps=1, height=16, width=16, num_frames=FRAMES,
                            guidance_scale_2=3.0)
    assert "has one transformer" in str(e.value)
    # a Wan 2.2 folder (boundary_ratio set) without its low-noise expert
    broken = tmp_path / "no_expert"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "transformer_2")
    index = json.loads((broken / "model_index.json").read_text())
    index["transformer_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        cmkit.load_teacher(str(broken))
    assert "without transformer_2" in str(e.value) and "boundary_ratio" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_unipc_over_the_folders_own_scheduler_is_the_pipeline(saved, version):
    """The folders' UniPCMultistepScheduler (flow sigmas, flow_shift) as the pipeline runs it, and cmkit's unipc over
    the same grid, the network seeing the scheduler's integer timesteps: 8 steps, guided, in float32. (The grid's
    first point is t = 1 - 1e-6, sigma about 1e6: a flow schedule that took alpha as 1 - t there lost 3% of it to
    t's float32 rounding, 4e-3 here.)"""
    import diffusers

    folder, _, _ = saved[version]
    teacher = cmkit.load_teacher(str(folder))
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and teacher.denoiser.integer_timesteps
    latents = _latents((16, 16), 3)
    kw = dict(steps=8, guidance_scale=4.0, latents=latents, spacing=None, height=16, width=16, num_frames=FRAMES,
              max_sequence_length=LENGTH, output="latent")
    ours = cmkit.text_to_video(teacher, PROMPTS, solver="unipc", **kw)
    theirs = _theirs(pipe, latents, 8, 4.0, "latent", 16, 16)
    assert (ours - theirs).abs().max() < 1e-4
    euler = cmkit.text_to_video(teacher, PROMPTS, solver="euler", **kw)
    assert (euler - theirs).abs().max() > 1e-3  # the solver matters: UniPC is what the folder's pipeline runs


def test_a_video_teacher_takes_its_clips_frame_count_and_size():
    """A run on 9-frame 16x32 clips samples the teacher at that (it would sample the pipeline's 81 x 480 x 832);
    a count the VAE cannot take is one line naming data.num_frames."""
    from types import SimpleNamespace

    from cmkit.cli.jobs import fit_teacher_to

    teacher = tiny_wan_pipeline(seed=1)
    fit_teacher_to(SimpleNamespace(sample_shape=(3, 9, 16, 32)), teacher)
    assert teacher.image_shape == (3, 9, 16, 32) and teacher.sample_shape == (8, 3, 2, 4)
    with pytest.raises(ValueError, match="10 frames of 16x32.*data.num_frames") as e:
        fit_teacher_to(SimpleNamespace(sample_shape=(3, 10, 16, 32)), teacher)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("steps", [8, 1])
def test_the_ti2v_5b_layout_is_the_pipeline(tmp_path, steps):
    """Wan 2.2 TI2V-5B's layout (``expand_timesteps``: a timestep per token; a residual, patchified VAE of spatial
    factor 16) read from its folder and sampled as WanPipeline samples it, guided, on latents and frames."""
    import json


    folder = tmp_path / "ti2v"
    tiny_wan_pipeline(seed=5, ti2v=True, flow_shift=SHIFT, image_size=32).save_pretrained(folder, record_size=True)
    assert json.loads((folder / "model_index.json").read_text())["expand_timesteps"] is True
    teacher, pipe = _open(folder)
    assert teacher.denoiser.expand_timesteps and teacher.sample_shape == (12, 3, 2, 2)  # its sample_size.json
    latents = torch.randn(2, 12, 3, 2, 2, generator=torch.Generator().manual_seed(steps))
    ours = _ours(teacher, latents, steps, 4.0, 32, 32, output="latent")
    theirs = _theirs(pipe, latents, steps, 4.0, "latent", 32, 32)
    assert ours.shape == theirs.shape == latents.shape and (ours - theirs).abs().max() < 1e-4
    video = _ours(teacher, latents, steps, 4.0, 32, 32)
    frames = _theirs(pipe, latents, steps, 4.0, "pt", 32, 32)
    assert video.shape == (2, 3, FRAMES, 32, 32)
    assert ((video / 2 + 0.5).clamp(0, 1) - frames.transpose(1, 2)).abs().max() < 1e-4
