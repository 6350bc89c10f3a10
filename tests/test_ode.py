import math

import pytest
import torch

import cmkit
from cmkit.solvers import teacher_grid


def closed_form(x, mu, s, sigma_from, sigma_to):
    """PF-ODE solution for N(mu, s^2) data: x(sigma) - mu scales like sqrt(s^2 + sigma^2)."""
    return mu + (x - mu) * math.sqrt(s**2 + sigma_to**2) / math.sqrt(s**2 + sigma_from**2)


@pytest.fixture
def setup(gaussian_denoiser):
    torch.manual_seed(0)
    mu, s = 0.3, 0.5
    den = gaussian_denoiser(mu, s)
    x = 80.0 * torch.randn(64, 3, dtype=torch.float64)
    return den, x, mu, s


def test_heun_on_fine_grid_matches_closed_form(setup):
    den, x, mu, s = setup
    sig = cmkit.karras_sigmas(1000, dtype=torch.float64)
    out = cmkit.ode_solve(den, x, sig, method="heun")
    ref = closed_form(x, mu, s, 80.0, 0.002)
    assert (out - ref).abs().max() < 1e-4


def test_dopri5_matches_closed_form(setup):
    den, x, mu, s = setup
    out, nfe = cmkit.ode_solve(den, x, [80.0, 0.002], method="dopri5", rtol=1e-8, atol=1e-8, return_nfe=True)
    ref = closed_form(x, mu, s, 80.0, 0.002)
    assert (out - ref).abs().max() < 1e-4
    assert nfe > 10


def test_dopri5_float32_to_zero(setup):
    den, x, mu, s = setup
    out = cmkit.ode_solve(den, x.float(), [80.0, 0.002, 0.0], method="dopri5")
    ref = mu + s**2 / (s**2 + 0.002**2) * (closed_form(x, mu, s, 80.0, 0.002) - mu)
    assert (out.double() - ref).abs().max() < 1e-3


def test_euler_step_formula_and_per_sample_sigmas(setup):
    den, x, mu, s = setup
    s0 = torch.linspace(1.0, 5.0, x.shape[0], dtype=torch.float64)
    s1 = s0 / 2
    out = cmkit.ode_step(den, x, s0, s1, solver="euler")
    d = (x - den(x, s0)) / s0[:, None]
    torch.testing.assert_close(out, x + (s1 - s0)[:, None] * d)


def test_heun_step_is_second_order(setup):
    den, x, mu, s = setup
    errs = []
    for h in (0.2, 0.1):
        out = cmkit.ode_step(den, x, 1.0, 1.0 - h, solver="heun")
        errs.append((out - closed_form(x, mu, s, 1.0, 1.0 - h)).abs().max().item())
    assert errs[0] / errs[1] > 6  # local error O(h^3): halving h cuts it about 8x


def test_heun_to_zero_is_one_denoise(setup):
    den, x, mu, s = setup
    out, nfe = cmkit.ode_solve(den, x, [2.0, 0.0], method="heun", return_nfe=True)
    torch.testing.assert_close(out, den(x, 2.0))
    assert nfe == 1


@pytest.mark.parametrize("solver,nfe", [("euler", 1), ("euler", 4), ("heun", 1), ("heun", 35)])
def test_teacher_grid_costs_exact_nfe(setup, solver, nfe):
    den, x, mu, s = setup
    grid = teacher_grid(nfe, solver, 0.002, 80.0)
    _, counted = cmkit.ode_solve(den, x[:4], grid, method=solver, return_nfe=True)
    assert counted == nfe


