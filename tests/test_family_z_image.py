"""Z-Image (``ZImagePipeline``) against diffusers' own pipeline, both read from one saved tiny folder: the Euler solve
over the folder's grid with the pipeline's guidance (its ``cfg_normalization`` and ``cfg_truncation`` included) and
without, square and not, at 8 steps and 1; the grid; the padded caption features giving the pipeline's variable-length
ones; one-line errors; flow-CD and sCD students, full and LoRA, sampled in the pipeline as cmkit samples them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.z_image import tiny_z_image_pipeline
from cmkit.latent.flow_student import SAMPLERS
from cmkit.sampling.text2image import timestep_sigmas

PROMPTS = ["a red sneaker", "a green bag"]  # 32 and 30 tokens once templated: caption features of two lengths
LENGTH = 48  # the prompts' max_sequence_length in every call below


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def _pipe(folder, lora=None):
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the folder, cmkit's teacher loaded from it, diffusers' ZImagePipeline loaded from it)."""
    folder = tmp_path_factory.mktemp("z_image") / "pipe"
    tiny_z_image_pipeline(seed=3).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    assert teacher.prompt_encoder.max_sequence_length == 512 and teacher.height == 1024  # the pipeline's defaults
    teacher.image_size = 32
    return folder, teacher, _pipe(folder)


def _theirs(pipe, latents, steps, g, output_type, height=32, width=32, **options):
    # list(PROMPTS): the pipeline writes the templated prompts back into the list it is given
    return pipe(prompt=list(PROMPTS), latents=latents, num_inference_steps=steps, guidance_scale=g, height=height,
                width=width, max_sequence_length=LENGTH, output_type=output_type, **options).images


def _ours(teacher, latents, steps, w, height=32, width=32, output="image", **options):
    """The options as a call's own (``text_to_image(..., cfg_truncation=...)``), the teacher's restored after."""
    out = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=w, latents=latents,
                              spacing=None, height=height, width=width, max_sequence_length=LENGTH, output=output,
                              **options)
    assert (teacher.denoiser.cfg_normalization, teacher.denoiser.cfg_truncation) == (0.0, 1.0)
    return out


