"""Issue 34's flow-map students: ``u(z_t, r, t)`` of a flow teacher's guided flow (``objective.kind = "flow_map"``).
A fresh student is its teacher at r = t; on Gaussian data with the exact velocity field the target and loss are the
MeanFlow identity written out by hand, and a short run brings the one-jump map to the exact one; a Wan student
trained three steps samples in diffusers' ``AnyFlowPipeline`` as cmkit samples it at 1, 2 and 4 steps; an SD3 student
is a cmkit folder sampled by ``cmkit.text_to_image`` and ``cmkit generate``; bad inputs are one line each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cmkit
from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.objectives.flow_map import FlowMapConfig, FlowMapDistillation

diffusers = pytest.importorskip("diffusers")
ANYFLOW = hasattr(diffusers, "AnyFlowPipeline")
PROMPTS = ["a red bag moving left", "a blue sneaker moving up"]
FRAMES, SIZE, LENGTH = 9, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny networks, one thread


# --- Gaussian data, the exact velocity field: x0 ~ N(mu, s^2 I), z_t = (1 - t) x0 + t eps


MU, S = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.3])


def exact_velocity(z, t, w=None, cond=None):
    """``E[eps - x0 | z_t]``: ``-mu + (t - (1 - t) s^2) (z - (1 - t) mu) / var_t``, ``var_t = (1-t)^2 s^2 + t^2``."""
    t = t.view(-1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) * (z - (1 - t) * MU) / var


def exact_map(z, t, r):
    """The flow's exact jump from t to r: ``(1 - r) mu + sqrt(var_r / var_t) (z - (1 - t) mu)``."""
    t, r = t.view(-1, 1), r.view(-1, 1)
    var = lambda s: (1 - s) ** 2 * S**2 + s**2  # noqa: E731
    return (1 - r) * MU + (var(r) / var(t)).sqrt() * (z - (1 - t) * MU)


class TinyU(nn.Module):
    """A small MLP ``u(z, r, t)``."""

    def __init__(self, width=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, z, r, t, **cond):
        return self.net(torch.cat([z, r.view(-1, 1), t.view(-1, 1)], 1))


def _objective(**kw):
    return FlowMapDistillation(exact_velocity, FlowMapConfig(w_min=1.0, w_max=1.0, **kw))


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_gaussian_target_and_loss_are_the_meanflow_identity_by_hand(power):
    u, obj, n = TinyU(seed=1).double(), _objective(power=power, r_neq_t=0.75), 64
    x0 = (MU + S * torch.randn(n, 2)).double()
    torch.manual_seed(5)
    loss = obj(u, x0)
    torch.manual_seed(5)  # the same draws, in the objective's order: (r, t), eps, w
    r, t = (v.double() for v in obj.pairs(n, x0.device))
    z = (1 - t)[:, None] * x0 + t[:, None] * torch.randn_like(x0)
    torch.rand(n)
    v = exact_velocity(z, t)
    tgt = []
    for i in range(n):  # d/dt u(z(t), r, t) along dz/dt = v: the Jacobian in z times v, plus the t-derivative
        jz, _, jt = torch.autograd.functional.jacobian(lambda a, b, c: u(a[None], b[None], c[None])[0],
                                                        (z[i], r[i], t[i]))
        tgt.append(v[i] - (t[i] - r[i]) * (jz @ v[i] + jt))
    delta = u(z, r, t) - torch.stack(tgt)
    sq = delta.pow(2).mean(1)
    by_hand = ((sq + 1e-3) ** -power * sq).mean()
    assert (r < t).any() and (r == t).any()
    assert abs(loss.item() - by_hand.item()) < 1e-10 * max(1.0, by_hand.item())


