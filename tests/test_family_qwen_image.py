"""Qwen-Image (``QwenImagePipeline``) against diffusers' own pipeline built from the same saved folder: cmkit's
Euler solve over the pipeline's grid equals the pipeline with true CFG (the default negative " " and given negatives,
with the norm rescale) and unguided, at 8 and 1 steps, square and not; the prompt encoder, the 4-D VAE wrapper and
the grid are the pipeline's; flow-CD and sCD students (full and LoRA) trained a few steps sample in the pipeline as
cmkit samples them; bad input is one line."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.core import flux_mu
from cmkit.latent.denoiser import GuidedDenoiser
from cmkit.latent.families.qwen_image import (
    DEFAULT_NEGATIVE,
    DROP,
    LIGHTNING_SCHEDULER,
    TEMPLATE,
    QwenImageDenoiser,
    pack,
    tiny_qwen_image_pipeline,
    trimmed,
    unpack,
)
from cmkit.latent.flow_student import SAMPLERS
from cmkit.sampling.text2image import timestep_sigmas

# prompts of different lengths, so the padding mask matters
PROMPTS = ["a red sneaker", "a green bag with a long strap on a wooden table"]


def _pipe(folder, lora=None):
    pipe = diffusers.QwenImagePipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two folders: Qwen-Image's own scheduler (terminal stretch 0.02) and Qwen-Image-Lightning's (no stretch: the
    one whose 1-step grid exists), each with cmkit's teacher and diffusers' pipeline read from it."""
    out = {}
    for name, sched in (("qwen", None), ("lightning", LIGHTNING_SCHEDULER)):
        folder = tmp_path_factory.mktemp(name) / "teacher"
        tiny_qwen_image_pipeline(seed=1, scheduler=sched).save_pretrained(folder)
        out[name] = (folder, cmkit.load_teacher(str(folder)), _pipe(folder))
    return out


