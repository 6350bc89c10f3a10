"""Latent text-to-image teachers: tiny random SD and SDXL pipelines built from configs, saved and read back through
the real diffusers folders, against diffusers' own pipelines and schedulers."""

from __future__ import annotations

import json

import pytest
import torch

from cmkit import load_teacher
from cmkit.latent.denoiser import TextToImageModel
from cmkit.latent.families.unet import tiny_pipeline
from cmkit.sampling import text_to_image, timestep_sigmas

PROMPTS = ["a red sneaker", "a green bag"]


@pytest.fixture(scope="module", params=["sd", "sdxl", "shipped"])
def folder(request, tmp_path_factory):
    """A tiny random pipeline of each layout, saved; and the shipped teacher (an SD layout) as it ships."""
    if request.param == "shipped":
        from cmkit.loading import asset_path

        return "sd", asset_path("tiny-t2i")
    path = tmp_path_factory.mktemp(request.param)
    tiny_pipeline(request.param, seed=3).save_pretrained(path)
    return request.param, path


def _pipeline(layout, path):
    import diffusers

    cls = diffusers.StableDiffusionPipeline if layout == "sd" else diffusers.StableDiffusionXLPipeline
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    return pipe


def test_guided_ddim_matches_diffusers_pipeline(folder):
    layout, path = folder
    teacher = load_teacher(str(path))
    assert isinstance(teacher, TextToImageModel) and teacher.prompt_encoder.xl == (layout == "sdxl")
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    ref = _pipeline(layout, path)(PROMPTS, latents=latents.clone(), num_inference_steps=25, guidance_scale=4.0,
                                  eta=0.0, output_type="pt").images
    ours, nfe = text_to_image(teacher, PROMPTS, steps=25, solver="ddim", guidance_scale=4.0, latents=latents,
                              spacing=None, return_nfe=True)
    assert nfe == 50  # 25 guided steps, two network passes each
    assert (ours / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-4
    # and guidance matters: an unguided solve lands elsewhere
    unguided = text_to_image(teacher, PROMPTS, steps=25, guidance_scale=1.0, latents=latents, spacing=None)
    assert (unguided - ours).abs().max() > 1e-2


def test_a_non_square_size_is_the_pipelines(folder):
    """height 16, width 24: the pipeline's latents and (SDXL) its time ids of that size; the model's own size after;
    a max_sequence_length a CLIP-only family does not take is refused."""
    layout, path = folder
    teacher = load_teacher(str(path))
    shape = teacher.sample_shape
    with teacher.sampling_at(16, 24):
        wide = teacher.sample_shape
    assert wide[1:] == (16 // teacher.vae_scale_factor, 24 // teacher.vae_scale_factor)
    latents = torch.randn(2, *wide, generator=torch.Generator().manual_seed(0))
    ref = _pipeline(layout, path)(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=4.0,
                                  eta=0.0, output_type="pt", height=16, width=24).images
    ours = text_to_image(teacher, PROMPTS, steps=4, solver="ddim", guidance_scale=4.0, latents=latents, spacing=None,
                         height=16, width=24)
    assert ours.shape == (2, 3, 16, 24) and (ours / 2 + 0.5).clamp(0, 1).sub(ref).abs().max() < 1e-4
    assert teacher.sample_shape == shape
    if layout == "sdxl":
        assert teacher.prompt_encoder.image_size == (teacher.height, teacher.width)
    with pytest.raises(ValueError, match="takes no max_sequence_length"):
        text_to_image(teacher, PROMPTS, steps=1, max_sequence_length=77)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_scheduler_step_at_every_timestep(prediction_type):
    from diffusers import DDPMScheduler

    model = tiny_pipeline("sd", prediction_type).double()
    den = model.denoiser
    sched = DDPMScheduler.from_config(den.scheduler.config, clip_sample=False)
    n = sched.config.num_train_timesteps
    t = torch.arange(n)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(n, *model.sample_shape, generator=g, dtype=torch.float64)  # a VP sample at each t
    embeds = model.encode_prompt(["a blue dress"])["prompt_embeds"].expand(n, -1, -1)
    with torch.no_grad():
        out = den.unet(sample, t, encoder_hidden_states=embeds).sample
        sigma = den.t_to_sigma(t)
        x0 = den(sample * (1 + sigma**2).sqrt().view(-1, 1, 1, 1), sigma, prompt_embeds=embeds)
    ref = torch.stack([sched.step(out[i: i + 1], int(i), sample[i: i + 1]).pred_original_sample[0] for i in range(n)])
    assert (x0 - ref).abs().max() < 1e-5


def test_sigma_timestep_round_trip():
    den = tiny_pipeline("sd").denoiser
    t = torch.linspace(0, 999, 2001, dtype=torch.float64)
    assert (den.sigma_to_t(den.t_to_sigma(t)) - t).abs().max() < 1e-9
    abar = torch.as_tensor(den.scheduler.alphas_cumprod, dtype=torch.float64)
    assert torch.allclose(den.t_to_sigma(torch.arange(1000.0)), ((1 - abar) / abar).sqrt(), rtol=1e-12)


def test_trailing_grid_starts_at_the_last_timestep_and_ends_at_zero():
    model = tiny_pipeline("sd")
    sig = timestep_sigmas(model, 1)
    assert sig == pytest.approx([model.sigma_max, 0.0])
    assert len(timestep_sigmas(model, 4)) == 5
    folder_grid = timestep_sigmas(model, 4, spacing=None)  # SD's leading spacing with steps_offset 1
    assert folder_grid[-1] == pytest.approx(model.sigma_min)
    with pytest.raises(ValueError, match="unknown spacing"):
        timestep_sigmas(model, 4, spacing="even")


def test_guidance_is_one_batched_pass_and_exact():
    model = tiny_pipeline("sd")
    z = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(PROMPTS, guidance_scale=3.0)
    calls = []
    hook = model.unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    with torch.no_grad():
        guided = model(z, 2.0, **cond)
        pos = model(z, 2.0, prompt_embeds=cond["prompt_embeds"])
        neg = model(z, 2.0, prompt_embeds=cond["negative_prompt_embeds"])
    hook.remove()
    assert calls == [4, 2, 2]
    assert model.passes(**cond) == 2 and model.passes(prompt_embeds=cond["prompt_embeds"]) == 1
    assert torch.allclose(guided, neg + 3.0 * (pos - neg), atol=1e-5)
    # per-sample guidance scales
    w = torch.tensor([1.0, 5.0])
    with torch.no_grad():
        per = model(z, 2.0, **{**cond, "guidance_scale": w})
    # float32 rounding of a batch of 4 against batches of 2, times w = 5: up to 1.2e-5 over 20 draws of z (outputs ~3.6)
    assert torch.allclose(per[0], pos[0], atol=1e-4) and torch.allclose(per[1], (neg + 5 * (pos - neg))[1], atol=1e-4)


def test_negative_prompts_and_sdxl_zeros():
    sd, xl = tiny_pipeline("sd"), tiny_pipeline("sdxl")
    c = sd.encode_prompt(PROMPTS)
    empty = sd.encode_prompt([""])["prompt_embeds"]
    assert torch.equal(c["negative_prompt_embeds"][1], empty[0])
    c2 = sd.encode_prompt(PROMPTS, negative_prompts=["a blue dress", "a red sneaker"])
    assert torch.equal(c2["negative_prompt_embeds"][1], c["prompt_embeds"][0])
    cx = xl.encode_prompt(PROMPTS)
    assert not cx["negative_prompt_embeds"].any() and not cx["negative_pooled_prompt_embeds"].any()
    assert cx["add_time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        sd.encode_prompt(PROMPTS + ["a blue dress"], negative_prompts=["x", "y"])


def test_vae_round_trip_uses_scaling_and_shift():
    from cmkit.latent.autoencoder import vae_decode, vae_encode

    model = tiny_pipeline("sd")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        raw = model.vae.encode(x).latent_dist.mean
        assert torch.allclose(z, raw * 0.5)
        model.vae.register_to_config(shift_factor=0.25)
        assert torch.allclose(vae_encode(model.vae, x), (raw - 0.25) * 0.5)
        dec = vae_decode(model.vae, vae_encode(model.vae, x))
        assert torch.allclose(dec, model.vae.decode(raw).sample, atol=1e-5)
        # half-precision input is encoded in float32
        assert model.encode(x.half()).dtype == torch.float32


@pytest.mark.parametrize("layout", ["sd", "sdxl"])
def test_bad_inputs_get_one_line_errors(tmp_path, layout):
    path = tmp_path / "teacher"
    tiny_pipeline(layout).save_pretrained(path)
    teacher = load_teacher(str(path))
    with pytest.raises(ValueError, match="3 prompt embeddings for a batch of 2 latents"):
        cond = teacher.encode_prompt(PROMPTS + ["a blue dress"])
        teacher(torch.randn(2, *teacher.sample_shape), 1.0, **cond)
    with pytest.raises(ValueError, match="latents of shape"):
        text_to_image(teacher, PROMPTS, steps=2, latents=torch.randn(3, *teacher.sample_shape))
    with pytest.raises(ValueError, match="needs prompt_embeds"):
        teacher(torch.randn(2, *teacher.sample_shape), 1.0)
    # a folder without a unet, and one without a vae
    import shutil

    no_unet = tmp_path / "no_unet"
    shutil.copytree(path, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(ValueError, match="lists unet but the folder has no unet/"):
        load_teacher(str(no_unet))
    no_vae = tmp_path / "no_vae"
    shutil.copytree(path, no_vae)
    shutil.rmtree(no_vae / "vae")
    index = json.loads((no_vae / "model_index.json").read_text())
    index["vae"] = [None, None]
    (no_vae / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="Pipeline folder without vae"):
        load_teacher(str(no_vae))


def test_hub_id_fails_fast_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError):  # once untimed: the first call may still be importing the pipelines
        load_teacher("someone/sd-model")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="could not load teacher 'someone/sd-model'"):
        load_teacher("someone/sd-model")
    assert time.perf_counter() - t0 < 10  # no retries against an unreachable hub


def test_a_malformed_tokenizer_file_is_named_in_one_line(tmp_path):
    from cmkit.latent.families.unet import tiny_pipeline

    folder = tmp_path / "p"
    tiny_pipeline().save_pretrained(folder)
    (folder / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2')
    with pytest.raises(ValueError, match=r"tokenizer/ could not be read \(JSONDecodeError.*tokenizer.json"):
        load_teacher(str(folder))
