"""The shipped tiny text-to-video teacher, ``cmkit:tiny-wan``: a WanPipeline folder under 25 MB, trained by the two
committed recipes (recipes/tiny-wan-vae.toml, recipes/tiny-wan-transformer.toml) on the moving Fashion-MNIST
clips; it opens in diffusers' WanPipeline and samples there as cmkit samples it, at the size it was trained at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cmkit  # noqa: E402
from cmkit.cli.recipes import load_recipe  # noqa: E402
from cmkit.core.assets import asset_path  # noqa: E402

PROMPTS = ["a red sneaker moving left", "a blue bag moving up"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def test_the_folder_is_small_and_made_by_its_recipes():
    folder = asset_path("tiny-wan")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 25 * 2**20, size
    vae = json.loads((folder / "vae" / "config.json").read_text())
    r = load_recipe(RECIPES / "tiny-wan-vae.toml").objective
    assert (vae["base_dim"], vae["z_dim"], vae["dim_mult"], vae["temperal_downsample"]) == \
        (r.base_dim, r.z_dim, list(r.dim_mult), list(r.temperal_downsample))
    assert vae["latents_std"] != [1.0] * r.z_dim  # measured on the clips while training, not the default
    tr = json.loads((folder / "transformer" / "config.json").read_text())
    r = load_recipe(RECIPES / "tiny-wan-transformer.toml").objective
    assert (tr["num_layers"], tr["num_attention_heads"], tr["attention_head_dim"]) == (r.layers, r.heads, r.head_dim)
    assert json.loads((folder / "sample_size.json").read_text()) == {"height": 32, "width": 32, "num_frames": 9,
                                                                     "max_sequence_length": r.max_sequence_length}


def test_it_samples_in_wan_pipeline_as_cmkit_samples_it():
    teacher = cmkit.load_teacher("cmkit:tiny-wan")
    assert (teacher.height, teacher.width, teacher.num_frames) == (32, 32, 9)
    pipe = diffusers.WanPipeline.from_pretrained(asset_path("tiny-wan"))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = cmkit.text_to_video(teacher, PROMPTS, steps=4, solver="euler", guidance_scale=5.0, latents=latents,
                               spacing=None, output="latent")
    theirs = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                  num_frames=9, max_sequence_length=teacher.max_sequence_length, output_type="latent").frames
    assert ours.shape == theirs.shape == latents.shape
    assert (ours - theirs).abs().max() < 1e-4