def _theirs(pipe, latents, h, w, **kw):
    """The pipeline's final latents (unpacked; caught at its last step) and its decoded images, from one call."""
    last = {}

    def catch(pipe, i, t, names):
        last["latents"] = names["latents"]
        return {}

    img = pipe(prompt=PROMPTS, latents=pack(latents), height=h, width=w, output_type="pt",
               callback_on_step_end=catch, **kw).images
    return unpack(last["latents"], h // 4, w // 4), img  # 4: the tiny VAE's factor


@pytest.mark.parametrize("steps", [8, 1])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("guided", [True, False])
def test_text_to_image_is_the_pipeline(saved, steps, size, guided):
    """8 steps on Qwen-Image's scheduler, 1 on Lightning's (Qwen-Image's own has no 1-step grid); guided: the
    default negative " " on squares, given negatives otherwise; max_sequence_length long enough to pad (the mask)
    on squares, short enough to truncate otherwise."""
    _, teacher, pipe = saved["qwen" if steps > 1 else "lightning"]
    h, w = size
    n = 256 if h == w else 120
    negs = None if h == w else ["blurry, dark", "a watermark"]
    latents = torch.randn(2, 4, h // 4, w // 4, generator=torch.Generator().manual_seed(steps + w))
    kw = dict(steps=steps, solver="euler", guidance_scale=4.0 if guided else 1.0, latents=latents, spacing=None,
              height=h, width=w, max_sequence_length=n)
    with pytest.warns(UserWarning, match="truncated") if n < 200 else _nothing():
        ours = cmkit.text_to_image(teacher, PROMPTS, output="latent", negative_prompts=negs, **kw)
    image = teacher.decode(ours)  # what text_to_image's images are
    theirs_kw = dict(num_inference_steps=steps, true_cfg_scale=4.0 if guided else 1.0, max_sequence_length=n)
    if guided:  # the pipeline guides only with a negative prompt
        theirs_kw["negative_prompt"] = DEFAULT_NEGATIVE if negs is None else negs
    lat, img = _theirs(pipe, latents, h, w, **theirs_kw)
    assert ours.shape == (2, 4, h // 4, w // 4) and image.shape == (2, 3, h, w)
    assert (ours - lat).abs().max() < 1e-4
    assert ((image / 2 + 0.5).clamp(0, 1) - img).abs().max() < 1e-4
    if guided and steps > 1:  # guidance changes the result; plain CFG (no norm rescale) is not the pipeline's
        plain = cmkit.text_to_image(teacher, PROMPTS, output="latent", negative_prompts=negs,
                                    **{**kw, "guidance_scale": 1.0})
        assert (plain - lat).abs().max() > 1e-3
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(QwenImageDenoiser, "_combine", GuidedDenoiser._combine)
            unscaled = cmkit.text_to_image(teacher, PROMPTS, output="latent", negative_prompts=negs, **kw)
        assert (unscaled - lat).abs().max() > 1e-3


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_prompt_encoder_is_the_pipelines(saved):
    _, teacher, pipe = saved["qwen"]
    assert (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx) == (TEMPLATE, DROP)
    assert pipe.vae_scale_factor == teacher.vae_scale_factor == 4
    teacher.prompt_encoder.max_sequence_length = 300
    try:
        cond = teacher.prompt_encoder(PROMPTS, ["x", "a much longer negative prompt"])
    finally:
        teacher.prompt_encoder.max_sequence_length = 512
    for key in ("", "negative_"):  # padded to the fixed length, then trimmed as the denoiser trims them
        assert cond[key + "prompt_embeds"].shape[:2] == cond[key + "prompt_embeds_mask"].shape == (2, 300)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=300)
    ours, our_mask = trimmed(cond["prompt_embeds"], cond["prompt_embeds_mask"])
    assert ours.shape == embeds.shape and torch.equal(our_mask, mask)
    assert (ours - embeds).abs().max() < 1e-5
    # the negative: its own prompts, the same shapes as the positive (one batched pass)
    neg, _ = pipe.encode_prompt(["x", "a much longer negative prompt"], max_sequence_length=300)
    assert (trimmed(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])[0] - neg).abs().max() < 1e-5


def test_the_vae_wrapper_is_the_pipelines_normalisation(saved):
    _, teacher, pipe = saved["qwen"]
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    c = pipe.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (c.latents_mean, c.latents_std))
    raw = pipe.vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    z = teacher.encode(x)
    assert z.shape == (2, 4, 8, 12) and (z - (raw - mean) / std).abs().max() < 1e-5
    back = pipe.vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0]
    assert (teacher.decode(z) - back).abs().max() < 1e-5
    assert teacher.vae.config.latent_channels == 4 and teacher.image_shape == (3, teacher.height, teacher.width)


