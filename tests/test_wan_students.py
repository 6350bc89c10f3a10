"""Issue 34's first part: few-step students of Wan teachers (2.1 and 2.2's two experts): flow CD, sCD and rCM, full
and LoRA, trained three steps on captioned clips of the tiny teacher, exported, then sampled by ``WanPipeline`` (a
LoRA through its ``load_lora_weights`` on the teacher's folder) as cmkit samples them, at 1 and 4 steps."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "WanPipeline"):
    pytest.skip("this diffusers has no WanPipeline", allow_module_level=True)

import cmkit  # noqa: E402
from cmkit.cli.jobs import run_job  # noqa: E402
from cmkit.cli.recipes import load_recipe  # noqa: E402
from cmkit.latent.families.wan import tiny_wan_pipeline  # noqa: E402
from cmkit.latent.flow_student import SAMPLERS  # noqa: E402

PROMPTS = ["a red bag moving left", "a blue sneaker moving up"]
FRAMES, SIZE, LENGTH = 9, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


def clip_data(size: int = SIZE):
    """12 captioned 9-frame clips of ``size`` squares (10 to train on), random pixels."""
    from cmkit.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, FRAMES, size, size, generator=g) * 2 - 1
    caps = [PROMPTS[i % 2] for i in range(12)]
    return Dataset("tiny-clips", x[:10], x[10:], train_captions=caps[:10], test_captions=caps[10:])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for version, two, ti2v in (("2.1", False, False), ("2.2", True, False), ("ti2v", False, True)):
        folder = tmp_path_factory.mktemp("wan") / version
        model = tiny_wan_pipeline(seed=4, two_experts=two, image_size=SIZES[version], num_frames=FRAMES, ti2v=ti2v)
        model.max_sequence_length = LENGTH  # trained at 32 tokens, as cmkit:tiny-wan: its sample_size.json says so
        model.save_pretrained(folder, record_size=True)
        out[version] = folder
    return out


SIZES = {"2.1": SIZE, "2.2": SIZE, "ti2v": 32}  # TI2V-5B's VAE: spatial factor 16 and 2x2 patches


def _pipe(folder, lora=None):
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("version", ["2.1", "2.2", "ti2v"])
@pytest.mark.parametrize("kind", ["flow_cd", "flow_cd_lora", "latent_scd", "latent_scd_lora", "latent_rcm"])
def test_students_sample_in_the_pipeline_as_cmkit_samples_them(kind, version, folders, tmp_path, monkeypatch):
    if version == "2.2" and kind in ("latent_scd", "latent_rcm"):
        pytest.skip("2.1 covers these kinds; 2.2 flow_cd (full: both experts trained) and the LoRA refusal")
    if version == "ti2v" and kind not in ("flow_cd_lora", "latent_scd"):
        pytest.skip("2.1 covers these kinds; TI2V-5B's layout: its GPU recipe's kind and one tangent kind")
    size = SIZES[version]
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder = folders[version]
    sets = [f'objective.kind="{kind}"', "objective.w_min=3.0", "objective.w_max=3.0", "train.batch_size=4",
            "train.steps=3", "train.lr=1e-3", "train.log_every=3", "train.checkpoint_every=3", "train.ema_rates=[]"]
    sets += ["objective.num_grid_steps=4"] if kind.startswith("flow_cd") else ["objective.tangent_warmup=2"]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=4", "objective.lora_alpha=4.0"]
    teacher = cmkit.load_teacher(str(folder))
    if version == "2.2" and kind.endswith("lora"):
        with pytest.raises(ValueError, match="two-expert Wan 2.2 teacher is not supported") as e:
            run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False,
                    teacher=teacher, data=clip_data())
        assert "\n" not in str(e.value)
        return
    assert (teacher.height, teacher.width, teacher.num_frames, teacher.max_sequence_length) == (size, size, FRAMES,
                                                                                               LENGTH)
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, teacher=teacher,
            data=clip_data(size))
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    assert (student.height, student.width, student.num_frames) == (size, size, FRAMES)
    assert student.parts.max_sequence_length == LENGTH  # its prompts as distilled, not the pipeline's 512 tokens
    # a two-expert teacher's full student is the pair, each expert trained on its side of the boundary
    assert (student.denoiser.transformer_2 is not None) == (version == "2.2")
    if version == "2.2":
        for name in ("transformer", "transformer_2"):
            before, after = getattr(teacher.denoiser, name).state_dict(), getattr(student.denoiser, name).state_dict()
            assert any((before[k] - after[k]).abs().max() > 0 for k in before), name
    lora = kind.endswith("lora")
    pipe = _pipe(folder, lora=out) if lora else _pipe(out)
    if lora:  # the base folder's scheduler is the teacher's: the student's sampler in its place
        pipe.scheduler = student.student_scheduler()
    assert type(pipe.scheduler).__name__ == SAMPLERS[student.sampler]
    fresh = cmkit.load_teacher(str(folder))
    for steps in (1, 4):
        latents = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)  # a re-noising scheduler draws its fresh noise from torch's generator
        ours = cmkit.text_to_video(student, PROMPTS, steps=steps, latents=latents, spacing=None, output="latent",
                                   max_sequence_length=LENGTH)
        torch.manual_seed(10 + steps)
        theirs = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=0.0, height=size,
                      width=size, num_frames=FRAMES, max_sequence_length=LENGTH, output_type="latent").frames
        assert ours.shape == latents.shape
        assert (ours - theirs).abs().max() < 1e-4, steps
        # trained: not the teacher's own sample
        teacher_out = cmkit.text_to_video(fresh, PROMPTS, steps=steps, solver="euler", latents=latents, spacing=None,
                                          guidance_scale=1.0, output="latent", max_sequence_length=LENGTH)
        assert (ours - teacher_out).abs().max() > 1e-6, steps


def test_a_teacher_trained_off_the_pipelines_defaults_says_so_in_its_folder(tmp_path):
    """sample_size.json: the size, frame count and prompt length cmkit samples a saved teacher at; absent, the
    pipeline's defaults; a bad one is one line naming the file."""
    import json

    from cmkit.latent.denoiser import SIZE_FILE

    model = tiny_wan_pipeline(seed=1, image_size=16, num_frames=FRAMES)
    model.max_sequence_length = LENGTH
    model.save_pretrained(tmp_path / "plain")  # a save not asked to record it: the pipeline's defaults on loading
    assert not (tmp_path / "plain" / SIZE_FILE).exists()
    model.save_pretrained(tmp_path / "t", record_size=True)
    assert json.loads((tmp_path / "t" / SIZE_FILE).read_text()) == {"height": 16, "width": 16, "num_frames": FRAMES,
                                                                    "max_sequence_length": LENGTH}
    back = cmkit.load_teacher(str(tmp_path / "t"))
    assert (back.height, back.width, back.num_frames, back.max_sequence_length) == (16, 16, FRAMES, LENGTH)
    (tmp_path / "t" / SIZE_FILE).unlink()
    back = cmkit.load_teacher(str(tmp_path / "t"))
    assert (back.height, back.width, back.num_frames, back.max_sequence_length) == (480, 832, 81, 512)
    for bad, needle in (({"height": 2.5, "width": 16}, "height must be an integer"), ([16], "is not a sample size"),
                        ({"num_frames": 8}, "not 1 + a multiple of 4")):
        (tmp_path / "t" / SIZE_FILE).write_text(json.dumps(bad))
        with pytest.raises(ValueError) as e:
            cmkit.load_teacher(str(tmp_path / "t"))
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_wan_student_bad_inputs_are_one_line(folders, tmp_path, monkeypatch):
    """A guidance-folded Wan student asked for guidance, a step count its schedule cannot take, and a LoRA of an
    image family (SD3) put on a Wan teacher: one line each, nothing sampled."""
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline
    from cmkit.latent.flow_student import FlowConsistencyModel

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    common = ["train.batch_size=2", "train.steps=1", "train.log_every=1", "train.checkpoint_every=1",
              "train.ema_rates=[]", "objective.num_grid_steps=4", 'objective.kind="flow_cd_lora"',
              "objective.lora_rank=2", "objective.lora_alpha=2.0"]
    wan = cmkit.load_teacher(str(folders["2.1"]))
    run_job("distill", load_recipe(None, common), tmp_path / "wan", str(folders["2.1"]), progress=False,
            teacher=wan, data=clip_data())
    student = cmkit.load_model(tmp_path / "wan" / "model")
    sd3_folder = tmp_path / "sd3"
    tiny_sd3_pipeline(seed=3).save_pretrained(sd3_folder)
    from cmkit.data import Dataset

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    run_job("distill", load_recipe(None, common), tmp_path / "sd3-run", str(sd3_folder), progress=False,
            data=Dataset("tiny", images[:4], images[4:], train_captions=PROMPTS * 2, test_captions=PROMPTS))
    cases = [
        (lambda: cmkit.text_to_video(student, PROMPTS, guidance_scale=5.0), "folds guidance in"),
        (lambda: cmkit.text_to_video(student, PROMPTS, steps=0), "steps must be"),
        (lambda: cmkit.text_to_video(student, PROMPTS, steps=2.5), "steps must be"),
        (lambda: FlowConsistencyModel.from_pretrained(tmp_path / "sd3-run" / "model", base=wan),
         "is a LoRA of a StableDiffusion3Pipeline teacher; its base here is a WanPipeline"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
