"""DMD2 (``objectives.dmd2``): the DMD gradient and the GAN losses are the formulas written out by hand; on 1-D
Gaussian data with exact real and fake scores DMD moves an affine generator to the data's distribution; a run stopped
mid-way resumes to the weights of an unbroken one (generator, fake score, head, optimiser); the exported students
sample in their teacher's pipeline as cmkit samples them (a full flow student in StableDiffusion3Pipeline, a LoRA one
through ``load_lora_weights``); bad settings are refused in one line."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import caption_data
from safetensors.torch import load_file

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.objectives.dmd import dmd_loss
from cmkit.objectives.dmd2 import DMD2Config, GANHead, check_config, gan_losses

PROMPTS = ["a red sneaker", "a green bag"]


def test_the_dmd_gradient_is_fake_minus_real_over_the_mean_distance_to_the_real_prediction():
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0]], requires_grad=True)
    fake = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    real = torch.tensor([[1.5, -1.5, 1.0, 2.0], [0.5, 0.0, 1.0, -3.0]])
    dmd_loss(g, fake, real).sum().backward()
    # by hand: row 1 mean|G - real| = (0.5 + 0.5 + 0.5 + 1) / 4 = 0.625; row 2 (0.5 + 1 + 0 + 2) / 4 = 0.875
    want = 2 * (fake - real) / torch.tensor([[0.625], [0.875]]) / 4
    torch.testing.assert_close(g.grad, want)


def test_the_gan_losses_are_the_non_saturating_ones():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    # the head: -log sigmoid(real) - log(1 - sigmoid(fake)) = log(1 + e^-real) + log(1 + e^fake)
    want = torch.tensor([math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(0.5)),
                         math.log(1 + math.exp(1.0)) + math.log(1 + math.exp(3.0))])
    torch.testing.assert_close(gan_losses(real, fake), want)
    # the generator's: -log sigmoid(h) = log(1 + e^-h), as generator_loss adds it
    torch.testing.assert_close(F.softplus(-fake), torch.log1p(torch.exp(-fake)))
    # the head averages per-position logits over a channels-first map and over tokens alike
    head = GANHead(3, 4)
    fmap = torch.randn(2, 3, 2, 5)
    torch.testing.assert_close(head(fmap), head.net(fmap.flatten(2).transpose(1, 2)).squeeze(-1).mean(1))


def test_dmd_with_exact_scores_moves_a_gaussian_generator_to_the_data():
    """Data N(mu, s^2); generator x0 = a eps + b; at noise sigma the exact x0-predictions of a Gaussian N(m, v) are
    ``m + v / (v + sigma^2) (x - m)``: the real one with the data's, the fake one with the generator's current
    (a^2, b). DMD's gradient alone moves (a, b) to (s, mu)."""
    torch.manual_seed(0)
    mu, s = 2.0, 0.5
    a = torch.tensor(1.5, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.05)

    def posterior_mean(x, sigma, m, v):
        return m + v / (v + sigma**2) * (x - m)

    for _ in range(500):
        eps = torch.randn(256, 1)
        g = a * eps + b
        sigma = torch.exp(torch.randn(256, 1) * 0.8)
        x = (g + sigma * torch.randn_like(g)).detach()
        real = posterior_mean(x, sigma, mu, s**2)
        fake = posterior_mean(x, sigma, b.detach(), a.detach() ** 2)
        opt.zero_grad()
        dmd_loss(g, fake, real).mean().backward()
        opt.step()
    assert abs(b.item() - mu) < 0.05 * mu, b.item()
    assert abs(a.item() ** 2 - s**2) < 0.05 * s**2, a.item()


def _recipe(kind, steps, extra=()):
    sets = [f'objective.kind="{kind}"', "objective.steps=2", "objective.fake_updates=2", "objective.w_min=3.0",
            "objective.w_max=3.0", "objective.head_width=8", "train.batch_size=4", f"train.steps={steps}",
            "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=100", "train.ema_rates=[]", *extra]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    return load_recipe(None, sets)