def test_the_grid_is_the_pipelines_and_starts_at_pure_noise(saved):
    for name in ("qwen", "lightning"):
        _, teacher, pipe = saved[name]
        for n, (h, w) in ((8, (32, 32)), (3, (32, 48)), (2, (64, 32))):
            with teacher.sampling_at(h, w):
                ours = timestep_sigmas(teacher, n, None)
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            c = sched.config
            mu = flux_mu((h // 8) * (w // 8), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
            t = sched.sigmas.double()
            assert ours[0] == float("inf") and ours[-1] == 0.0 and len(ours) == n + 1
            assert np.allclose(ours[1:], (t / (1 - t)).tolist()[1:], rtol=1e-6)
    _, teacher, _ = saved["qwen"]
    with pytest.raises(ValueError, match="no 1-step grid .*shift_terminal 0.02.*2 or more steps"):
        timestep_sigmas(teacher, 1, None)


def test_bad_inputs_are_one_line(saved, tmp_path):
    folder, teacher, _ = saved["qwen"]
    for h, w in ((36, 32), (32, 44)):  # the VAE's factor 4 times the 2x2 packing
        with pytest.raises(ValueError, match="not a positive multiple of 8 .*2x2 packing"):
            teacher.resize(h, w)
    with pytest.raises(ValueError, match="max_sequence_length 1025 is beyond .* use at most 1024"):
        cmkit.text_to_image(teacher, PROMPTS, steps=2, max_sequence_length=1025)
    # the pipeline's other guidance_scale (a guidance-distilled transformer's embedding) cannot run: refused
    import shutil

    bad = tmp_path / "distilled"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": True}))
    with pytest.raises(ValueError, match="guidance_embeds=True.*true_cfg_scale"):
        cmkit.load_teacher(str(bad))
    with pytest.raises(TypeError, match="QwenTimestepProjEmbeddings.forward"):  # why: diffusers cannot run it either
        _pipe(bad)(prompt=PROMPTS, guidance_scale=3.5, num_inference_steps=2, height=32, width=32,
                   output_type="latent")
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        teacher.prompt_encoder(PROMPTS, ["only one negative"])


def test_a_student_of_the_stock_scheduler_samples_at_one_step_in_its_pipeline(saved, tmp_path):
    """The stock folder's terminal stretch has no 1-step grid (NaN in the pipeline too); its students sample and
    export without it (``student_scheduler``), so a 1-step student runs in QwenImagePipeline as in cmkit."""
    from cmkit.latent.flow_student import FlowConsistencyModel

    _, teacher, _ = saved["qwen"]
    student = FlowConsistencyModel(teacher.denoiser, teacher, steps=1)
    assert teacher.scheduler.config.shift_terminal == 0.02 and student.scheduler.config.shift_terminal is None
    student.save_pretrained(tmp_path / "student")
    pipe = _pipe(tmp_path / "student")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (1, 4):
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, latents=latents, output="latent", height=32,
                                   width=32)
        lat, _ = _theirs(pipe, latents, 32, 32, num_inference_steps=steps, true_cfg_scale=1.0)
        assert torch.isfinite(ours).all() and (ours - lat).abs().max() < 1e-4, steps


def _data():
    return caption_data(32, ("sneaker", "bag"))


@pytest.mark.parametrize("kind", ["flow_cd", "flow_cd_lora", "latent_scd", "latent_scd_lora"])
def test_students_after_a_few_steps_sample_in_the_pipeline_as_cmkit_samples_them(kind, saved, tmp_path,
                                                                                  monkeypatch):
    """On Lightning's scheduler, whose 1-step grid exists (the student's export takes the teacher's)."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, teacher, _ = saved["lightning"]
    sets = [f'objective.kind="{kind}"', "objective.w_min=2.0", "objective.w_max=2.0", "train.batch_size=4",
            "train.steps=2", "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[]"]
    sets += ["objective.num_grid_steps=4", "objective.target_ema=0.0"] if kind.startswith("flow") else \
        ["objective.tangent_warmup=1"]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, data=_data())
    student = cmkit.load_model(tmp_path / "run" / "model")
    if kind.endswith("lora"):
        assert hasattr(diffusers.QwenImagePipeline, "load_lora_weights")
        pipe = _pipe(folder, lora=tmp_path / "run" / "model")
        # the base folder's scheduler is the teacher's Euler; a user swaps in the one the student's sampler runs
        # (sCD's re-noising FlowMatchLCMScheduler), from the same config, as the full student's export does
        pipe.scheduler = getattr(diffusers, SAMPLERS[student.sampler]).from_config(pipe.scheduler.config)
    else:
        pipe = _pipe(tmp_path / "run" / "model")
    for steps in (1, 4):
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)  # a re-noising sampler (sCD's) draws its fresh noise from torch's generator
        # a re-noising step draws its noise in the pipeline's packed token order (family.fresh_noise)
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, solver=student.sampler, guidance_scale=1.0,
                                   latents=latents, spacing=None, output="latent", height=32, width=32)
        torch.manual_seed(10 + steps)
        lat, _ = _theirs(pipe, latents, 32, 32, num_inference_steps=steps, true_cfg_scale=1.0)
        assert (ours - lat).abs().max() < 1e-4
        before = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=1.0,
                                     latents=latents, spacing=None, output="latent", height=32, width=32)
        assert (ours - before).abs().max() > 1e-4  # the trained student, not the teacher, was sampled