def test_gaussian_one_jump_map_converges_to_the_exact_one():
    torch.manual_seed(0)
    u, obj = TinyU(seed=2), _objective(r_neq_t=0.75, power=0.0)
    opt = torch.optim.Adam(u.parameters(), lr=3e-3)
    z1 = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    one, zero = torch.ones(512), torch.zeros(512)
    exact = exact_map(z1, one, zero)

    def error():
        with torch.no_grad():
            return (z1 - u(z1, zero, one) - exact).pow(2).sum(1).mean().item()

    start = error()
    for _ in range(600):
        loss = obj(u, MU + S * torch.randn(256, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.1 * start, (start, error())
    # the closed forms agree: the exact map's velocity at r -> t is the exact field (float64 difference)
    z, t = z1.double(), torch.full((512,), 0.3, dtype=torch.float64)
    assert torch.allclose(exact_velocity(z, t), (z - exact_map(z, t, t - 1e-7)) / 1e-7, atol=1e-5)


# --- a fresh student is its teacher at r = t


@pytest.mark.skipif(not ANYFLOW, reason="this diffusers has no AnyFlowPipeline")
def test_fresh_wan_flow_map_is_the_teacher_velocity_at_r_equal_t():
    from cmkit.latent.families.wan import AnyFlowNetwork, tiny_wan_pipeline

    teacher = tiny_wan_pipeline(seed=4, image_size=32, num_frames=FRAMES)
    net = teacher.family.flow_map_network(teacher)
    assert isinstance(net, AnyFlowNetwork) and type(net.transformer).__name__ == "AnyFlowTransformer3DModel"
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(3, *teacher.sample_shape, generator=g), torch.randn(3, 12, 32, generator=g)
    t = torch.tensor([0.97, 0.5, 0.013])
    with torch.no_grad():
        v = teacher.denoiser.transformer(hidden_states=z, timestep=t * 1000, encoder_hidden_states=e,
                                         return_dict=False)[0]
        u = net(z, t, t, prompt_embeds=e)
        u_r = net(z, t * 0.5, t, prompt_embeds=e)
    assert (u - v).abs().max() < 1e-5 and v.abs().max() > 0.1
    assert (u_r - v).abs().max() > 1e-4  # r enters


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_fresh_image_flow_map_is_the_teacher_velocity_for_every_r(family):
    from cmkit.latent.families.flux import tiny_flux_pipeline
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline

    teacher = tiny_sd3_pipeline(seed=7) if family == "sd3" else tiny_flux_pipeline(guidance=True, seed=7)
    scale = teacher.denoiser.timestep_scale  # SD3 1000 t; Flux's transformer scales t itself
    net = teacher.family.flow_map_network(teacher)
    cond = {k: v for k, v in teacher.encode_prompt(["a red bag", "a boot"]).items() if not k.startswith("negative")}
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.2])
    with torch.no_grad():
        v = teacher.denoiser._velocity(z, t * scale, torch.ones(2), cond)
        for r in (t, torch.zeros(2)):
            assert (net(z, r, t, **cond) - v).abs().max() < 1e-5
        with torch.no_grad():
            net.r_embed[2].bias.fill_(0.1)
        assert (net(z, t * 0.5, t, **cond) - v).abs().max() > 1e-4
        # the transformer called by itself (its pipeline) is not touched by the hook
        assert (net.denoiser._velocity(z, t * scale, torch.ones(2), cond) - v).abs().max() == 0


# --- a Wan student: trained, exported as an AnyFlowPipeline folder, sampled there as cmkit samples it


def clip_data():
    from cmkit.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1
    caps = [PROMPTS[i % 2] for i in range(12)]
    return Dataset("tiny-clips", x[:10], x[10:], train_captions=caps[:10], test_captions=caps[10:])


SETS = ['objective.kind="flow_map"', "objective.w_min=3.0", "objective.w_max=3.0", "train.batch_size=4",
        "train.steps=3", "train.lr=1e-3", "train.log_every=3", "train.checkpoint_every=3", "train.ema_rates=[]"]


LORA = ["objective.lora_rank=4", "objective.lora_alpha=4.0"]


