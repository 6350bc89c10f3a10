"""Flow-matching transformer teachers (SD3 with and without T5, Flux dev and schnell) in sigma space, against
diffusers' own pipelines and schedulers: tiny random pipelines built from configs, saved, and read back through the
real loading path."""

import math

import pytest
import torch

import cmkit
from cmkit.core import FlowMatchSchedule, VPSchedule, flux_mu, mu_shift_times, shift_times
from cmkit.latent.families.flux import pack, tiny_flux_pipeline, unpack
from cmkit.latent.families.sd3 import tiny_sd3_pipeline
from cmkit.sampling.text2image import timestep_sigmas

PROMPTS = ["a red sneaker", "a green bag"]
KINDS = ["sd3", "sd3-t5", "flux-dev", "flux-schnell"]


def build(kind):
    if kind.startswith("sd3"):
        return tiny_sd3_pipeline(t5=kind.endswith("t5"), seed=3)
    return tiny_flux_pipeline(guidance=kind == "flux-dev", seed=3)


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, cmkit teacher loaded from the folder, the diffusers pipeline loaded from the same folder)."""
    import diffusers

    kind = request.param
    folder = tmp_path_factory.mktemp(kind) / "pipe"
    build(kind).save_pretrained(folder)
    teacher = cmkit.load_teacher(str(folder))
    assert teacher.prompt_encoder.max_sequence_length == (256 if kind.startswith("sd3") else 512)  # the pipelines'
    teacher.prompt_encoder.max_sequence_length = 16  # as the pipeline calls below pass it
    if kind.startswith("sd3"):
        extra = {} if kind.endswith("t5") else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, **extra)
    else:
        pipe = diffusers.FluxPipeline.from_pretrained(folder)
        teacher.image_size = 32
    pipe.set_progress_bar_config(disable=True)
    return kind, teacher, pipe


def pipeline_run(kind, pipe, latents, steps, guidance, output_type):
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
              height=32, width=32)
    if kind.startswith("sd3"):
        return pipe(latents=latents, max_sequence_length=16, **kw).images
    out = pipe(latents=pack(latents), max_sequence_length=16, **kw).images
    return unpack(out, 8, 8) if output_type == "latent" else out


@pytest.mark.parametrize("steps", [8, 1])
def test_euler_over_the_folders_grid_is_the_pipeline(saved, steps):
    kind, teacher, pipe = saved
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(steps))
    w = 4.0 if kind != "flux-schnell" else 1.0
    ours = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=w, latents=latents,
                               spacing=None, output="latent")
    theirs = pipeline_run(kind, pipe, latents, steps, w, "latent")
    assert (ours - theirs).abs().max() < 1e-4
    images = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=w, latents=latents,
                                 spacing=None)
    pixels = pipeline_run(kind, pipe, latents, steps, w, "pt")  # in [0, 1], clamped as the pipeline does
    assert ((images / 2 + 0.5).clamp(0, 1) - pixels).abs().max() < 1e-4


def test_the_grid_is_the_pipelines_and_starts_at_pure_noise(saved):
    kind, teacher, pipe = saved
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    n = 8
    if kind.startswith("sd3"):
        sched.set_timesteps(n)
    else:
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=flux_mu(16))
    t = sched.sigmas.double()
    grid = torch.tensor(timestep_sigmas(teacher, n, None), dtype=torch.float64)
    assert math.isinf(grid[0]) and grid[-1] == 0 and len(grid) == n + 1
    assert torch.allclose(grid[1:] / (1 + grid[1:]), t[1:], rtol=0, atol=1e-12)


def test_x0_is_the_schedulers_own_conversion_at_every_grid_time(saved):
    """D(x, sigma) = x_t - t v at x_t = x / (1 + sigma), v the transformer's output (the scheduler's sigmas are the
    flow times t); checked with the unguided conditional prediction."""
    kind, teacher, pipe = saved
    if kind == "sd3":
        teacher.prompt_encoder.collapse_zero_tokens = False  # the pipeline's own tensors, fed to its transformer
    cond = teacher.encode_prompt(PROMPTS)
    if kind == "sd3":
        teacher.prompt_encoder.collapse_zero_tokens = True
    cond = {k: v for k, v in cond.items() if not k.startswith("negative")}
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    for sigma in timestep_sigmas(teacher, 6, None)[1:-1]:
        t = sigma / (1 + sigma)
        x_t = z / (1 + sigma)
        with torch.no_grad():
            x0 = teacher(z, sigma, **cond)
            tt = torch.full((2,), t * 1000 if kind.startswith("sd3") else t, dtype=torch.float32)
            if kind.startswith("sd3"):
                v = pipe.transformer(hidden_states=x_t, timestep=tt, encoder_hidden_states=cond["prompt_embeds"],
                                     pooled_projections=cond["pooled_prompt_embeds"]).sample
            else:
                from cmkit.latent.families.flux import image_ids

                g = torch.full((2,), 1.0) if kind == "flux-dev" else None
                e = cond["prompt_embeds"]
                v = unpack(pipe.transformer(hidden_states=pack(x_t), timestep=tt, guidance=g,
                                            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=e,
                                            txt_ids=torch.zeros(e.shape[1], 3), img_ids=image_ids(8, 8, "cpu",
                                                                                                 torch.float32)
                                            ).sample, 8, 8)
        assert (x0 - (x_t - t * v)).abs().max() < 1e-5, sigma


def test_guidance_is_one_batched_pass_counted_as_two():
    teacher = tiny_sd3_pipeline(seed=1)
    calls = []
    teacher.network.register_forward_hook(lambda mod, args, kw_out=None: calls.append(1))
    cond = teacher.encode_prompt(PROMPTS, guidance_scale=3.0)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided = teacher(z, 2.0, **cond)
        uncond = teacher(z, 2.0, **{**cond, "prompt_embeds": cond["negative_prompt_embeds"],
                                    "pooled_prompt_embeds": cond["negative_pooled_prompt_embeds"], "guidance_scale": 1})
        pos = teacher(z, 2.0, **{**cond, "guidance_scale": 1.0})
    assert calls == [1, 1, 1]
    assert torch.allclose(guided, uncond + 3.0 * (pos - uncond), atol=1e-4)  # batch 4 vs 2 + 2: float32 rounding
    assert teacher.passes(**cond) == 2 and teacher.passes(**{**cond, "guidance_scale": 1.0}) == 1
    _, nfe = cmkit.text_to_image(teacher, PROMPTS, steps=3, solver="euler", guidance_scale=3.0, return_nfe=True)
    assert nfe == 6
    flux = tiny_flux_pipeline(guidance=True)
    assert flux.passes(**flux.encode_prompt(PROMPTS, guidance_scale=3.5)) == 1  # dev embeds guidance: one pass


def test_schedules_round_trip_and_convert_outputs_exactly():
    fm = FlowMatchSchedule()
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(fm.time(fm.sigma(t)), t, atol=1e-14)
    assert math.isinf(fm.sigma(torch.tensor(1.0, dtype=torch.float64))) and fm.time(torch.tensor(math.inf)) == 1
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for tt in (0.1, 0.5, 0.97):
        s = fm.sigma(torch.tensor(tt, dtype=torch.float64))
        x_t = (1 - tt) * x0 + tt * eps
        assert torch.allclose(fm.from_native(x_t, s), x0 + s * eps)          # x_sigma = x_t / (1 - t)
        assert torch.allclose(fm.to_x0("flow", x_t, s, eps - x0), x0)
        assert torch.allclose(fm.to_x0("epsilon", x_t, s, eps), x0)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    assert torch.equal(fm.to_native(eps, inf), eps) and torch.allclose(fm.to_x0("flow", eps, inf, eps - x0), x0)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    vp = VPSchedule(abar)
    idx = torch.tensor([0.0, 10.5, 500.25, 999.0], dtype=torch.float64)
    assert torch.allclose(vp.time(vp.sigma(idx)), idx, atol=1e-9)
    s = vp.sigma(torch.tensor(300.0, dtype=torch.float64))
    a, b = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    x_n = a * x0 + b * eps
    assert torch.allclose(vp.to_x0("v_prediction", x_n, s, a * eps - b * x0), x0)
    assert torch.allclose(shift_times(torch.tensor(0.5), 3.0), torch.tensor(0.75))   # sigma 1 -> 3
    assert torch.allclose(mu_shift_times(torch.tensor(0.5), math.log(2.0)), torch.tensor(2 / 3))


def test_every_solver_starts_at_pure_noise():
    """A solve from sigma = inf on Gaussian data (D in closed form) matches the exact flow solution for every step
    and grid solver (first step: Euler's limit D + sigma_1 eps), and an adaptive one reaches the same end."""
    teacher = tiny_sd3_pipeline(seed=2)
    sd = 0.7

    class Gauss(torch.nn.Module):  # data N(0, sd^2): D(x, sigma) = x sd^2 / (sigma^2 + sd^2), at inf: 0
        schedule = FlowMatchSchedule()

        def forward(self, x, sigma, **cond):
            s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
            return torch.where(torch.isinf(s), torch.zeros_like(x), x * sd**2 / (s**2 + sd**2))

    eps = torch.randn(4, 3, dtype=torch.float64)
    grid = [math.inf] + [float(s) for s in torch.tensor(timestep_sigmas(teacher, 40, None)[1:])]
    exact = eps * sd  # the PF-ODE maps the noise eps to sd eps (x_sigma = sqrt(sigma^2 + sd^2) eps)
    errors = {}
    for method in ("euler", "heun", "dpm2", "dpmpp_2m", "dopri5"):
        out = cmkit.ode_solve(Gauss(), eps.clone(), grid, method=method)
        assert torch.isfinite(out).all(), method
        errors[method] = float(((out - exact).abs() / exact.abs()).max())
    # a 40-step shifted flow grid: the first-order solvers' error is the grid's (the same from a finite start)
    limits = {"euler": 0.07, "heun": 0.01, "dpm2": 0.01, "dpmpp_2m": 0.07, "dopri5": 1e-3}
    assert all(errors[m] < limits[m] for m in limits), errors
    for method in ("euler", "heun", "dpmpp_2m"):  # the step from inf is exactly D(eps, inf) + sigma_1 eps
        from_inf = cmkit.ode_solve(Gauss(), eps.clone(), grid, method=method)
        from_first = cmkit.ode_solve(Gauss(), grid[1] * eps, grid[1:], method=method)
        assert torch.allclose(from_inf, from_first, rtol=0, atol=1e-12), method
    one = cmkit.ode_solve(Gauss(), eps.clone(), [math.inf, 0.0], method="euler")
    assert torch.equal(one, torch.zeros_like(eps))  # one step from pure noise is D there


def test_bad_inputs_name_the_problem(tmp_path):
    import json

    folder = tmp_path / "pipe"
    tiny_flux_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    with pytest.raises(ValueError, match="no adapter for the pipeline class 'KandinskyPipeline'.*FluxPipeline"):
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
        cmkit.load_teacher(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    with pytest.raises(ValueError, match="without its T5 encoder"):
        cmkit.load_teacher(str(folder))
    flux = tiny_flux_pipeline()
    with pytest.raises(ValueError, match="not a positive multiple of 8"):  # the VAE halves twice, packing once more
        flux.image_size = 36
    sd3 = tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="scheduler's own grid"):
        timestep_sigmas(sd3, 4, "leading")
    with pytest.warns(UserWarning, match="truncated"):
        sd3.encode_prompt(["a red sneaker " * 10])


def test_the_shipped_flow_teacher_samples_in_its_own_pipeline_as_cmkit_samples_it():
    """cmkit:tiny-sd3 opens in StableDiffusion3Pipeline (no T5: the documented text_encoder_3=None call) and its
    scheduler there gives cmkit's Euler solve over the folder's grid (cmkit with the collapsed zero tokens, the
    pipeline with all 256); it stays within the ~20 MB a shipped text-to-image teacher may take."""
    import diffusers

    folder = cmkit.loading.asset_path("tiny-sd3")
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 20 * 2**20
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    teacher = cmkit.load_teacher("cmkit:tiny-sd3")
    assert type(teacher.family).__name__ == "StableDiffusion3" and teacher.prompt_encoder.t5 is None
    latents = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    ours = cmkit.text_to_image(teacher, PROMPTS, steps=3, solver="euler", guidance_scale=4.0, latents=latents,
                               spacing=None, output="latent")
    theirs = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=3, guidance_scale=4.0,
                  output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [8, 1])
