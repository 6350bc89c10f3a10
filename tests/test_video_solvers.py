"""Video-shaped batches (B, C, F, H, W) through every registered solver (step and grid ones) and one torchdiffeq
method: the exact denoiser of Gaussian data whose mean differs per channel, frame and pixel, solved from sigma_max
and from sigma = inf, against the PF-ODE's closed form (x(sigma) - mu scales like sqrt(s^2 + sigma^2)); and the same
batch reshaped to 4-D gives the same numbers, so no solver mixes up a dimension."""

import math

import pytest
import torch

import cmkit
from cmkit.solvers import SOLVERS

S, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0
SHAPE = (2, 3, 5, 4, 4)                        # (B, C, F, H, W)
# the order each deterministic solver reaches, and its error bound at STEPS (measured: 0.11, 0.11, 0.015, 0.0087,
# 0.016, 0.0058, 3e-5)
ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpm2": 2, "dpmpp_2m": 2, "unipc": 3}  # UniC lifts UniP-2 to 3
STEPS = 40
TOL = {"euler": 0.25, "ddim": 0.25, "heun": 0.03, "dpm2": 0.02, "dpmpp_2m": 0.03, "unipc": 0.012, "dopri5": 1e-4}
METHODS = [*SOLVERS.names(), "dopri5"]


class FrameGaussian:
    """The exact denoiser of N(mu, S^2) data, mu a full (C, F, H, W) tensor; a 4-D batch reads mu reshaped like it."""

    def __init__(self, mu):
        self.mu = mu

    def __call__(self, x, sigma):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mu = self.mu.reshape(1, *x.shape[1:])
        return mu + S**2 / (S**2 + s**2) * (x - mu)


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    mu = 0.3 * torch.randn(1, *SHAPE[1:], generator=g, dtype=torch.float64)
    x = SIGMA_MAX * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return FrameGaussian(mu), x, eps


def _grid(n):
    return cmkit.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64).tolist()


def _closed_form(den, x, sigma_from, sigma_to):
    if math.isinf(sigma_from):                 # x holds eps: (x(sigma) - mu) / sigma -> eps
        return den.mu + x * math.sqrt(S**2 + sigma_to**2)
    return den.mu + (x - den.mu) * math.sqrt(S**2 + sigma_to**2) / math.sqrt(S**2 + sigma_from**2)


def _solve(den, x, grid, method, seed=0):
    torch.manual_seed(seed)                    # the consistency sampler draws fresh noise
    return cmkit.ode_solve(den, x, grid, method=method, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("start", ["sigma_max", "inf"])
def test_video_batch_matches_the_closed_form(case, method, start):
    den, x, eps = case
    if method == "consistency":                # stochastic: one step is one exact denoise, D(x, sigma_max)
        out = _solve(den, x, [SIGMA_MAX, 0.0], method)
        torch.testing.assert_close(out, den(x, SIGMA_MAX), rtol=0, atol=0)
        return
    if method not in TOL:
        pytest.skip(f"no error bound recorded for {method!r} (the 5-D / 4-D test still runs it)")
    x0, grid = (x, _grid(STEPS)) if start == "sigma_max" else (eps, [math.inf, *_grid(STEPS)])
    out = _solve(den, x0, grid, method)
    assert out.shape == SHAPE
    err = (out - _closed_form(den, x0, grid[0], SIGMA_MIN)).abs().max().item()
    assert err < TOL[method], (method, start, err)


@pytest.mark.parametrize("method", sorted(ORDER))
def test_video_batch_converges_at_the_solvers_order(case, method):
    den, x, _ = case
    ref = _closed_form(den, x, SIGMA_MAX, SIGMA_MIN)
    e1, e2 = ((_solve(den, x, _grid(n), method) - ref).abs().max().item() for n in (STEPS // 2, STEPS))
    assert e1 / e2 > 0.75 * 2 ** ORDER[method], (method, e1, e2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("as_4d", [(2, 15, 4, 4), (2, 3, 20, 4)], ids=["CF-H-W", "C-FH-W"])
def test_video_batch_equals_the_same_data_in_4d(case, method, as_4d):
    den, x, eps = case
    grid = [SIGMA_MAX, *_grid(8)[1:], 0.0]
    assert torch.equal(_solve(den, x, grid, method).reshape(as_4d), _solve(den, x.reshape(as_4d), grid, method))
    five = _solve(den, eps, [math.inf, *grid], method)   # from pure noise
    assert torch.equal(five.reshape(as_4d), _solve(den, eps.reshape(as_4d), [math.inf, *grid], method))


@pytest.mark.parametrize("solver", [n for n in SOLVERS.names() if SOLVERS[n].step is not None])
def test_video_batch_takes_per_sample_sigmas(case, solver):
    """A step with one sigma per sample (as distillation takes them) equals each sample's own step."""
    den, x, _ = case
    s0 = torch.tensor([5.0, 0.7], dtype=torch.float64)
    s1 = torch.tensor([2.0, 0.3], dtype=torch.float64)
    torch.manual_seed(0)
    both = cmkit.ode_step(den, x, s0, s1, solver=solver)
    if solver == "consistency":                # D(x, sigma_from) + sigma_to eps, eps drawn for the whole batch
        torch.manual_seed(0)
        both = both - s1.reshape(-1, 1, 1, 1, 1) * torch.randn_like(x)
    for b in range(SHAPE[0]):
        if solver == "consistency":
            alone = den(x[b:b + 1], float(s0[b]))
        else:
            alone = cmkit.ode_step(den, x[b:b + 1], float(s0[b]), float(s1[b]), solver=solver)
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-12, atol=1e-12)
