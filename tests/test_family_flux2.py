"""FLUX.2 klein (``Flux2KleinPipeline``) and dev (``Flux2Pipeline``) as cmkit teachers and their students, against
diffusers' own pipelines: tiny random models built from configs (klein: a 27-layer Qwen3, a byte tokenizer with
Qwen3's chat template; dev: a Mistral 3 with a 30-layer language model and a Pixtral processor; both an
``AutoencoderKLFlux2`` with random batch-norm statistics), saved, and read back through both loaders."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.flux2 import patchify, tiny_flux2_dev_pipeline, tiny_flux2_klein_pipeline, unpatchify
from cmkit.latent.flow_student import SAMPLERS
from cmkit.sampling.text2image import timestep_sigmas

PROMPTS = ["a red sneaker", "a green bag"]
N_TOKENS = 48  # max_sequence_length of every call here: the template's 26 tokens and a prompt's bytes fit
DEV_TOKENS = 40  # dev's: the tiny tokenizer holds the pipeline's system message as one token


def _pipeline(folder, lora=None, cls="Flux2KleinPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_latents(pipe, z):
    """cmkit's normalised patch latents -> the pipeline's output_type="latent" (de-normalised, unpatchified)."""
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return unpatchify(z * std + bn.running_mean.view(1, -1, 1, 1))


def _theirs(pipe, latents, steps, w, height, width, output_type="latent", n_tokens=N_TOKENS):
    return pipe(prompt=PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=w, height=height,
                width=width, max_sequence_length=n_tokens, output_type=output_type).images


def _noise(height, width, seed=0):
    return torch.randn(2, 16, height // 16, width // 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, cmkit teacher loaded from it, the diffusers pipeline loaded from it)."""
    folder = tmp_path_factory.mktemp("klein") / "pipe"
    tiny_flux2_klein_pipeline(seed=3).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    assert teacher.prompt_encoder.max_sequence_length == 128  # the pipeline's 512, cut to the encoder's positions
    return folder, teacher, _pipeline(folder)


@pytest.mark.parametrize("steps", [8, 1])
@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_text_to_image_is_the_pipeline_with_guidance_on_and_off(saved, steps, height, width):
    _, teacher, pipe = saved
    latents = _noise(height, width, steps)
    kw = dict(steps=steps, solver="euler", latents=latents, spacing=None, height=height, width=width,
              max_sequence_length=N_TOKENS)
    outs = {}
    for w in (4.0, 1.0):
        ours = cmkit.text_to_image(teacher, PROMPTS, guidance_scale=w, output="latent", **kw)
        assert (_vae_latents(pipe, ours) - _theirs(pipe, latents, steps, w, height, width)).abs().max() < 1e-4
        outs[w] = ours
    images = cmkit.text_to_image(teacher, PROMPTS, guidance_scale=4.0, **kw)  # decoded, with the guidance on
    pixels = _theirs(pipe, latents, steps, 4.0, height, width, "pt")  # in [0, 1], clamped as the pipeline does
    assert images.shape == pixels.shape == (2, 3, height, width)
    assert ((images / 2 + 0.5).clamp(0, 1) - pixels).abs().max() < 1e-4
    assert (outs[4.0] - outs[1.0]).abs().max() > 1e-2  # the guidance is on: against the empty prompt
    assert teacher.height == teacher.width == 1024  # the pipeline's default size, restored after each call


