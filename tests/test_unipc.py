"""cmkit's ``unipc`` grid solver equals diffusers' ``UniPCMultistepScheduler`` (defaults: order 2, bh2, data
prediction, lower_order_final) stepped with the same analytic denoiser, over flow-matching grids (Wan's
``use_flow_sigmas`` / ``flow_prediction``) and a VP DDPM grid (``epsilon``), mapped to sigma space."""

import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler

import cmkit
from cmkit.core.schedules import FlowMatchSchedule

MU, S = 0.3, 0.5


def gaussian(x, sigma):
    """The exact denoiser of N(MU, S^2) data in sigma space (VE form)."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def _scheduler_run(sched, x_n, model_output):
    """The pipeline's loop: ``model_output(x_n, i)`` then ``sched.step``; returns the final native sample."""
    for i, t in enumerate(sched.timesteps):
        x_n = sched.step(model_output(x_n, i), t, x_n).prev_sample
    return x_n


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 8, 20])
def test_unipc_equals_diffusers_on_flow_sigmas(shift, steps):
    sched = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    sched.set_timesteps(steps)
    t = sched.sigmas.double()                  # the scheduler's flow times (float32 values, read exactly)
    sigmas = FlowMatchSchedule().sigma(t)      # cmkit's grid: sigma = t / (1 - t); t = 1 - 1e-6 -> ~1e6

    def velocity(x_n, i):                      # v = eps - x0 of the exact denoiser, at the scheduler's sigma
        ti = t[i]
        s = ti / (1 - ti)
        x = x_n / (1 - ti)
        d = gaussian(x, s)
        return (x - d) / s - d

    torch.manual_seed(0)
    noise = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    theirs = _scheduler_run(sched, noise.clone(), velocity)
    ours, nfe = cmkit.ode_solve(gaussian, noise / (1 - t[0]), sigmas, method="unipc", return_nfe=True)
    assert nfe == steps and float(sigmas[-1]) == 0.0   # the grid ends at 0, where x_sigma = x_t = x0
    assert (ours - theirs).abs().max() < 1e-5            # measured <= 1.1e-7 (the scheduler's float32 sigmas)
    # the corrector matters: DPM-Solver++(2M), UniP alone, is 5e-3 to 5e-2 away on these grids
    assert (cmkit.ode_solve(gaussian, noise / (1 - t[0]), sigmas, method="dpmpp_2m") - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [4, 8, 20])
def test_unipc_equals_diffusers_on_a_vp_grid(steps):
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()             # a VP scheduler's sigmas are sigma-space sigmas already

    def epsilon(x_n, i):
        s = sigmas[i]
        x = x_n * (1 + s**2).sqrt()            # x_sigma = x_n / alpha, alpha = 1 / sqrt(1 + sigma^2)
        return (x - gaussian(x, s)) / s

    torch.manual_seed(1)
    x_n = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    theirs = _scheduler_run(sched, x_n.clone(), epsilon)
    ours = cmkit.ode_solve(gaussian, x_n * (1 + sigmas[0] ** 2).sqrt(), sigmas, method="unipc")
    assert (ours - theirs).abs().max() < 1e-5            # measured <= 2.7e-7


def test_unipc_converges_at_third_order_and_from_infinity():
    torch.manual_seed(0)
    x = 80.0 * torch.randn(64, 3, dtype=torch.float64)
    ref = MU + (x - MU) * math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2)
    errs = [(cmkit.ode_solve(gaussian, x, cmkit.karras_sigmas(n, dtype=torch.float64), method="unipc") - ref)
            .abs().max().item() for n in (40, 80)]
    assert errs[1] < 2e-3 and errs[0] / errs[1] > 6, errs  # UniC lifts order 2 to 3: halving h cuts it ~8x
    # from sigma = inf the state holds eps; the solve is the limit of solves from ever larger sigma_max
    eps = torch.randn(64, 3, dtype=torch.float64)
    grid = [math.inf, *cmkit.karras_sigmas(40, dtype=torch.float64).tolist()]
    out = cmkit.ode_solve(gaussian, eps, grid, method="unipc")
    exact = MU + eps * math.sqrt(S**2 + 0.002**2)   # (x - MU) / sigma -> eps as sigma -> inf
    assert (out - exact).abs().max() < 1e-2       # measured 6e-3 (dpmpp_2m: 1.6e-2)
    big = cmkit.ode_solve(gaussian, eps * 1e12, [1e12, *grid[1:]], method="unipc")
    assert (out - big).abs().max() < 1e-7         # measured 1.4e-9: the limit (r -> -inf) is slow, like 1/log


def test_unipc_counts_one_evaluation_a_step():
    assert cmkit.solvers.SOLVERS["unipc"].evals_per_step == 1
    grid = cmkit.solvers.teacher_grid(6, "unipc", 0.002, 80.0)
    _, nfe = cmkit.ode_solve(gaussian, torch.randn(2, 3, dtype=torch.float64), grid, method="unipc",
                             return_nfe=True)
    assert nfe == 6
