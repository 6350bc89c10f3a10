"""sCD and rCM on latent teachers: the tangent through a transformer (and a UNet) equals a central finite difference
of the consistency function along the teacher's guided trajectory in float64; the DMD regulariser's gradient is
the formula written out by hand; the fake score trains at its own learning rate, only on its own steps; a short run
of each kind brings the one-step sample toward the teacher's ODE solution."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import caption_data

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.data.latent_cache import caption_encoder
from cmkit.latent.families.sd3 import tiny_sd3_pipeline
from cmkit.latent.families.unet import LatentDenoiser, tiny_pipeline
from cmkit.latent.flow_student import FlowConsistencyModel
from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, student_unet
from cmkit.objectives.base import BuildContext
from cmkit.objectives.latent_scm import LatentRCMConfig, LatentSCDConfig, LatentSCM, TrigFlowView, build_rcm, dmd_loss
from cmkit.objectives.scm import scm_tangent

PROMPTS = ["a red sneaker", "a green bag", "a blue dress"]


def _perturbed(net, seed):
    out = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def _student(kind, teacher):
    if kind == "sd3":
        return FlowConsistencyModel(_perturbed(teacher.denoiser, 1), teacher)
    unet = _perturbed(student_unet(teacher.unet, 8), 1)
    return LatentConsistencyModel(LCMFunction(LatentDenoiser(unet, teacher.scheduler)), teacher)


@pytest.fixture
def float64_time_embedding(monkeypatch):
    """diffusers' sinusoidal time embedding casts the time to float32 (``timesteps.float()``), which leaves a finite
    difference in time nothing but rounding at float64 step sizes: the same embedding, kept in the time's dtype
    (checked against diffusers' own in float32 first)."""
    from diffusers.models import embeddings

    original = embeddings.get_timestep_embedding

    def embed(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
        half = embedding_dim // 2
        k = torch.arange(half, dtype=timesteps.dtype, device=timesteps.device)
        arg = scale * timesteps[:, None] * torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))[None]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb

    t = torch.tensor([3.0, 250.5, 999.0])
    for flip, shift in ((True, 0), (False, 1)):
        torch.testing.assert_close(embed(t, 32, flip, shift), original(t, 32, flip, shift), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(embeddings, "get_timestep_embedding", embed)


@pytest.mark.parametrize("kind", ["sd3", "sd"])
def test_the_tangent_equals_a_finite_difference_of_f_along_the_guided_trajectory_in_float64(kind,
                                                                                        float64_time_embedding):
    teacher = (tiny_sd3_pipeline(seed=2) if kind == "sd3" else tiny_pipeline(seed=2)).double()
    student = _student(kind, teacher).double()
    cond = teacher.encode_prompt(PROMPTS, guidance_scale=3.0)
    cond.pop("guidance_scale", None)
    loss = LatentSCM(teacher, None, LatentSCDConfig(), student_takes_w=(kind == "sd"))
    w = torch.full((3,), 3.0, dtype=torch.float64)
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    scond = loss.student_cond(pos, w)
    g0 = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, *teacher.sample_shape, generator=g0, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.3], dtype=torch.float64)
    cos, sin = (v[:, None, None, None] for v in (torch.cos(t), torch.sin(t)))
    x_t = cos * z0 + sin * torch.randn(z0.shape, generator=g0, dtype=torch.float64)
    dxdt = (cos * x_t - loss._real(x_t / cos, torch.tan(t), w, cond)) / sin
    _, g = scm_tangent(TrigFlowView(student, 1.0), x_t, t, dxdt, 1.0, 1.0, "jvp", **scond)

    def f(x, tt):  # the consistency function itself, in sigma space: f(x_t, t) = D(x_t / cos t, tan t)
        with torch.no_grad():
            return student(x / torch.cos(tt)[:, None, None, None], torch.tan(tt), **scond)

    h = 1e-5
    fd = cos * (f(x_t + h * dxdt, t + h) - f(x_t - h * dxdt, t - h)) / (2 * h)
    assert fd.abs().max() > 1e-2  # a tangent worth comparing
    assert ((g - fd).norm() / fd.norm()).item() < 1e-4


def test_the_dmd_gradient_is_fake_minus_real_over_the_mean_distance_to_the_real_denoiser():
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0]], requires_grad=True)
    fake = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    real = torch.tensor([[1.5, -1.5, 1.0, 2.0], [0.5, 0.0, 1.0, -2.0]])
    dmd_loss(g, fake, real).sum().backward()
    # by hand: row 1 mean|G - real| = (0.5 + 0.5 + 0.5 + 1) / 4 = 0.625; row 2 = (0.5 + 1 + 0 + 1) / 4 = 0.625
    want = 2 * (fake - real) / 0.625 / 4
    torch.testing.assert_close(g.grad, want)