@pytest.mark.parametrize("kind", ["dmd2", "dmd2_lora"])
def test_a_run_stopped_mid_way_resumes_to_the_weights_of_an_unbroken_one(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    data = caption_data(16, ("sneaker", "bag"))
    run_job("distill", _recipe(kind, 4), tmp_path / "whole", "cmkit:tiny-sd3", progress=False, data=data)
    run_job("distill", _recipe(kind, 3), tmp_path / "split", "cmkit:tiny-sd3", progress=False, data=data)
    shutil.rmtree(tmp_path / "split" / "model")  # as a run stopped at step 3 leaves it: checkpoints, no model
    run_job("distill", _recipe(kind, 4), tmp_path / "split", "cmkit:tiny-sd3", progress=False, data=data)
    files = sorted(p.name for p in (tmp_path / "whole" / "checkpoints" / "step-00000004").glob("*.safetensors"))
    assert {"model.safetensors", "objective.safetensors", "optimizer.safetensors"} <= set(files)
    for name in files:
        a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step-00000004" / name)
        assert a.keys() == b.keys() and a, name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    obj = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "objective.safetensors")
    assert any(k.startswith("head.") for k in obj)  # the head is the objective's, checkpointed with the run
    assert any(k.startswith("fake.") for k in obj) == (kind == "dmd2")  # a LoRA fake score: in the model's file
    first = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert any(".fake." in k for k in first) == (kind == "dmd2_lora")
    rows = [json.loads(r) for r in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert all({"gen_diversity", "fake_loss", "head_loss"} <= set(r) for r in rows)  # the collapse signals
    assert {"generator_gan"} <= set(rows[0]) and "generator_gan" not in rows[1]  # the generator trains at steps 0 and 2


def _sd3_pipe(folder, lora=None):
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["dmd2", "dmd2_lora"])
def test_an_exported_student_samples_in_the_teachers_pipeline_as_cmkit_samples_it(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    data = caption_data(16, ("sneaker", "bag"))
    teacher_dir = tmp_path / "teacher"
    cmkit.load_teacher("cmkit:tiny-sd3").save_pretrained(teacher_dir)
    run_job("distill", _recipe(kind, 2), tmp_path / "run", str(teacher_dir), progress=False, data=data)
    student = cmkit.load_model(tmp_path / "run" / "model")
    assert student.steps == 2 and student.sampler == "consistency"
    if kind == "dmd2":
        pipe = _sd3_pipe(tmp_path / "run" / "model")
        assert not any(".fake." in k for k in pipe.transformer.state_dict())
    else:
        pipe = _sd3_pipe(teacher_dir, tmp_path / "run" / "model")
        # the base folder's scheduler is the teacher's: the student's re-noising sampler in its place, as a user
        # of a LoRA student does (FlowConsistencyModel.student_scheduler)
        pipe.scheduler = student.student_scheduler()
        saved = load_file(tmp_path / "run" / "model" / "pytorch_lora_weights.safetensors")
        assert saved and not any("fake" in k for k in saved)  # the fake score's adapter is never exported
    h, w = student.image_shape[-2:] if hasattr(student, "image_shape") else (32, 32)
    for steps in (1, 2):
        latents = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)
        theirs = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                      latents=latents, height=h, width=w).images
        torch.manual_seed(10 + steps)
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, solver="consistency", guidance_scale=1.0,
                                   latents=latents, spacing=None, output="latent")
        assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("key, value, says", [("fake_updates", 0, "fake_updates"), ("gan_weight", float("nan"),
                                               "gan_weight"), ("gan_weight", -1.0, "gan_weight"),
                                              ("fake_lr_scale", 0.0, "fake_lr_scale"), ("steps", 5, "steps")])
def test_bad_settings_are_refused_in_one_line(key, value, says):
    with pytest.raises(ValueError, match=says) as e:
        check_config(DMD2Config(**{key: value}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["dmd2", "dmd2_lora"])
def test_a_unet_teachers_student_samples_in_stable_diffusion_pipeline_as_cmkit_samples_it(kind, tmp_path,
                                                                                          monkeypatch):
    """A UNet teacher's (SD layout) DMD2 generator is an LCM: a full one a ``StableDiffusionPipeline`` folder with
    ``LCMScheduler``, a LoRA one the file its ``load_lora_weights`` reads on the teacher's folder."""
    import diffusers
    from diffusers import LCMScheduler

    from cmkit.latent.families.unet import tiny_pipeline
    from cmkit.latent.lcm import LatentConsistencyModel
    from cmkit.sampling.text2image import lcm_sample

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    teacher_dir = tmp_path / "teacher"
    tiny_pipeline("sd", seed=5).save_pretrained(teacher_dir)
    size = cmkit.load_teacher(str(teacher_dir)).image_shape[-1]
    run_job("distill", _recipe(kind, 2), tmp_path / "run", str(teacher_dir), progress=False,
            data=caption_data(size, ("sneaker", "bag")))
    student = cmkit.load_model(tmp_path / "run" / "model")
    assert isinstance(student, LatentConsistencyModel)
    if kind == "dmd2":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(teacher_dir)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(tmp_path / "run" / "model")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    latents = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(3))
    untrained = diffusers.StableDiffusionPipeline.from_pretrained(teacher_dir)  # the generator's start: the teacher
    untrained.scheduler = LCMScheduler.from_config(untrained.scheduler.config)
    untrained.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(4), output_type="pt").images
        ours = lcm_sample(student, PROMPTS, steps, guidance_scale=1.0, latents=latents,
                          generator=torch.Generator().manual_seed(4))
        assert (ours / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-4, steps
        start = untrained(PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(4), output_type="pt").images
        assert (start - ref).abs().max() > 1e-4, steps  # trained: not the untrained generator's sample


def test_a_lora_run_with_gradient_checkpointing_takes_the_steps_of_one_without(tmp_path, monkeypatch):
    """The two adapters share one network: a checkpointed block recomputed in the backward pass must see the adapter
    its forward saw (the fake adapter's passes keep their activations), so the weights equal a plain run's."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    data = caption_data(16, ("sneaker", "bag"))
    for name, ckpt in (("plain", "false"), ("ckpt", "true")):
        run_job("distill", _recipe("dmd2_lora", 2, [f"train.gradient_checkpointing={ckpt}"]), tmp_path / name,
                "cmkit:tiny-sd3", progress=False, data=data)
    a = load_file(tmp_path / "plain" / "checkpoints" / "step-00000002" / "model.safetensors")
    b = load_file(tmp_path / "ckpt" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert a.keys() == b.keys() and any(".fake." in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