def test_bad_grid_and_solver(setup):
    den, x, mu, s = setup
    with pytest.raises(ValueError, match="descending"):
        cmkit.ode_solve(den, x, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown solver"):
        cmkit.ode_step(den, x, 1.0, 0.5, solver="rk9")


@pytest.mark.parametrize("method", ["heun", "dpm2", "dpmpp_2m"])
def test_second_order_solvers_converge_at_second_order(setup, method):
    den, x, mu, s = setup
    ref = closed_form(x, mu, s, 80.0, 0.002)
    errs = [(cmkit.ode_solve(den, x, cmkit.karras_sigmas(n, dtype=torch.float64), method=method) - ref).abs().max()
            for n in (40, 80)]
    assert errs[1] < 5e-3 and errs[0] / errs[1] > 3, errs  # first order would only halve the error


@pytest.mark.parametrize("solver,nfe", [("dpm2", 9), ("dpmpp_2m", 8), ("ddim", 5)])
def test_more_teacher_grids_cost_exact_nfe(setup, solver, nfe):
    den, x, mu, s = setup
    _, counted = cmkit.ode_solve(den, x[:4], teacher_grid(nfe, solver, 0.002, 80.0), method=solver, return_nfe=True)
    assert counted == nfe


def test_ddim_step_is_diffusers_ddim():
    """Our "ddim" (an Euler step in sigma space) equals diffusers' DDIMScheduler.step with eta = 0, mapped to sigma
    space, for the same UNet."""
    from diffusers import DDIMScheduler

    from cmkit.models import small_unet

    torch.manual_seed(0)
    net = small_unet(8, 1, 8, 1, 1, False).double().eval()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)  # steps of 100: 900, 800, ...
    den = cmkit.DiffusersDenoiser(net, sched)
    abar = sched.alphas_cumprod.double()
    sig = ((1 - abar) / abar).sqrt()
    x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        eps = net(x_t, 500).sample
        prev = sched.step(eps, 500, x_t, eta=0.0).prev_sample
        ours = cmkit.ode_step(den, x_t * (1 + sig[500] ** 2).sqrt(), float(sig[500]), float(sig[400]), solver="ddim")
    torch.testing.assert_close(ours, prev * (1 + sig[400] ** 2).sqrt(), rtol=1e-6, atol=1e-6)


def test_churn_sampler_keeps_the_gaussian_marginal(setup):
    """Karras Algorithm 2 with churn on N(mu, s^2) data ends at N(mu, s^2 + sigma_min^2) like the ODE does; noise of
    the wrong size at sigma_hat (e.g. sigma_hat instead of sqrt(sigma_hat^2 - sigma_i^2)) would inflate the spread."""
    den, _, mu, s = setup
    torch.manual_seed(1)
    sig = cmkit.karras_sigmas(161, dtype=torch.float64)
    x = 80.0 * torch.randn(40_000, 1, dtype=torch.float64)
    out = cmkit.ode_solve(den, x, sig, method="heun", churn=160.0)  # gamma = sqrt 2 - 1 at every step
    assert abs(out.mean().item() - mu) < 0.01
    assert abs(out.std().item() / math.sqrt(s**2 + 0.002**2) - 1) < 0.02
    det = cmkit.ode_solve(den, x, sig, method="heun")
    assert (out - det).abs().mean() > 0.1  # the churn did move the samples


def test_churn_noise_is_per_sample_and_only_for_fixed_step_solvers(setup):
    from cmkit.sampling import sample_teacher

    den = setup[0]
    den.sample_shape = (3,)
    den.register_buffer("anchor", torch.zeros((), dtype=torch.float64))  # device/dtype for the sampler
    sig = cmkit.karras_sigmas(9, dtype=torch.float64)
    big = sample_teacher(den, 6, sig, "heun", generator=torch.Generator().manual_seed(0), churn=5.0)
    small = sample_teacher(den, 2, sig, "heun", generator=torch.Generator().manual_seed(0), churn=5.0)
    torch.testing.assert_close(big[:2], small)
    plain = sample_teacher(den, 2, sig, "heun", generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, small)
    with pytest.raises(ValueError, match="churn runs with the step solvers"):
        cmkit.ode_solve(den, torch.zeros(2, 3, dtype=torch.float64), sig, method="dopri5", churn=1.0)