@pytest.mark.skipif(not ANYFLOW, reason="this diffusers has no AnyFlowPipeline")
@pytest.mark.parametrize("kind", ["flow_map", "flow_map_lora"])
def test_wan_flow_map_student_samples_in_anyflow_pipeline_as_cmkit_samples_it(kind, tmp_path, monkeypatch):
    from cmkit.latent.families.wan import tiny_wan_pipeline
    from cmkit.latent.flow_map import FlowMapModel

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "teacher"
    tiny_wan_pipeline(seed=4, image_size=SIZE, num_frames=FRAMES).save_pretrained(folder, record_size=True)
    teacher = cmkit.load_teacher(str(folder))
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    sets = [*SETS, f'objective.kind="{kind}"'] + (LORA if kind.endswith("lora") else [])
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, teacher=teacher,
            data=clip_data())
    # the teacher's weights are untouched (a LoRA student's AnyFlow network holds them, frozen)
    assert all(torch.equal(before[k], v) for k, v in teacher.network.state_dict().items())
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    assert isinstance(student, FlowMapModel) and student.shift == 3.0 and student.guidance_scale == 3.0
    assert (student.height, student.width, student.num_frames) == (SIZE, SIZE, FRAMES)
    pipe = diffusers.AnyFlowPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMapEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    fresh = cmkit.load_teacher(str(folder))
    for steps in (1, 2, 4):
        latents = torch.randn(2, 8, 3, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(steps))
        ours, nfe = cmkit.text_to_video(student, PROMPTS, steps=steps, latents=latents, output="latent",
                                        max_sequence_length=LENGTH, return_nfe=True)
        theirs = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=steps, guidance_scale=1.0, height=SIZE,
                      width=SIZE, num_frames=FRAMES, max_sequence_length=LENGTH, output_type="latent").frames
        assert nfe == steps and ours.shape == latents.shape
        assert (ours - theirs).abs().max() < 1e-4, steps
        teacher_out = cmkit.text_to_video(fresh, PROMPTS, steps=steps, solver="euler", latents=latents,
                                          guidance_scale=1.0, output="latent", max_sequence_length=LENGTH)
        assert (ours - teacher_out).abs().max() > 1e-6, steps
    # one checkpoint, any step count
    assert cmkit.text_to_video(student, PROMPTS[:1], steps=8, output="latent", max_sequence_length=LENGTH,
                               generator=torch.Generator().manual_seed(0)).isfinite().all()