def _data():
    return caption_data(32, ("sneaker", "bag"))


def test_rcm_trains_the_fake_score_on_its_own_steps_at_its_own_learning_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    teacher = tiny_sd3_pipeline(seed=4)
    data = _data()
    ctx = BuildContext(make_backbone=lambda: None, train_steps=1, teacher=teacher, data=data, teacher_path="x",
                       encode_captions=caption_encoder(data))  # what the job layer hands in: the latent cache
    cfg = LatentRCMConfig(tangent_warmup=2, student_update_every=3, dmd_max_steps=2)
    model, loss = build_rcm(cfg, ctx)
    assert [loss.student_phase(s) for s in range(9)] == [True, True, True, False, False, True, False, False, True]
    groups = {scale for ps, scale in loss.lr_groups() if ps}
    assert groups == {0.2}  # rCM keeps no learnt weighting; the fake score at 0.2x
    z0, cond = loss.batches(4, torch.device("cpu"))
    fake0 = [p.detach().clone() for p in loss.fake.parameters()]
    for step, student_step in ((3, False), (5, True)):
        model.zero_grad(set_to_none=True)
        loss.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        loss(model, z0, None, step, **cond).backward()
        student_grads = [p.grad for p in model.parameters() if p.requires_grad]
        fake_grads = [p.grad for p in loss.fake.parameters()]
        assert all((gr is not None) == student_step for gr in student_grads)
        assert all((gr is not None) != student_step for gr in fake_grads)
    assert all(torch.equal(a, b) for a, b in zip(fake0, loss.fake.parameters(), strict=True))


@pytest.mark.parametrize("kind, teacher_path", [("latent_scd", "cmkit:tiny-sd3"), ("latent_scd_lora", "cmkit:tiny-sd3"),
                                                ("latent_rcm", "cmkit:tiny-sd3"), ("latent_scd", "cmkit:tiny-t2i")])
def test_a_short_run_brings_one_step_toward_the_teachers_solution(kind, teacher_path, tmp_path, monkeypatch):
    """On the shipped teachers, whose one-step sample is far from their ODE solution (a random tiny teacher's is
    not: its map is nearly the identity)."""
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    flow = teacher_path.endswith("sd3")
    steps = 30 if kind == "latent_rcm" else 20
    sets = [f'objective.kind="{kind}"', "objective.w_min=3.0", "objective.w_max=3.0", "objective.tangent_warmup=10",
            "train.batch_size=8", f"train.steps={steps}", f"train.lr={3e-4 if kind.endswith('lora') else 3e-5}",
            "train.log_every=10", f"train.checkpoint_every={steps}", "train.ema_rates=[]"]
    if kind == "latent_rcm":
        sets += ["objective.student_update_every=2", "objective.dmd_max_steps=2"]
    if kind.endswith("lora"):
        sets += ["objective.lora_rank=8", "objective.lora_alpha=8.0"]
    if not flow:
        sets += ["objective.w_embedding_dim=8"]
    run_job("distill", load_recipe(None, sets), tmp_path / "run", teacher_path, progress=False, data=_data())
    meta = json.loads((tmp_path / "run" / "model" / "cmkit.json").read_text())
    assert meta["exported_weights"]["weights"] == "online"
    if kind == "latent_rcm":  # the fake score is the objective's, checkpointed with the run
        from safetensors.torch import load_file

        saved = load_file(tmp_path / "run" / "checkpoints" / f"step-{steps:08d}" / "objective.safetensors")
        assert any(k.startswith("fake.") for k in saved)
    teacher, student = cmkit.load_teacher(teacher_path), cmkit.load_model(tmp_path / "run" / "model")
    prompts = ["a red sneaker", "a blue bag"] * 4
    latents = torch.randn(8, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    kw = dict(latents=latents, output="latent", spacing=None if flow else "trailing")
    ref = cmkit.text_to_image(teacher, prompts, steps=25, solver="euler", guidance_scale=3.0, **kw)
    before = cmkit.text_to_image(teacher, prompts, steps=1, solver="euler", guidance_scale=3.0, **kw)
    torch.manual_seed(0)
    if flow:
        after = cmkit.text_to_image(student, prompts, steps=1, solver=student.sampler, guidance_scale=1.0, **kw)
    else:  # a full LCM embeds w
        after = cmkit.lcm_sample(student, prompts, 1, guidance_scale=3.0, latents=latents, output="latent")
    err = lambda x: (x - ref).pow(2).mean().item()  # noqa: E731
    assert math.isfinite(err(after)) and err(after) < 0.7 * err(before), (err(before), err(after))