def test_the_grid_is_the_pipelines_with_its_step_dependent_mu(saved):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    _, teacher, pipe = saved
    for n, (h, w) in ((8, (32, 32)), (3, (32, 48)), (1, (1024, 1024)), (4, (1536, 1536))):  # 4 to 9216 tokens
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu((h // 16) * (w // 16), n))
        with teacher.sampling_at(h, w):
            grid = torch.tensor(timestep_sigmas(teacher, n, None), dtype=torch.float64)
        assert math.isinf(grid[0]) and grid[-1] == 0 and len(grid) == n + 1
        assert torch.allclose(grid[1:] / (1 + grid[1:]), sched.sigmas.double()[1:], rtol=0, atol=1e-12), (n, h, w)
    with teacher.sampling_at(32, 32):  # mu moves with the step count, not only the size
        assert timestep_sigmas(teacher, 8, None)[1] != timestep_sigmas(teacher, 2, None)[1]


def test_prompts_encode_as_the_pipeline_encodes_them(saved):
    _, teacher, pipe = saved
    with teacher.sampling_at(max_sequence_length=N_TOKENS):
        cond = teacher.encode_prompt(PROMPTS)
    embeds, ids = pipe.encode_prompt(PROMPTS, max_sequence_length=N_TOKENS)
    assert cond["prompt_embeds"].shape == (2, N_TOKENS, 3 * 16) and torch.equal(cond["prompt_embeds"], embeds)
    negative, _ = pipe.encode_prompt(["", ""], max_sequence_length=N_TOKENS)
    assert torch.equal(cond["negative_prompt_embeds"], negative)
    assert not torch.equal(embeds[0], embeds[1])
    assert ids.shape == (2, N_TOKENS, 4) and torch.equal(ids[0, :, 3], torch.arange(N_TOKENS))


def test_the_vae_presents_the_pipelines_normalised_patch_latents(saved):
    _, teacher, pipe = saved
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = teacher.encode(images)
    with torch.no_grad():
        theirs = pipe._encode_vae_image(images, None)  # the pipeline's own reference-image encoding
        decoded = pipe.vae.decode(_vae_latents(pipe, z)).sample
    assert z.shape == (2, 16, 2, 3) and (z - theirs).abs().max() < 1e-5
    assert (teacher.decode(z) - decoded).abs().max() < 1e-5
    assert teacher.vae_scale_factor == 16 and teacher.vae.config.latent_channels == 16
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(patchify(x), pipe._patchify_latents(x)) and torch.equal(unpatchify(patchify(x)), x)


def test_a_step_distilled_folder_ignores_guidance_as_its_pipeline_does(tmp_path):
    folder = tmp_path / "distilled"
    tiny_flux2_klein_pipeline(seed=5, distilled=True).save_pretrained(folder)
    teacher, pipe = cmkit.load_teacher(str(folder)), _pipeline(folder)
    assert pipe.config.is_distilled and teacher.denoiser.distilled
    latents = _noise(32, 32)
    kw = dict(steps=2, solver="euler", latents=latents, spacing=None, height=32, width=32, output="latent",
              max_sequence_length=N_TOKENS)
    ours = cmkit.text_to_image(teacher, PROMPTS, guidance_scale=4.0, **kw)
    assert torch.equal(ours, cmkit.text_to_image(teacher, PROMPTS, guidance_scale=1.0, **kw))
    assert teacher.passes(**teacher.encode_prompt(PROMPTS, guidance_scale=4.0)) == 1
    assert (_vae_latents(pipe, ours) - _theirs(pipe, latents, 2, 4.0, 32, 32)).abs().max() < 1e-4


def test_bad_inputs_name_the_problem(saved, tmp_path):
    import json

    folder, teacher, _ = saved
    with pytest.raises(ValueError, match=r"^image width 40 is not a positive multiple of 16 \(the VAE's factor 8 "
                                         r"times FLUX.2's 2x2 patches\); try 32$"):
        teacher.resize(32, 40)
    with pytest.raises(ValueError, match=r"max_sequence_length 129 is beyond .* use at most 128"):
        cmkit.text_to_image(teacher, PROMPTS, steps=1, height=32, width=32, max_sequence_length=129)
    with pytest.raises(ValueError, match="guides against the empty prompt only .* leave negative_prompts out"):
        cmkit.text_to_image(teacher, PROMPTS, steps=1, height=32, width=32, negative_prompts="blurry")
    bad = tmp_path / "bad"
    tiny_flux2_klein_pipeline(seed=1).save_pretrained(bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "tokenizer"}))
    with pytest.raises(ValueError, match="Flux2KleinPipeline folder without tokenizer; it needs"):
        cmkit.load_teacher(str(bad))


# --- students: a few steps of flow CD and sCD, full and LoRA, exported and sampled in Flux2KleinPipeline


# the sCD students sample with the re-noising sampler (FlowMatchLCMScheduler), which draws its fresh noise in the
# pipeline's token layout (B, h*w, 4C): cmkit draws it in that order too (family.fresh_noise)
STUDENT_RUNS = {
    "flow_cd": ['objective.kind="flow_cd"', "objective.num_grid_steps=4"],
    "flow_cd_lora": ['objective.kind="flow_cd_lora"', "objective.num_grid_steps=4", "objective.lora_rank=4",
                     "objective.lora_alpha=4.0"],
    "latent_scd": ['objective.kind="latent_scd"', "objective.tangent_warmup=1"],
    "latent_scd_lora": ['objective.kind="latent_scd_lora"', "objective.tangent_warmup=1",
                        "objective.lora_rank=4", "objective.lora_alpha=4.0"],
}


@pytest.mark.parametrize("variant, kind", [("klein", k) for k in STUDENT_RUNS] + [("dev", "flow_cd"),
                                                                                  ("dev", "flow_cd_lora")])