@pytest.mark.parametrize("kind", ["flow_map", "flow_map_lora"])
def test_sd3_flow_map_student_is_a_cmkit_folder_sampled_by_generate(kind, tmp_path, monkeypatch):
    from conftest import caption_data

    from cmkit.cli.commands import main
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline
    from cmkit.latent.flow_map import FlowMapModel, flow_map_times

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "teacher"
    tiny_sd3_pipeline(seed=7).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    sets = [*SETS, "objective.sample_steps=2", f'objective.kind="{kind}"'] + (LORA if kind.endswith("lora") else [])
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False, teacher=teacher,
            data=caption_data(32))
    out = tmp_path / "run" / "model"
    student = cmkit.load_model(out)
    assert isinstance(student, FlowMapModel) and student.steps == 2 and student.shift == 3.0
    assert student.network.r_embed[2].weight.abs().max() > 0  # trained: the r-embedding left zero
    fresh = cmkit.load_teacher(str(folder))
    changed = [k for k, v in fresh.network.state_dict().items()
               if not torch.equal(v, student.network.denoiser.transformer.state_dict()[k])]
    # a LoRA student's adapter is merged into the attention and feed-forward weights it adapts, nothing else
    assert changed and all(("attn" in k or "ff" in k) and k.endswith("weight") or kind == "flow_map" for k in changed)
    latents = torch.randn(2, *student.sample_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4, 8):
        ours, nfe = cmkit.text_to_image(student, ["a red bag", "a blue boot"], steps=steps, latents=latents,
                                        output="latent", return_nfe=True)
        assert nfe == steps and ours.isfinite().all()
        z = latents
        ts = flow_map_times(steps, 3.0)
        cond = student.encode_prompt(["a red bag", "a blue boot"])
        with torch.no_grad():
            for t, r in zip(ts, ts[1:], strict=False):  # the jumps written out
                u = student(z, torch.full((2,), r), torch.full((2,), t), **cond)
                z = z - (t - r) * u
        assert (ours - z).abs().max() < 1e-4
    target = tmp_path / "g.npy"
    assert main(["generate", str(out), "--prompt", "a red bag", "--num-per-prompt", "2", "--out", str(target)]) == 0
    import numpy as np

    ref = cmkit.text_to_image(student, ["a red bag"] * 2, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert (torch.from_numpy(np.load(target)) - ref).abs().max() < 1e-4


# --- bad inputs, one line each


def test_flow_map_bad_inputs_are_one_line(tmp_path, monkeypatch):
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline

    teacher = tiny_sd3_pipeline(seed=7)
    net = teacher.family.flow_map_network(teacher)
    from cmkit.latent.flow_map import FlowMapModel

    student = FlowMapModel(net, teacher, steps=2, guidance_scale=4.0, shift=3.0)
    cases = [
        (lambda: cmkit.text_to_image(student, ["a bag"], guidance_scale=4.0), "folds guidance in"),
        (lambda: cmkit.text_to_image(student, ["a bag"], steps=0), "steps must be an integer >= 1"),
        (lambda: student.jump(torch.zeros(1, *student.sample_shape), 0.5, 0.5,
                              **student.encode_prompt(["a bag"])), "r < t"),
        (lambda: cmkit.text_to_image(student, ["a bag"], solver="euler"), "solver 'euler' does not apply"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_flow_map_refuses_a_unet_teacher_and_a_two_expert_wan(tmp_path, monkeypatch):
    from cmkit.latent.families.wan import tiny_wan_pipeline
    from cmkit.objectives.base import BuildContext
    from cmkit.objectives.flow_map import build

    unet = cmkit.load_teacher("cmkit:tiny-t2i")
    ctx = BuildContext(make_backbone=lambda: None, train_steps=1, teacher=unet)
    with pytest.raises(ValueError) as e:
        build(FlowMapConfig(), ctx)
    assert "distils a flow-matching teacher" in str(e.value) and "\n" not in str(e.value)
    if ANYFLOW:
        from cmkit.objectives.flow_map import FlowMapLoRAConfig, build_lora

        pair = tiny_wan_pipeline(seed=1, two_experts=True)
        for make, cfg in ((build, FlowMapConfig()), (build_lora, FlowMapLoRAConfig())):
            with pytest.raises(ValueError) as e:
                make(cfg, BuildContext(make_backbone=lambda: None, train_steps=1, teacher=pair))
            assert "two-expert Wan 2.2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="target_ema must be 0"):
        build(FlowMapConfig(target_ema=0.9), BuildContext(make_backbone=lambda: None, train_steps=1,
                                                          teacher=tiny_wan_pipeline(seed=1)))


@pytest.mark.skipif(not ANYFLOW, reason="this diffusers has no AnyFlowPipeline")
def test_the_target_flow_is_the_teachers_guided_velocity():
    """``v_w = v_neg + w (v_pos - v_neg)`` of the teacher's transformer at float times (a Wan folder's UniPC hands
    its network whole ones: the objective's teacher runs on its students' Euler scheduler)."""
    import copy

    from cmkit.latent.families.wan import tiny_wan_pipeline
    from cmkit.objectives.flow_map import guided_velocity

    teacher = tiny_wan_pipeline(seed=4, image_size=32, num_frames=FRAMES)
    teacher.max_sequence_length = LENGTH
    den = copy.copy(teacher.denoiser)
    den.scheduler = teacher.family.student_scheduler(teacher, teacher.denoiser.scheduler)
    cond = teacher.encode_prompt(PROMPTS, None, 3.0)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t, w = torch.tensor([0.8123, 0.2345]), torch.tensor([3.0, 1.5])
    tr = teacher.denoiser.transformer
    with torch.no_grad():
        v = guided_velocity(den, z, t, w, cond)
        pos, neg = (tr(hidden_states=z, timestep=t * 1000, encoder_hidden_states=cond[k], return_dict=False)[0]
                    for k in ("prompt_embeds", "negative_prompt_embeds"))
    ref = neg + w.view(-1, 1, 1, 1, 1) * (pos - neg)
    assert (v - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.skipif(not ANYFLOW, reason="this diffusers has no AnyFlowPipeline")
def test_the_anyflow_targets_jvp_agrees_with_the_finite_difference():
    """The MeanFlow target through ``AnyFlowTransformer3DModel`` (complex rotary embedding, blockwise attention
    tangent): ``jvp``, ``jvp_math`` and a central difference give the same ``d/dt u``."""
    from cmkit.latent.families.wan import tiny_wan_pipeline
    from cmkit.objectives.meanflow import meanflow_target

    teacher = tiny_wan_pipeline(seed=4, image_size=32, num_frames=FRAMES)
    net = teacher.family.flow_map_network(teacher).double()
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(2, *teacher.sample_shape, generator=g).double(), torch.randn(2, 12, 32, generator=g).double()
    v = torch.randn(z.shape, generator=g).double()
    r, t = torch.tensor([0.3, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.6], dtype=torch.float64)

    def u(zz, rr, tt):
        return net(zz, rr, tt, prompt_embeds=e)

    # the network's time input is 1000 t through unit-frequency sinusoids (and float32 inside the embedding): a
    # central difference needs a step of 1e-4 in t or less, and agrees to about 1e-3 there
    out = {m: meanflow_target(u, z, r, t, v, m, fd_step=1e-4) for m in ("jvp", "jvp_math", "finite_difference")}
    scale = out["jvp"].abs().max()
    assert (out["jvp"] - out["jvp_math"]).abs().max() < 1e-6 * scale
    assert (out["jvp"] - out["finite_difference"]).abs().max() < 3e-3 * scale
