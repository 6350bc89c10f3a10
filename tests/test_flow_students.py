"""Few-step students of flow-matching teachers: exported into the teacher's own pipeline class (a full student as a
pipeline folder, a LoRA student through ``load_lora_weights``), sampled there exactly as cmkit samples them; the
consistency-distillation target tied to its equation; a short run brings the one-step sample toward the teacher's
ODE solution."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.flux import pack, tiny_flux_pipeline, unpack
from cmkit.latent.families.sd3 import tiny_sd3_pipeline
from cmkit.latent.flow_student import FlowConsistencyModel, add_transformer_lora
from cmkit.latent.students import export_lora
from cmkit.objectives.flow_cd import FlowCDConfig, FlowConsistencyDistillation

PROMPTS = ["a red sneaker", "a green bag"]


def _perturbed(den, seed=0):
    """A student that differs from its teacher (so a test would see a teacher sampled in its place)."""
    student = copy.deepcopy(den)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def _pipeline(kind, folder, lora=None):
    import diffusers

    if kind == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = diffusers.FluxPipeline.from_pretrained(folder)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(kind, pipe, latents, steps):
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent", height=32,
              width=32, max_sequence_length=16)
    if kind == "sd3":
        return pipe(latents=latents, **kw).images
    return unpack(pipe(latents=pack(latents), **kw).images, 8, 8)


def _teacher(kind, tmp_path):
    folder = tmp_path / "teacher"
    (tiny_sd3_pipeline(seed=7) if kind == "sd3" else tiny_flux_pipeline(guidance=True, seed=7)).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    teacher.prompt_encoder.max_sequence_length = 16
    teacher.image_size = 32
    return folder, teacher


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_exported_student_is_sampled_by_the_teachers_pipeline_as_cmkit_samples_it(kind, tmp_path):
    _, teacher = _teacher(kind, tmp_path)
    student = FlowConsistencyModel(_perturbed(teacher.denoiser), teacher, steps=4, guidance_scale=4.0)
    student.save_pretrained(tmp_path / "student")
    pipe = _pipeline(kind, tmp_path / "student")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    loaded = cmkit.load_model(tmp_path / "student")
    assert isinstance(loaded, FlowConsistencyModel) and loaded.steps == 4 and loaded.guidance_scale == 4.0
    for steps in (1, 4):
        latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(steps))
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, solver="euler", guidance_scale=1.0,
                                   latents=latents, spacing=None, output="latent")
        assert (ours - _theirs(kind, pipe, latents, steps)).abs().max() < 1e-4
        teacher_out = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=1.0,
                                          latents=latents, spacing=None, output="latent")
        assert (ours - teacher_out).abs().max() > 1e-3  # the student, not the teacher, was sampled


def test_lora_student_loads_through_the_pipelines_load_lora_weights(tmp_path):
    folder, teacher = _teacher("sd3", tmp_path)
    add_transformer_lora(teacher.network, 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])  # scale 2: alpha kept
    with torch.no_grad():  # an adapter that changes something (peft starts B at zero)
        for name, p in teacher.network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    student = FlowConsistencyModel(teacher.denoiser, teacher, lora=True, base=str(folder))
    student.save_pretrained(tmp_path / "lora")
    pipe = _pipeline("sd3", folder, lora=tmp_path / "lora")
    for steps in (1, 4):
        latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(steps))
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, solver="euler", guidance_scale=1.0,
                                   latents=latents, spacing=None, output="latent")
        assert (ours - _theirs("sd3", pipe, latents, steps)).abs().max() < 1e-4
    # no kohya layout for SD3: diffusers converts kohya files for it in one direction only
    with pytest.raises(ValueError, match="not 'kohya'"):
        export_lora(student, tmp_path / "k.safetensors", layout="kohya")
    export_lora(student, tmp_path / "one" / "student.safetensors")  # the diffusers layout as one file
    pipe = _pipeline("sd3", folder, lora=None)
    pipe.load_lora_weights(tmp_path / "one", weight_name="student.safetensors")
    assert (_theirs("sd3", pipe, latents, 4) - ours).abs().max() < 1e-4
    again = FlowConsistencyModel.from_pretrained(tmp_path / "lora")  # on the recorded base
    again.parts.prompt_encoder.max_sequence_length = 16
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(9))
    a = cmkit.text_to_image(student, PROMPTS, steps=2, solver="euler", guidance_scale=1.0, latents=latents,
                            spacing=None, output="latent")
    b = cmkit.text_to_image(again, PROMPTS, steps=2, solver="euler", guidance_scale=1.0, latents=latents,
                            spacing=None, output="latent")
    assert (a - b).abs().max() < 1e-5


def test_the_distillation_target_is_one_guided_teacher_step_then_the_target_network():
    """The loss on a fixed draw equals d(f(x_hi, s_hi), f_target(x_lo, s_lo)) with x_lo the guided Euler step
    written out here: D_w = D_u + w (D_c - D_u), x_lo = D_w + s_lo (x_hi - D_w) / s_hi (at s_hi = inf:
    D_w + s_lo eps)."""
    teacher = tiny_sd3_pipeline(seed=2)
    student = FlowConsistencyModel(_perturbed(teacher.denoiser, 1), teacher)
    target = FlowConsistencyModel(_perturbed(teacher.denoiser, 2), teacher)
    z0 = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode_prompt(["a red sneaker", "a green bag", "a blue dress"])
    cond.pop("guidance_scale")
    cfg = FlowCDConfig(num_grid_steps=4, w_min=3.0, w_max=3.0)
    loss_fn = FlowConsistencyDistillation(teacher, None, cfg)
    for seed in range(3):
        torch.manual_seed(seed)
        loss = loss_fn(student, z0, target, **cond)
        torch.manual_seed(seed)
        s_hi, s_lo = loss_fn.pairs(3, z0.device, z0.dtype)
        eps = torch.randn_like(z0)
        with torch.no_grad():
            pos = {k: v for k, v in cond.items() if not k.startswith("negative")}
            neg = {"prompt_embeds": cond["negative_prompt_embeds"],
                   "pooled_prompt_embeds": cond["negative_pooled_prompt_embeds"],
                   **{k: v for k, v in cond.items() if k == "zero_token_repeats"}}
            rows = []
            for i in range(3):
                one = {k: v[i:i + 1] for k, v in pos.items()}
                un = {k: v[i:i + 1] for k, v in neg.items()}
                inf = torch.isinf(s_hi[i])
                x = eps[i:i + 1] if inf else z0[i:i + 1] + s_hi[i] * eps[i:i + 1]
                d_w = teacher(x, s_hi[i], **un) + 3.0 * (teacher(x, s_hi[i], **one) - teacher(x, s_hi[i], **un))
                x_lo = d_w + s_lo[i] * eps[i:i + 1] if inf else d_w + s_lo[i] * (x - d_w) / s_hi[i]
                rows.append((student(x, s_hi[i], **one) - target(x_lo, s_lo[i], **one)).pow(2).mean())
        torch.testing.assert_close(loss, torch.stack(rows).mean(), rtol=1e-4, atol=1e-6)


def _data():
    return caption_data(32, ("sneaker", "bag"))


def test_a_short_run_brings_one_step_toward_the_teachers_solution(tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, teacher = _teacher("sd3", tmp_path)
    teacher.prompt_encoder.max_sequence_length = 256  # as the run reads the folder
    recipe = load_recipe(None, ['objective.kind="flow_cd"', "objective.num_grid_steps=4", "objective.w_min=2.0",
                                "objective.w_max=2.0", "objective.target_ema=0.0", "train.batch_size=8",
                                "train.steps=60", "train.lr=1e-3", "train.log_every=20", "train.checkpoint_every=60",
                                "train.ema_rates=[]"])
    run_job("distill", recipe, tmp_path / "run", str(folder), progress=False, data=_data())
    student = cmkit.load_model(tmp_path / "run" / "model")
    prompts = ["a red sneaker", "a blue bag"] * 4
    latents = torch.randn(8, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    ref = cmkit.text_to_image(teacher, prompts, steps=4, solver="euler", guidance_scale=2.0, latents=latents,
                              spacing=None, output="latent")
    before = cmkit.text_to_image(teacher, prompts, steps=1, solver="euler", guidance_scale=2.0, latents=latents,
                                 spacing=None, output="latent")
    after = cmkit.text_to_image(student, prompts, steps=1, solver="euler", guidance_scale=1.0, latents=latents,
                                spacing=None, output="latent")
    err = lambda x: (x - ref).pow(2).mean().item()  # noqa: E731
    assert err(after) < 0.8 * err(before), (err(before), err(after))


def test_bad_inputs_name_the_problem(tmp_path):
    from cmkit.objectives.base import BuildContext
    from cmkit.objectives.flow_cd import build

    teacher = tiny_sd3_pipeline()
    ctx = BuildContext(make_backbone=lambda: None, train_steps=1, teacher=teacher, data=_data())
    with pytest.raises(ValueError, match="w_min"):
        build(FlowCDConfig(w_min=0.5), ctx)
    with pytest.raises(ValueError, match="step solver"):
        build(FlowCDConfig(solver="dpmpp_2m"), ctx)
    unet = BuildContext(make_backbone=lambda: None, train_steps=1, teacher=cmkit.latent.families.unet.tiny_pipeline(),
                        data=_data())
    with pytest.raises(ValueError, match="kind 'lcm'"):
        build(FlowCDConfig(), unet)
    student = FlowConsistencyModel(teacher.denoiser, teacher, guidance_scale=4.0)
    with pytest.raises(ValueError, match="no negative prompt"):
        cmkit.text_to_image(student, ["a red bag"], steps=1, negative_prompts=["a blue bag"])
    with pytest.raises(ValueError, match=r"folds guidance in \(distilled at 4.0\) and samples at guidance 1"):
        cmkit.text_to_image(student, ["a red bag"], steps=1, guidance_scale=4.0)  # guidance on top of guidance
    # a LoRA student on a base of another family: its adapter has no place there
    lora = FlowConsistencyModel(teacher.denoiser, teacher, lora=True)
    add_transformer_lora(teacher.network, 2, 2.0, ["to_q", "to_v"])
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="its base here is a FluxPipeline"):
        FlowConsistencyModel.from_pretrained(tmp_path / "lora", base=tiny_flux_pipeline())


def test_generate_samples_a_flow_student_at_guidance_1_and_refuses_more(tmp_path, capsys):
    from cmkit.cli.commands import main

    teacher = tiny_sd3_pipeline(seed=3)
    FlowConsistencyModel(_perturbed(teacher.denoiser), teacher, steps=2, guidance_scale=4.0).save_pretrained(
        tmp_path / "student")
    out = tmp_path / "g.npy"
    assert main(["generate", str(tmp_path / "student"), "--prompt", "a red bag", "--num-per-prompt", "2",
                 "--out", str(out)]) == 0
    import numpy as np

    images = torch.from_numpy(np.load(out))
    student = cmkit.load_model(tmp_path / "student")
    ref = cmkit.text_to_image(student, ["a red bag"] * 2, steps=2, solver="euler", guidance_scale=1.0, spacing=None,
                              generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert images.shape == ref.shape and (images - ref).abs().max() < 1e-4  # its own 2 steps, at guidance 1
    assert main(["generate", str(tmp_path / "student"), "--prompt", "a red bag", "--guidance", "4",
                 "--out", str(out)]) != 0
    assert "folds guidance in" in capsys.readouterr().err
    # a batch past memory is refused before anything is allocated (it hung before)
    assert main(["generate", str(tmp_path / "student"), "--prompt", "a red bag", "--num-per-prompt", "1000000000",
                 "--out", str(out)]) != 0
    assert "lower --num-per-prompt" in capsys.readouterr().err
    # another size, as the pipelines take it: the student's own sampler at 16x24, the model's size kept after
    assert main(["generate", str(tmp_path / "student"), "--prompt", "a red bag", "--num-per-prompt", "1",
                 "--height", "16", "--width", "24", "--max-sequence-length", "8", "--out", str(out)]) == 0
    wide = torch.from_numpy(np.load(out))
    ref = cmkit.text_to_image(student, ["a red bag"], generator=torch.Generator().manual_seed(0), height=16, width=24,
                              max_sequence_length=8).clamp(-1, 1)
    assert wide.shape == (1, 3, 16, 24) and (wide - ref).abs().max() < 1e-4 and student.sample_shape == (4, 8, 8)
    assert main(["generate", str(tmp_path / "student"), "--prompt", "a red bag", "--width", "20",
                 "--out", str(out)]) != 0
    assert "width 20 is not a positive multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_a_re_noising_student_exports_with_flow_match_lcm_scheduler_and_samples_as_cmkit_does(kind, tmp_path):
    """The fresh noise of each step is the pipeline's from the same torch seed, Flux's drawn as its packed tokens."""
    _, teacher = _teacher(kind, tmp_path)
    student = FlowConsistencyModel(_perturbed(teacher.denoiser), teacher, steps=4, sampler="consistency")
    student.save_pretrained(tmp_path / "student")
    pipe = _pipeline(kind, tmp_path / "student")
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    loaded = cmkit.load_model(tmp_path / "student")
    assert loaded.sampler == "consistency"
    for steps in (1, 4):
        latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(steps))
        torch.manual_seed(10 + steps)  # the scheduler draws its fresh noise from torch's generator
        theirs = _theirs(kind, pipe, latents, steps)
        torch.manual_seed(10 + steps)
        ours = cmkit.text_to_image(student, PROMPTS, steps=steps, solver="consistency", guidance_scale=1.0,
                                   latents=latents, spacing=None, output="latent")
        assert (ours - theirs).abs().max() < 1e-4
        if steps > 1:  # it re-noised: the deterministic sampler gives another answer
            euler = cmkit.text_to_image(student, PROMPTS, steps=steps, solver="euler", guidance_scale=1.0,
                                        latents=latents, spacing=None, output="latent")
            assert (ours - euler).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["flow_cd", "flow_cd_lora"])
def test_on_a_gpu_the_encoders_and_the_network_take_turns_on_the_device(kind, tmp_path, monkeypatch):
    """On a GPU the teacher's text encoders (SD3.5's T5: ~10 GB) are on the device only while the latent cache is
    built, and its network only after they left, before the student is copied from it. This machine has no GPU, so
    each placement step of the run is also played against a pretend ``cuda`` device with ``Module.to`` recording
    where each module would be instead of moving it; then it runs for real on the CPU (where nothing moves)."""
    import cmkit.cli.jobs as jobs
    import cmkit.objectives.flow_cd as flow_cd
    from cmkit.latent import placement

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder, _ = _teacher("sd3", tmp_path)
    gpu, where, moves, events, parked = torch.device("cuda"), {}, [], [], []
    real_to = torch.nn.Module.to

    def pretend_to(self, device, *args, **kwargs):
        moves.append((id(self), torch.device(device).type))
        for m in self.modules():
            where[id(m)] = torch.device(device).type
        return self

    def played(name):
        real = getattr(placement, name)

        def step(*args):
            events.append((name, bool(list((tmp_path / "cache").rglob("*.safetensors")))))
            monkeypatch.setattr(torch.nn.Module, "to", pretend_to)
            try:
                found = real(*args[:-1], gpu)
            finally:
                monkeypatch.setattr(torch.nn.Module, "to", real_to)
            assert real(*args) == found  # on the CPU
            parked.append((args, found))
            return found
        monkeypatch.setattr(jobs, name, step)

    for name in ("for_the_cache", "for_training", "park_prompt_encoders"):
        played(name)
    real_student = flow_cd.flow_student

    def student(teacher, *args, **kwargs):
        events.append(("student", where.get(id(teacher.network)), where.get(id(teacher.prompt_encoder))))
        return real_student(teacher, *args, **kwargs)
    monkeypatch.setattr(flow_cd, "flow_student", student)
    recipe = load_recipe(None, [f'objective.kind="{kind}"', "objective.num_grid_steps=4", "train.batch_size=4",
                                "train.steps=2", "train.checkpoint_every=2", "train.ema_rates=[]"])
    run_job("distill", recipe, tmp_path / "run", str(folder), progress=False, data=_data())
    assert (tmp_path / "run" / "model" / "cmkit.json").is_file()
    # encoders on for the cache; once it is written they leave, the network comes on, then the student is copied
    assert events[:3] == [("for_the_cache", False), ("for_training", True), ("student", "cuda", "cpu")], events
    assert events[3:] == [("for_training", True), ("park_prompt_encoders", True)], events
    (model, objective, _), found = parked[-1]
    assert len(found) == 1 and found[0] is model.parts.prompt_encoder is objective.teacher.prompt_encoder
    assert not {id(m) for m in found[0].modules()} & {id(m) for m in model.modules()}  # no model.to brings it back
    teacher = cmkit.load_teacher(str(folder))  # a fresh one, played through the same steps, for the order of moves
    where.clear(), moves.clear()
    monkeypatch.setattr(torch.nn.Module, "to", pretend_to)
    placement.for_the_cache(teacher, gpu)
    assert where[id(teacher.vae)] == where[id(teacher.prompt_encoder)] == "cuda"
    assert id(teacher.network) not in where  # the network stays where it was loaded while the cache is built
    first = len(moves)
    placement.for_training(teacher, gpu)
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    later = [d for m, d in moves[first:] if m in (id(teacher.prompt_encoder), id(teacher.denoiser))]
    assert later == ["cpu", "cuda"]  # the encoders left before the network came on
    assert where[id(teacher.network)] == "cuda" and where[id(teacher.prompt_encoder)] == "cpu"


def test_a_flux_teacher_distils_at_its_datas_size_not_only_its_pipelines_default(tmp_path, monkeypatch):
    """A Flux folder's default size is 128 latent rows (512 px for this VAE); a caption set of 16x16 images is
    distilled at 16x16 (it was refused: "the teacher takes (3, 512, 512)"), and a size Flux cannot pack is one line."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "flux"
    tiny_flux_pipeline(guidance=True, seed=7).save_pretrained(folder)
    assert cmkit.load_teacher(str(folder)).image_shape == (3, 512, 512)
    recipe = load_recipe(None, ['objective.kind="flow_cd_lora"', "objective.num_grid_steps=4", "train.batch_size=2",
                                "train.steps=1", "train.ema_rates=[]", "objective.lora_rank=2",
                                "objective.lora_alpha=2.0"])
    run_job("distill", recipe, tmp_path / "run", str(folder), progress=False, data=caption_data(16))
    student = cmkit.load_model(tmp_path / "run" / "model")
    assert student.sample_shape == (4, 4, 4)  # the run's size, kept by the LoRA student's base as it samples
    with pytest.raises(ValueError, match="the data's images are 12x12.*multiple of 8"):
        run_job("distill", recipe, tmp_path / "other", str(folder), progress=False, data=caption_data(12))

