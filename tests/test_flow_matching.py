"""The flow_matching teacher objective: its loss is the rectified-flow velocity error at SD3's logit-normal,
shifted times (checked against a computation written out here), a latent SD3 teacher trains through the real job
path into a StableDiffusion3Pipeline folder and resumes exactly, training's collapse of the T5-less zero tokens is
exact, and a pixel UNet trains over a flow-matching scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import caption_data
from safetensors.torch import load_file

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.sd3 import tiny_sd3_pipeline
from cmkit.objectives.flow_matching import FlowMatchingLoss


def _data():
    return caption_data()


def test_loss_is_the_velocity_error_at_shifted_logit_normal_times():
    model = tiny_sd3_pipeline(seed=4)
    model.prompt_encoder.collapse_zero_tokens = False  # the pipeline's tensors, fed to the transformer below
    cond = {k: v for k, v in model.encode_prompt(["a red sneaker", "a green bag"]).items()
            if not k.startswith("negative") and k != "guidance_scale"}
    x0 = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    loss_fn = FlowMatchingLoss(shift=3.0, logit_mean=0.2, logit_std=0.8)
    torch.manual_seed(7)
    loss = loss_fn(model, x0, **cond)
    # by hand, with the same draws: u ~ logit-normal, t = 3u / (1 + 2u), x_t = (1 - t) x0 + t eps, v = eps - x0
    torch.manual_seed(7)
    u = torch.sigmoid(0.2 + 0.8 * torch.randn(2))
    t = 3 * u / (1 + 2 * u)
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_hat = model.network(hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=cond["prompt_embeds"],
                          pooled_projections=cond["pooled_prompt_embeds"]).sample
    expected = (v_hat - (eps - x0)).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("dual", [False, True])
def test_collapsed_zero_tokens_give_the_pipelines_prediction_exactly(dual):
    model = tiny_sd3_pipeline(seed=5)
    if dual:  # SD3.5's layout: dual-attention blocks (a second, image-only attention) and q/k RMS norms
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(3)
        tr = model.denoiser.transformer
        kw = {k: v for k, v in tr.config.items() if not k.startswith("_")}
        model.denoiser.transformer = SD3Transformer2DModel(**{**kw, "dual_attention_layers": (0,),
                                                              "qk_norm": "rms_norm"}).eval()
        assert model.denoiser.transformer.transformer_blocks[0].attn2 is not None
    model.prompt_encoder.max_sequence_length = 64
    model.prompt_encoder.collapse_zero_tokens = False
    cond = model.encode_prompt(["a red sneaker", "a green bag"], guidance_scale=3.0)
    short = model.prompt_encoder.collapsed(cond)
    model.prompt_encoder.collapse_zero_tokens = True
    assert torch.equal(model.encode_prompt(["a red sneaker", "a green bag"], guidance_scale=3.0)["prompt_embeds"],
                       short["prompt_embeds"])  # cmkit's default encoding is the collapsed one
    assert short["prompt_embeds"].shape[1] == cond["prompt_embeds"].shape[1] - 63
    z = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, col, again = model(z, 1.3, **cond), model(z, 1.3, **short), model(z, 1.3, **cond)
    assert (full - col).abs().max() < 1e-5
    assert torch.equal(full, again)  # diffusers' own attention is back for an uncollapsed call
    with torch.no_grad():  # and the bias matters: without it the collapsed call is another prediction
        wrong = model(z, 1.3, **{k: v for k, v in short.items() if k != "zero_token_repeats"})
    assert (full - wrong).abs().max() > 1e-3


def _sd3_recipe(steps):
    return load_recipe(None, [
        'objective.kind="flow_matching"', 'objective.vae="cmkit:tiny-t2i/vae"', "objective.layers=1",
        "objective.heads=2", "objective.head_dim=8", "objective.text_hidden=16", "objective.text_layers=1",
        "objective.text_heads=2", "objective.projection_dim=8", "objective.prompt_dropout=0.5",
        "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[0.9]",
        f"train.steps={steps}"])


def test_latent_sd3_teacher_saves_a_pipeline_and_resumes_exactly(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_job("train-teacher", _sd3_recipe(4), whole, progress=False, data=_data())
    run_job("train-teacher", _sd3_recipe(2), split, progress=False, data=_data())
    run_job("train-teacher", _sd3_recipe(4), split, progress=False, data=_data())
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / "model" / weights), load_file(split / "model" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(whole / "model", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    # SD3's normalisation measured on the training latents: shift = their mean, scale = 1 / std around it
    from diffusers import AutoencoderKL

    with torch.no_grad():
        means = AutoencoderKL.from_pretrained(cmkit.loading.asset_path("tiny-t2i") / "vae").encode(
            _data().train).latent_dist.mean
    torch.testing.assert_close(pipe.vae.config.shift_factor, means.mean().item(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pipe.vae.config.scaling_factor, 1 / (means - means.mean()).std().item(), rtol=1e-4,
                               atol=0)
    assert pipe.scheduler.config.shift == 3.0
    img = pipe(["a red bag"], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    teacher = cmkit.load_teacher(str(whole / "model"))
    assert type(teacher.family).__name__ == "StableDiffusion3" and teacher.sample_shape == (4, 4, 4)


def test_pixel_flow_matching_trains_a_unet_over_a_flow_scheduler(tmp_path):
    recipe = load_recipe(None, [
        'data.name="digits"', 'model.backbone="unet"', "model.base=16", "model.levels=2", "model.layers_per_block=1",
        'objective.kind="flow_matching"', "objective.shift=1.0", "train.batch_size=8", "train.steps=3",
        "train.log_every=1", "train.checkpoint_every=3", "train.ema_rates=[]"])
    run_job("train-teacher", recipe, tmp_path / "run", progress=False)
    den = cmkit.load_teacher(str(tmp_path / "run" / "model"))
    assert type(den.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and den.prediction_type == "flow"
    x = torch.randn(2, *den.sample_shape)
    with torch.no_grad():  # x0 = x_t - t v with x_t = x / (1 + sigma), the network at timestep 1000 t
        sigma = 1.5
        t = sigma / (1 + sigma)
        v = den.unet(x / (1 + sigma), torch.full((2,), 1000 * t)).sample
        torch.testing.assert_close(den(x, sigma), x / (1 + sigma) - t * v, rtol=1e-5, atol=1e-5)
    out = cmkit.ode_solve(den, torch.randn(2, *den.sample_shape), [math.inf, 1.0, 0.0], method="heun")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("key,value,match", [("objective.shift", "0", "objective.shift"),
                                             ("objective.logit_std", "0", "logit_std"),
                                             ("objective.prompt_dropout", "1", "prompt_dropout")])
def test_bad_settings_are_refused_in_one_line(tmp_path, key, value, match):
    recipe = load_recipe(None, ['objective.kind="flow_matching"', 'objective.vae="cmkit:tiny-t2i/vae"',
                                f"{key}={value}"])
    with pytest.raises(ValueError, match=match):
        run_job("train-teacher", recipe, tmp_path / "bad", progress=False, data=_data())