def test_a_non_square_size_and_prompt_length_are_the_pipelines(saved, steps):
    """``text_to_image(height=32, width=48, max_sequence_length=16)`` is the pipeline called with the same
    arguments (Flux's ``mu`` follows the 4x6 packed tokens), and the model's own size is restored after."""
    kind, teacher, pipe = saved
    shape, length = teacher.sample_shape, teacher.prompt_encoder.max_sequence_length
    teacher.prompt_encoder.max_sequence_length = 7  # the call's own length must win over the model's
    latents = torch.randn(2, shape[0], 8, 12, generator=torch.Generator().manual_seed(steps))
    w = 4.0 if kind != "flux-schnell" else 1.0
    ours = cmkit.text_to_image(teacher, PROMPTS, steps=steps, solver="euler", guidance_scale=w, latents=latents,
                               spacing=None, height=32, width=48, max_sequence_length=16)
    assert teacher.sample_shape == shape and teacher.prompt_encoder.max_sequence_length == 7
    teacher.prompt_encoder.max_sequence_length = length
    kw = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=w, output_type="pt", height=32, width=48,
              max_sequence_length=16)
    theirs = pipe(latents=latents if kind.startswith("sd3") else pack(latents), **kw).images
    assert ours.shape == (2, 3, 32, 48)
    assert ((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max() < 1e-4


def test_sizes_and_lengths_a_family_cannot_take_are_one_line(saved):
    kind, teacher, _ = saved
    shape = teacher.sample_shape
    multiple = 8  # the VAE's factor 4 times SD3's 2x2 patches or Flux's 2x2 packing
    cases = [(dict(height=32 + multiple // 2), f"multiple of {multiple}"), (dict(width=0), f"multiple of {multiple}"),
             (dict(height=33.0), f"multiple of {multiple}"), (dict(max_sequence_length=513), "use at most 512"),
             (dict(max_sequence_length=0), "max_sequence_length"),
             (dict(cfg_normalization=True), "no guidance option 'cfg_normalization'")]  # Z-Image's, not theirs
    for bad, needle in cases:
        with pytest.raises(ValueError) as e:
            cmkit.text_to_image(teacher, PROMPTS[:1], steps=1, **bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert teacher.sample_shape == shape
