"""Sana (``SanaPipeline``) against diffusers' own pipeline, both read from one saved tiny folder: cmkit's
DPM-Solver++(2M) over the folder's ``DPMSolverMultistepScheduler`` (flow sigmas, integer timesteps) and cmkit's
Euler over a ``FlowMatchEulerDiscreteScheduler`` of the same shift, each equal to the pipeline with that scheduler,
guided and not, square and not, at 8 steps and 1, in latents and decoded images; the prompt encoding (the complex
human instruction, the kept tokens, the masks) equal to ``encode_prompt``; the grid; the DC-AE wrapper; one-line
errors; flow-CD and sCD students, full and LoRA, sampled in ``SanaPipeline`` as cmkit samples them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.sana import SanaDenoiser, continuous_scheduler, tiny_sana_pipeline
from cmkit.sampling.text2image import timestep_sigmas

PROMPTS = ["a red sneaker", "a green bag"]
LENGTH = 16  # max_sequence_length in every call below: the instruction's end and the prompt share these tokens
EULER = "FlowMatchEulerDiscreteScheduler"


def _pipe(folder, lora=None, scheduler=None):
    import diffusers

    pipe = diffusers.SanaPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{scheduler: (folder, cmkit's teacher, diffusers' SanaPipeline)} for Sana's DPM scheduler and for Euler."""
    out = {}
    for name in ("DPMSolverMultistepScheduler", EULER):
        folder = tmp_path_factory.mktemp("sana") / name
        tiny_sana_pipeline(seed=3, scheduler=name).save_pretrained(folder)
        teacher = cmkit.load_teacher(str(folder))
        assert teacher.prompt_encoder.max_sequence_length == 300 and teacher.height == 32  # the pipeline's default
        out[name] = (folder, teacher, _pipe(folder))
    return out


def _theirs(pipe, latents, steps, w, height=32, width=32):
    """The pipeline's latents (captured at its last step) and its decoded images (output_type="pt")."""
    seen = {}

    def keep(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    images = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=w, height=height,
                  width=width, max_sequence_length=LENGTH, output_type="pt", use_resolution_binning=False,
                  callback_on_step_end=keep).images
    return seen["latents"], images


