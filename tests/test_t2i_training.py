"""The two stages of a text-to-image teacher through the real job path: a VAE (kind "vae"), then a text-conditioned
UNet on its latents (kind "latent_ddpm"), saved as a pipeline folder diffusers opens; resume is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import caption_data
from safetensors.torch import load_file

from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.data import Dataset


def _data():
    return caption_data()


VAE = ['objective.kind="vae"', "objective.sample_size=16", "objective.channels=[16,16]", "objective.norm_num_groups=8",
       "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[]", "train.steps=2"]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    run_job("train-teacher", load_recipe(None, VAE), out, progress=False, data=_data())
    return out / "model"


def _unet_recipe(vae, steps):
    return load_recipe(None, [
        'objective.kind="latent_ddpm"', f'objective.vae="{vae}"', "objective.unet_base=16",
        "objective.text_hidden=16", "objective.text_layers=1", "objective.text_heads=2", "objective.unet_heads=2",
        "objective.prompt_dropout=0.5", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
        "train.ema_rates=[0.9]", f"train.steps={steps}"])


def test_vae_stage_writes_an_autoencoder(vae_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder)
    assert vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_latent_teacher_stage_saves_a_pipeline_and_resumes_exactly(vae_folder, tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_job("train-teacher", _unet_recipe(vae_folder, 4), whole, progress=False, data=_data())
    run_job("train-teacher", _unet_recipe(vae_folder, 2), split, progress=False, data=_data())
    run_job("train-teacher", _unet_recipe(vae_folder, 4), split, progress=False, data=_data())
    a = load_file(whole / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(whole / "model")
    pipe.set_progress_bar_config(disable=True)
    # the latent scale is measured on the training latents: 1 / std of the VAE posterior means of the 20 training
    # images (not the held-out ones), encoded here afresh; the resumed run keeps the value its first part measured
    from diffusers import AutoencoderKL

    with torch.no_grad():
        means = AutoencoderKL.from_pretrained(vae_folder).encode(_data().train).latent_dist.mean
    torch.testing.assert_close(pipe.vae.config.scaling_factor, 1 / means.std().item(), rtol=1e-4, atol=0)
    split_vae = AutoencoderKL.load_config(split / "model" / "vae")
    assert split_vae["scaling_factor"] == pipe.vae.config.scaling_factor
    img = pipe(["a red bag"], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    assert pipe.tokenizer("a red bag").input_ids[1:4] != [1, 1, 1]  # caption words are in the learnt vocabulary


def test_latent_teacher_needs_captions_and_a_vae(tmp_path, vae_folder):
    d = _data()
    plain = Dataset("plain", d.train, d.test)
    with pytest.raises(ValueError, match="trains on captioned images"):
        run_job("train-teacher", _unet_recipe(vae_folder, 1), tmp_path / "a", progress=False, data=plain)
    with pytest.raises(FileNotFoundError, match="is not an AutoencoderKL folder"):
        run_job("train-teacher", _unet_recipe(tmp_path / "nothing", 1), tmp_path / "b", progress=False, data=d)