# cmkit's guidance w is the pipeline's g = w - 1 (cmkit's 1 = no guidance, the pipeline's 0); the guided case caps
# the norm at the conditional one's and truncates where 1 - t > 0.4 (the last two of 8 steps; never at 1 step)
GUIDED = dict(cfg_normalization=1.0, cfg_truncation=0.4)
CASES = [(4.0, GUIDED), (1.0, {})]


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.parametrize("steps", [8, 1])
def test_text_to_image_is_the_pipeline_with_and_without_guidance(saved, steps, size):
    _, teacher, pipe = saved
    h, w_ = size
    latents = torch.randn(2, 16, h // 4, w_ // 4, generator=torch.Generator().manual_seed(steps))
    results = []
    for w, options in CASES:
        ours = _ours(teacher, latents, steps, w, h, w_, output="latent", **options)
        theirs = _theirs(pipe, latents, steps, w - 1, "latent", h, w_, **options)
        assert (ours - theirs).abs().max() < 1e-4, (w, options)
        images = _ours(teacher, latents, steps, w, h, w_, **options)
        pixels = _theirs(pipe, latents, steps, w - 1, "pt", h, w_, **options)
        assert images.shape == (2, 3, h, w_)
        assert ((images / 2 + 0.5).clamp(0, 1) - pixels).abs().max() < 1e-4
        results.append(theirs)
    assert (results[0] - results[1]).abs().max() > 1e-2  # guidance changes the sample
    assert teacher.sample_shape == (16, 8, 8)  # the model's own size, restored after the call


def test_each_guidance_option_changes_the_pipelines_result_and_ours_follows(saved):
    """cfg_normalization alone (at a factor that caps), cfg_truncation alone, and the two together, at 8 steps: each
    gives another result than plain guidance, and cmkit's is the pipeline's each time."""
    _, teacher, pipe = saved
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = _theirs(pipe, latents, 8, 3.0, "latent")
    assert (_ours(teacher, latents, 8, 4.0, output="latent") - plain).abs().max() < 1e-4
    for options in (dict(cfg_normalization=1.0), dict(cfg_normalization=0.5), dict(cfg_truncation=0.4), GUIDED,
                    dict(cfg_normalization=True, cfg_truncation=0.0)):
        theirs = _theirs(pipe, latents, 8, 3.0, "latent", **options)
        assert (theirs - plain).abs().max() > 1e-3, options
        assert (_ours(teacher, latents, 8, 4.0, output="latent", **options) - theirs).abs().max() < 1e-4, options


def test_the_grid_is_the_pipelines_and_starts_at_pure_noise(saved):
    """Static shift (what Z-Image ships) and the resolution-dependent one: the pipeline's sigmas
    (``get_default_z_image_sigmas``, then ``mu`` from the image tokens) as flow times of cmkit's grid."""
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    _, teacher, _ = saved
    dynamic = tiny_z_image_pipeline(dynamic_shift=True)
    for model, tokens in ((teacher, 16), (dynamic, 16)):
        for n in (8, 3, 1):
            sched = type(model.scheduler).from_config(model.scheduler.config)
            sched.set_timesteps(sigmas=get_default_z_image_sigmas(n), mu=calculate_shift(tokens))
            grid = torch.tensor(timestep_sigmas(model, n, None), dtype=torch.float64)
            assert math.isinf(grid[0]) and grid[-1] == 0 and len(grid) == n + 1
            assert torch.allclose(grid[1:] / (1 + grid[1:]), sched.sigmas.double()[1:], rtol=0, atol=1e-7)
    # the dynamic shift follows the size: 32x48 has 24 image tokens, not 16
    with dynamic.sampling_at(32, 48):
        sched = type(dynamic.scheduler).from_config(dynamic.scheduler.config)
        sched.set_timesteps(sigmas=get_default_z_image_sigmas(4), mu=calculate_shift(24))
        grid = torch.tensor(dynamic.grid(4), dtype=torch.float64)
    assert torch.allclose(grid[1:] / (1 + grid[1:]), sched.sigmas.double()[1:], rtol=0, atol=1e-7)


def test_padded_caption_features_are_the_pipelines_variable_length_ones(saved):
    """The encoder pads to max_sequence_length with a mask; the masked rows are the pipeline's ``encode_prompt``
    list exactly (prompts of different lengths), the padding is zero, and the negatives default to ""."""
    _, teacher, pipe = saved
    teacher.prompt_encoder.max_sequence_length = LENGTH
    try:
        cond = teacher.encode_prompt(PROMPTS)
    finally:
        teacher.prompt_encoder.max_sequence_length = 512
    pos, neg = pipe.encode_prompt(list(PROMPTS), max_sequence_length=LENGTH)
    assert cond["prompt_embeds"].shape == cond["negative_prompt_embeds"].shape == (2, LENGTH, 16)
    lengths = cond["prompt_attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    for key, theirs in (("prompt", pos), ("negative_prompt", neg)):
        for i in range(2):
            mask = cond[f"{key}_attention_mask"][i]
            assert torch.equal(cond[f"{key}_embeds"][i][mask], theirs[i])
            assert not cond[f"{key}_embeds"][i][~mask].any()


def test_bad_inputs_are_one_line(saved):
    _, teacher, _ = saved
    cases = [(dict(height=36), "multiple of 8"), (dict(width=20), "multiple of 8"),
             (dict(max_sequence_length=129), "use at most 128")]
    for bad, needle in cases:
        with pytest.raises(ValueError) as e:
            cmkit.text_to_image(teacher, PROMPTS[:1], steps=1, **bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    for bad, needle in ((dict(guidance_rescale=0.7), "no guidance option 'guidance_rescale'"),
                        (dict(cfg_normalization=-1.0), "cfg_normalization"),
                        (dict(cfg_truncation=float("nan")), "cfg_truncation")):
        with pytest.raises(ValueError) as e:
            teacher.denoiser.guide_with(**bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert teacher.denoiser.cfg_normalization == 0.0 and teacher.denoiser.cfg_truncation == 1.0


@pytest.mark.parametrize("kind", ["flow_cd", "flow_cd_lora", "latent_scd", "latent_scd_lora"])
def test_students_sample_in_the_pipeline_as_cmkit_samples_them(kind, saved, tmp_path, monkeypatch):
    """Three training steps of each student on the tiny teacher, exported, then sampled by ZImagePipeline (a LoRA
    through its load_lora_weights on the teacher's folder) at guidance off, as cmkit samples it, at 1 and 4 steps."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, teacher, _ = saved
    sets = [f'objective.kind="{kind}"', "objective.w_min=3.0", "objective.w_max=3.0", "train.batch_size=4",
            "train.steps=3", "train.lr=1e-3", "train.log_every=3", "train.checkpoint_every=3", "train.ema_rates=[]"]
    sets += ["objective.num_grid_steps=4"] if kind.startswith("flow_cd") else ["objective.tangent_warmup=2"]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    fresh = cmkit.load_teacher(str(folder))  # a LoRA student adapts its teacher's own transformer: not the fixture's
    fresh.image_size = 32  # the data's size (the folder's default is the pipeline's 1024)
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, teacher=fresh,
            data=caption_data(32, ("sneaker", "bag")))
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    lora = kind.endswith("lora")
    pipe = _pipe(folder, lora=out) if lora else _pipe(out)
    if lora:  # the base folder's scheduler is the teacher's: the student's sampler (sCD's re-noising one) in its place
        pipe.scheduler = student.student_scheduler()
    assert type(pipe.scheduler).__name__ == SAMPLERS[student.sampler]
    for steps in (1, 4):
        latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)  # a re-noising scheduler draws its fresh noise from torch's generator
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, latents=latents, spacing=None, output="latent",
                                   height=32, width=32, max_sequence_length=LENGTH)
        torch.manual_seed(10 + steps)
        theirs = _theirs(pipe, latents, steps, 0.0, "latent")
        assert (ours - theirs).abs().max() < 1e-4, steps
        # trained: not the teacher's own sample (a student folder that held the teacher would pass the line above)
        teacher_out = _ours(teacher, latents, steps, 1.0, output="latent")
        assert (ours - teacher_out).abs().max() > 1e-6, steps