def _ours(teacher, latents, steps, w, solver, height=32, width=32):
    z = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver=solver, guidance_scale=w, latents=latents,
                            spacing=None, height=height, width=width, max_sequence_length=LENGTH, output="latent")
    return z, (teacher.decode(z) / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("scheduler, solver", [("DPMSolverMultistepScheduler", "dpmpp_2m"), (EULER, "euler")])
def test_text_to_image_is_the_pipeline_with_and_without_guidance(saved, scheduler, solver):
    _, teacher, pipe = saved[scheduler]
    for steps in (8, 1):
        for height, width in ((32, 32), (32, 64)):
            latents = torch.randn(2, 4, height // 4, width // 4, generator=torch.Generator().manual_seed(steps))
            got = {}
            for w in (4.5, 1.0):
                ours, theirs = _ours(teacher, latents, steps, w, solver, height, width), \
                    _theirs(pipe, latents, steps, w, height, width)
                for a, b in zip(ours, theirs, strict=True):
                    assert (a - b).abs().max() < 1e-4, (steps, height, width, w)
                got[w] = ours[0]
            assert (got[4.5] - got[1.0]).abs().max() > 1e-2  # guidance does something, and we follow it


def test_the_network_sees_the_dpm_schedulers_integer_timesteps(saved, monkeypatch):
    """DPMSolverMultistepScheduler's timesteps are int64 (floor(1000 t)) while its update uses t itself: cmkit's
    teacher does the same; fed 1000 t unrounded, it would not be the pipeline."""
    _, teacher, pipe = saved["DPMSolverMultistepScheduler"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = _theirs(pipe, latents, 8, 4.5)[0]
    assert teacher.denoiser.integer_timesteps
    monkeypatch.setattr(SanaDenoiser, "integer_timesteps", property(lambda self: False))
    assert (_ours(teacher, latents, 8, 4.5, "dpmpp_2m")[0] - theirs).abs().max() > 1e-3
    # and Euler over the DPM grid is not the pipeline's second-order multistep update
    monkeypatch.undo()
    assert (_ours(teacher, latents, 8, 4.5, "euler")[0] - theirs).abs().max() > 1e-3


def test_prompt_encoding_is_encode_prompts(saved):
    """The default complex human instruction, another one, none; a prompt cut to the kept tokens; the negative."""
    _, teacher, pipe = saved["DPMSolverMultistepScheduler"]
    pe = teacher.prompt_encoder
    prompts = ["A Red Sneaker  ", "a green bag on a long wooden table by the window"]
    default = pe.complex_human_instruction
    try:
        for chi in (default, ("Describe the image:", "User Prompt: "), ()):
            pe.complex_human_instruction, pe.max_sequence_length = chi, LENGTH
            with pytest.warns(UserWarning, match="truncated"):
                ours = pe(prompts, ["blurry", ""])
            e, m, ne, nm = pipe.encode_prompt(prompts, negative_prompt=["blurry", ""], max_sequence_length=LENGTH,
                                              complex_human_instruction=list(chi))
            for key, theirs in (("prompt_embeds", e), ("prompt_attention_mask", m), ("negative_prompt_embeds", ne),
                                ("negative_prompt_attention_mask", nm)):
                assert ours[key].shape == theirs.shape == (2, LENGTH, *theirs.shape[2:]), key
                assert (ours[key].float() - theirs.float()).abs().max() < 1e-5, (key, chi)
        pe.complex_human_instruction = ()
        without = pe(prompts)["prompt_embeds"]
        pe.complex_human_instruction = default
        assert (pe(prompts)["prompt_embeds"] - without).abs().max() > 1e-3  # the instruction changes the embedding
    finally:
        pe.complex_human_instruction, pe.max_sequence_length = default, 300


def test_the_grid_is_the_schedulers_as_the_pipeline_sets_it(saved):
    for name, (_, teacher, pipe) in saved.items():
        for n in (1, 8, 20):
            pipe.scheduler.set_timesteps(n)
            t = pipe.scheduler.sigmas.double()
            sig = torch.tensor(timestep_sigmas(teacher, n, None), dtype=torch.float64)
            torch.testing.assert_close(sig[1:-1], t[1:-1] / (1 - t[1:-1]))
            assert sig[-1] == 0 and len(sig) == n + 1
            if name == EULER:
                assert t[0] == 1 and sig[0] == float("inf")  # the Euler pipeline starts at pure noise
            else:  # the DPM grid starts below t = 1: the starting latents are the sample at that finite sigma
                assert 0.999 < t[0] < 1 and sig[0] == pytest.approx(float(t[0] / (1 - t[0])), rel=1e-12)


def test_the_dc_autoencoder_wrapper_is_the_pipelines_vae(saved):
    _, teacher, pipe = saved["DPMSolverMultistepScheduler"]
    vae, dc = teacher.vae, pipe.vae
    assert teacher.vae_scale_factor == pipe.vae_scale_factor == 4  # the latent cache's 2 ** (len(blocks) - 1)
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == dc.config.scaling_factor
    images = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = teacher.encode(images)
        assert torch.equal(vae.encode(images).latent_dist.std, torch.zeros_like(z))
        torch.testing.assert_close(z, dc.encode(images).latent * dc.config.scaling_factor)
        torch.testing.assert_close(teacher.decode(z), dc.decode(z / dc.config.scaling_factor).sample)


def test_bad_inputs_are_one_line(saved, tmp_path):
    _, teacher, _ = saved["DPMSolverMultistepScheduler"]
    top = teacher.family.max_sequence_length(teacher)
    cases = [(dict(height=30), "multiple of 4"), (dict(width=2), "multiple of 4"),
             (dict(max_sequence_length=top + 1), f"use at most {top}"),
             (dict(guidance_scale=float("nan")), "guidance")]
    for bad, needle in cases:
        with pytest.raises(ValueError) as e:
            cmkit.text_to_image(teacher, PROMPTS[:1], steps=1, **bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    folder = tmp_path / "bad"
    model = tiny_sana_pipeline(seed=3)
    model.denoiser.scheduler = type(model.scheduler).from_config({**model.scheduler.config, "use_flow_sigmas": False})
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match="runs over flow sigmas; set use_flow_sigmas") as e:
        cmkit.load_teacher(str(folder))
    assert "\n" not in str(e.value)


def test_copies_train_in_continuous_time_over_the_euler_grid(saved):
    """A copy of the teacher's denoiser (a full student, rCM's fake score) runs over the FlowMatchEuler scheduler of
    the teacher's shift, unrounded times: what its export samples with and what its tangents need."""
    import copy

    _, teacher, _ = saved["DPMSolverMultistepScheduler"]
    student = copy.deepcopy(teacher.denoiser)
    assert type(student.scheduler).__name__ == EULER and student.scheduler.config.shift == 3.0
    assert not student.integer_timesteps and teacher.denoiser.integer_timesteps
    assert type(continuous_scheduler(teacher.scheduler)).__name__ == EULER


def _student_pipe(folder, out, kind, student, teacher):
    """A full student's own folder; a LoRA student on the teacher's folder, with the scheduler its sampler runs
    (the folder's DPM-Solver is no consistency sampler: a user swaps it in, as here)."""
    import diffusers

    if not kind.endswith("lora"):
        return _pipe(out)
    cls = {"euler": EULER, "consistency": "FlowMatchLCMScheduler"}[student.sampler]
    return _pipe(folder, lora=out, scheduler=getattr(diffusers, cls)(shift=teacher.scheduler.config.flow_shift))


@pytest.mark.parametrize("kind", ["flow_cd", "flow_cd_lora", "latent_scd", "latent_scd_lora"])
def test_students_sample_in_the_pipeline_as_cmkit_samples_them(kind, saved, tmp_path, monkeypatch):
    """Three training steps of each student on the tiny DPM teacher, exported, then sampled by SanaPipeline (a LoRA
    through its load_lora_weights on the teacher's folder) at guidance off, as cmkit samples it, at 1 and 4 steps."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, teacher, _ = saved["DPMSolverMultistepScheduler"]
    sets = [f'objective.kind="{kind}"', "objective.w_min=3.0", "objective.w_max=3.0", "train.batch_size=4",
            "train.steps=3", "train.lr=1e-3", "train.log_every=3", "train.checkpoint_every=3", "train.ema_rates=[]",
            'objective.teacher_pipeline="SanaPipeline"']
    sets += ["objective.num_grid_steps=4"] if kind.startswith("flow_cd") else ["objective.tangent_warmup=2"]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False,
            data=caption_data(32, ("sneaker", "bag")))
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    assert json.loads((out / "cmkit.json").read_text())["pipeline"] == "SanaPipeline"
    pipe = _student_pipe(folder, out, kind, student, teacher)
    if not kind.endswith("lora"):
        assert type(pipe.scheduler).__name__ == {"euler": EULER, "consistency": "FlowMatchLCMScheduler"}[
            student.sampler] and pipe.scheduler.config.shift == 3.0
    for steps in (1, 4):
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)  # a re-noising sampler draws its fresh noise from torch's generator
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, latents=latents, spacing=None, output="latent",
                                   height=32, width=32, max_sequence_length=LENGTH)
        torch.manual_seed(10 + steps)
        theirs = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=1.0, height=32,
                      width=32, max_sequence_length=LENGTH, output_type="latent",
                      use_resolution_binning=False).images
        assert (ours - theirs).abs().max() < 1e-4, steps
        # trained: not the teacher's own sample (a student folder that held the teacher would pass the line above)
        teacher_out = _ours(teacher, latents, steps, 1.0, "euler")[0]
        assert (ours - teacher_out).abs().max() > 1e-6, steps