def test_students_sample_in_the_pipeline_as_cmkit_samples_them(variant, kind, request, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, _, base_pipe = request.getfixturevalue("saved" if variant == "klein" else "saved_dev")
    cls, n_tokens = ("Flux2KleinPipeline", N_TOKENS) if variant == "klein" else ("Flux2Pipeline", DEV_TOKENS)
    teacher = cmkit.load_teacher(str(folder))  # its own: a LoRA student's adapter goes on the teacher's network
    teacher.image_size = 32  # the data's size (the folder's own is the pipeline's 1024)
    teacher.max_sequence_length = n_tokens  # the captions' embeddings, cached at the length sampled below
    sets = [*STUDENT_RUNS[kind], "objective.w_min=2.0", "objective.w_max=2.0", "train.batch_size=4", "train.steps=2",
            "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[]",
            f'objective.teacher_pipeline="{cls}"']
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, teacher=teacher,
            data=caption_data(32, ("sneaker", "bag")))
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    pipe = _pipeline(folder, lora=out, cls=cls) if kind.endswith("lora") else _pipeline(out, cls=cls)
    if variant == "klein" and not kind.endswith("lora"):  # folded guidance: the pipeline samples it unguided
        assert pipe.config.is_distilled
    if kind.endswith("lora"):  # the base folder's scheduler is the teacher's; a user swaps in the student's sampler's
        pipe.scheduler = getattr(diffusers, SAMPLERS[student.sampler]).from_config(pipe.scheduler.config)
    # klein's latent output is de-normalised and unpatchified, dev's the normalised patch tokens
    ours_as_theirs = (lambda z: _vae_latents(pipe, z)) if variant == "klein" else _tokens
    for steps in (1, 4):
        latents = _noise(32, 32, steps)
        torch.manual_seed(10 + steps)  # a re-noising sampler (sCD's) draws its fresh noise from torch's generator
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, latents=latents, height=32, width=32,
                                   max_sequence_length=n_tokens, output="latent")
        torch.manual_seed(10 + steps)
        theirs = _theirs(pipe, latents, steps, 1.0, 32, 32, n_tokens=n_tokens)
        assert (ours_as_theirs(ours) - theirs).abs().max() < 1e-4, steps
        base = _theirs(base_pipe, latents, steps, 1.0, 32, 32, n_tokens=n_tokens)
        assert (theirs - base).abs().max() > 1e-4  # the student's weights are what the pipeline ran, not the base's


# --- FLUX.2 dev: the same transformer and VAE, Mistral 3's prompt embedding, the guidance embedding


def _tokens(z):
    """cmkit's (B, 4C, h, w) patch latents as Flux2Pipeline's output_type="latent" gives them: (B, h * w, 4C)."""
    return z.flatten(2).permute(0, 2, 1)


@pytest.fixture(scope="module")
def saved_dev(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dev") / "pipe"
    tiny_flux2_dev_pipeline(seed=4).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    assert teacher.prompt_encoder.max_sequence_length == 128  # the pipeline's 512, cut to the encoder's positions
    return folder, teacher, _pipeline(folder, cls="Flux2Pipeline")


@pytest.mark.parametrize("steps, height, width", [(8, 32, 48), (1, 32, 32)])
def test_dev_text_to_image_is_the_pipeline_with_its_guidance_embedding(saved_dev, steps, height, width):
    _, teacher, pipe = saved_dev
    latents = _noise(height, width, steps)
    kw = dict(steps=steps, solver="euler", latents=latents, spacing=None, height=height, width=width,
              max_sequence_length=DEV_TOKENS)
    outs = {}
    for w in (4.0, 1.0):
        ours = cmkit.text_to_image(teacher, PROMPTS, guidance_scale=w, output="latent", **kw)
        theirs = _theirs(pipe, latents, steps, w, height, width, n_tokens=DEV_TOKENS)
        assert (_tokens(ours) - theirs).abs().max() < 1e-4
        outs[w] = ours
    assert (outs[4.0] - outs[1.0]).abs().max() > 1e-2  # the scale reaches the guidance embedding
    assert teacher.passes(**teacher.encode_prompt(PROMPTS, guidance_scale=4.0)) == 1  # one pass, no negative
    images = cmkit.text_to_image(teacher, PROMPTS, guidance_scale=4.0, **kw)
    pixels = _theirs(pipe, latents, steps, 4.0, height, width, "pt", n_tokens=DEV_TOKENS)
    assert images.shape == pixels.shape == (2, 3, height, width)
    assert ((images / 2 + 0.5).clamp(0, 1) - pixels).abs().max() < 1e-4


def test_dev_prompts_encode_as_the_pipeline_encodes_them_and_take_no_negative(saved_dev):
    _, teacher, pipe = saved_dev
    with teacher.sampling_at(max_sequence_length=DEV_TOKENS):
        cond = teacher.encode_prompt(PROMPTS)
    embeds, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=DEV_TOKENS)
    assert set(cond) == {"prompt_embeds", "guidance_scale"} and torch.equal(cond["prompt_embeds"], embeds)
    assert not torch.equal(embeds[0], embeds[1])  # the prompts are inside the window, after the system message
    with pytest.raises(ValueError, match="a Flux2Pipeline embeds its guidance scale .* leave negative_prompts out"):
        cmkit.text_to_image(teacher, PROMPTS, steps=1, height=32, width=32, negative_prompts="blurry")
