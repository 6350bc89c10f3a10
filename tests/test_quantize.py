"""Quantised frozen teachers (``teacher.quantize``, ``cmkit.latent.quantize``): the tiny flow teacher in int8 stays
within 2% of its full-precision denoising; a flow-CD LoRA trains on the quantised base, and the exported LoRA on the
full-precision base samples in ``StableDiffusion3Pipeline`` as cmkit samples it; bad settings are one line."""

from __future__ import annotations

import pytest
import torch
from conftest import caption_data

pytest.importorskip("torchao")

import cmkit  # noqa: E402
from cmkit.cli.jobs import run_job  # noqa: E402
from cmkit.cli.recipes import load_recipe  # noqa: E402
from cmkit.latent.quantize import quantize_teacher  # noqa: E402

PROMPTS = ["a red sneaker", "a green bag"]


def test_an_int8_teacher_denoises_within_two_percent_of_the_full_one():
    full = cmkit.load_teacher("cmkit:tiny-sd3")
    quant = cmkit.load_teacher("cmkit:tiny-sd3")
    report = quantize_teacher(quant, "int8", guidance_scale=4.0)
    assert report["layers"] > 0 and 0 < report["relative_error"] < 0.02
    linear = next(m for m in quant.network.modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight).__name__ == "Int8Tensor"  # torchao's weight-only int8
    # the report is the error of the same probe computed independently here
    z = torch.randn(2, *full.sample_shape, generator=torch.Generator().manual_seed(5)) * 2
    cond = full.encode_prompt(PROMPTS, guidance_scale=4.0)
    sigma = torch.full((2,), 2.0)
    with torch.no_grad():
        a, b = full(z, sigma, **cond), quant(z, sigma, **cond)
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.02


def _recipe(kind, extra=()):
    return load_recipe(None, [f'objective.kind="{kind}"', 'teacher.quantize="int8"', "objective.num_grid_steps=4",
                              "objective.w_min=3.0", "objective.w_max=3.0", "train.batch_size=4", "train.steps=2",
                              "train.lr=1e-3", "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[]",
                              *extra])


def test_a_lora_on_the_int8_base_exports_for_the_full_precision_one(tmp_path, monkeypatch, capsys):
    import diffusers

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    teacher_dir = tmp_path / "teacher"
    cmkit.load_teacher("cmkit:tiny-sd3").save_pretrained(teacher_dir)
    run_job("distill", _recipe("flow_cd_lora", ["objective.lora_rank=4", "objective.lora_alpha=4.0"]),
            tmp_path / "run", str(teacher_dir), progress=False, data=caption_data(16, ("sneaker", "bag")))
    said = capsys.readouterr().out
    assert "teacher quantised to int8" in said and "% of the full-precision teacher's output" in said
    student = cmkit.load_model(tmp_path / "run" / "model")  # on the full-precision folder it records
    assert not any("Int8" in type(p.data).__name__ for p in student.network.parameters())
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(teacher_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(tmp_path / "run" / "model")
    pipe.scheduler = student.student_scheduler()
    pipe.set_progress_bar_config(disable=True)
    h, w = student.image_shape[-2:]
    outs = {}
    for steps in (1, 2):
        latents = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(steps))
        theirs = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                      latents=latents, height=h, width=w).images
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, latents=latents, spacing=None, output="latent")
        assert (ours - theirs).abs().max() < 1e-4, steps
        outs[steps] = (latents, theirs)
    plain = diffusers.StableDiffusion3Pipeline.from_pretrained(teacher_dir, text_encoder_3=None, tokenizer_3=None)
    plain.scheduler = student.student_scheduler()
    plain.set_progress_bar_config(disable=True)
    latents, theirs = outs[1]
    start = plain(prompt=PROMPTS, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                  latents=latents, height=h, width=w).images
    assert (start - theirs).abs().max() > 1e-5  # the adapter trained: not the bare base


@pytest.mark.parametrize("sets, says", [(['teacher.quantize="int3"'], "teacher.quantize must be"),
                                        (['teacher.quantize="int8"', 'objective.kind="flow_cd"'],
                                         "trains a full copy of the teacher")])
def test_bad_quantize_settings_are_one_line(sets, says, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as e:
        run_job("distill", load_recipe(None, ['objective.kind="flow_cd_lora"', *sets]), tmp_path / "run",
                "cmkit:tiny-sd3", progress=False, data=caption_data(16, ("sneaker", "bag")))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
