"""Latent consistency distillation: the exported LCM pipeline and LCM-LoRA file sample in diffusers' own pipelines
exactly as cmkit's sampler does; the student gains a guidance embedding; training steps and resumes."""

from __future__ import annotations

import pytest
import torch

from cmkit import load_model, load_teacher
from cmkit.latent.families.unet import LatentDenoiser, tiny_pipeline
from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, add_lora, student_unet
from cmkit.latent.students import export_lora
from cmkit.sampling.text2image import lcm_sample

PROMPTS = ["a red sneaker", "a green bag"]


def _perturb(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pipe(layout, folder):
    import diffusers

    cls = diffusers.StableDiffusionPipeline if layout == "sd" else diffusers.StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_exported_lcm_matches_diffusers_pipeline(layout, tmp_path):
    teacher = tiny_pipeline(layout, seed=5)
    unet = student_unet(teacher.unet, 32)
    assert unet.config.time_cond_proj_dim == 32 and teacher.unet.config.time_cond_proj_dim is None
    _perturb(unet.time_embedding.cond_proj)  # so that the guidance embedding matters
    lcm = LatentConsistencyModel(LCMFunction(LatentDenoiser(unet, teacher.scheduler)), teacher)
    lcm.save_pretrained(tmp_path / "lcm")
    pipe = _pipe(layout, tmp_path / "lcm")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    loaded = load_model(tmp_path / "lcm")
    assert isinstance(loaded, LatentConsistencyModel)
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    outs = {}
    for steps in (1, 4):
        ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(2), output_type="pt").images
        ours, nfe = lcm_sample(loaded, PROMPTS, steps, guidance_scale=6.0, latents=latents,
                               generator=torch.Generator().manual_seed(2), return_nfe=True)
        assert nfe == steps  # the guidance embedding: one pass a step
        assert (ours / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-4
        outs[steps] = ours
    other_w = lcm_sample(loaded, PROMPTS, 1, guidance_scale=2.0, latents=latents)
    assert (other_w - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_exported_lora_loads_into_the_teachers_pipeline(layout, tmp_path):
    from diffusers import LCMScheduler

    teacher = tiny_pipeline(layout, seed=6)
    teacher.save_pretrained(tmp_path / "teacher")
    base = load_teacher(str(tmp_path / "teacher"))
    # alpha != rank: a loader that took alpha = rank (what diffusers assumes of a file without the adapter's config)
    # would apply twice the adapter
    add_lora(base.unet, 4, 2.0, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    _perturb(torch.nn.ModuleList([m for n, m in base.unet.named_modules() if n.endswith("lora_B")]))
    lcm = LatentConsistencyModel(LCMFunction(base.denoiser), base, lora=True, base=str(tmp_path / "teacher"))
    lcm.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = _pipe(layout, tmp_path / "teacher")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = load_model(tmp_path / "lora")
    # the kohya / ComfyUI layout, one file, read back by diffusers' own converter
    export_lora(loaded, tmp_path / "kohya" / "lcm-lora.safetensors", layout="kohya")
    kohya = _pipe(layout, tmp_path / "teacher")
    kohya.scheduler = LCMScheduler.from_config(kohya.scheduler.config)
    kohya.load_lora_weights(tmp_path / "kohya", weight_name="lcm-lora.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "kohya" / "lcm-lora.safetensors", "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys()) and any(k.endswith(".lora_down.weight")
                                                                         for k in f.keys())
        python = {k: f.get_tensor(k) for k in f.keys()}
    from cmkit.cli.commands import main

    assert main(["export-lora", str(tmp_path / "lora"), str(tmp_path / "cli.safetensors"), "--layout", "kohya"]) == 0
    with safe_open(tmp_path / "cli.safetensors", "pt") as f:
        assert set(f.keys()) == set(python) and all(torch.equal(f.get_tensor(k), v) for k, v in python.items())
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    for steps in (1, 4):
        ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(4), output_type="pt").images
        ours = lcm_sample(loaded, PROMPTS, steps, guidance_scale=1.0, latents=latents,
                          generator=torch.Generator().manual_seed(4))
        assert (ours / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-4
        theirs = kohya(PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(4), output_type="pt").images
        assert (theirs - ref).abs().max() < 1e-4
    # and the adapter changed the teacher: without it the same sampler gives other images
    plain = LatentConsistencyModel(LCMFunction(load_teacher(str(tmp_path / "teacher")).denoiser), teacher)
    ours_1 = lcm_sample(loaded, PROMPTS, 1, latents=latents)
    assert (lcm_sample(plain, PROMPTS, 1, latents=latents) - ours_1).abs().max() > 1e-3


def test_lora_for_another_base_is_refused(tmp_path):
    a = tiny_pipeline("sd", seed=1)
    add_lora(a.unet, 4, 4.0, ["to_q", "to_v"])
    LatentConsistencyModel(LCMFunction(a.denoiser), a, lora=True).save_pretrained(tmp_path / "lora")
    xl = tiny_pipeline("sdxl", seed=1)
    with pytest.raises(ValueError, match="does not fit this base UNet"):
        LatentConsistencyModel.from_pretrained(tmp_path / "lora", base=xl)
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        add_lora(tiny_pipeline("sd").unet, 0, 4.0, ["to_q"])


def test_student_starts_as_the_teacher():
    teacher = tiny_pipeline("sd", seed=2)
    student = LatentDenoiser(student_unet(teacher.unet, 16), teacher.scheduler)
    z = torch.randn(2, *teacher.sample_shape)
    cond = teacher.encode_prompt(PROMPTS)
    with torch.no_grad():
        a = teacher(z, 3.0, prompt_embeds=cond["prompt_embeds"])
        b = student(z, 3.0, prompt_embeds=cond["prompt_embeds"], guidance_scale=7.0)
    assert torch.allclose(a, b, atol=1e-6)


def test_generate_command_with_a_teacher_and_an_lcm(tmp_path, capsys):
    from cmkit.cli import main

    teacher = tiny_pipeline("sd", seed=4)
    teacher.save_pretrained(tmp_path / "teacher")
    LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(teacher.unet, 8), teacher.scheduler)),
                           teacher).save_pretrained(tmp_path / "lcm")
    for model, steps in (("teacher", "3"), ("lcm", "2")):
        out = tmp_path / f"{model}.png"
        assert main(["generate", str(tmp_path / model), "--prompt", "a red sneaker", "--prompt", "a green bag",
                     "--num-per-prompt", "2", "--steps", steps, "--out", str(out)]) == 0
        assert out.is_file()
    assert main(["generate", str(tmp_path / "lcm"), "--prompt", "x", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["generate", "cmkit:digits-ddpm", "--prompt", "x"]) == 2
    assert "not a text-to-image teacher" in capsys.readouterr().err
