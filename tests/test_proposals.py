"""The time <-> sigma maps (one implementation, the schedules', exact at sigma = 0 and sigma = inf) and the time
proposals of ``core.proposals``, each pinned to its equation and to the order and form of its random calls: the same
generator gives bit-identical draws to the expressions the objectives used to write out themselves."""

import math

import pytest
import torch

from cmkit.core import (
    FlowMatchSchedule,
    TrigFlowSchedule,
    flow_to_sigma,
    shift_times,
    sigma_to_flow,
    sigma_to_trig,
    trig_to_sigma,
)
from cmkit.core import proposals as P

SD = 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_and_trigflow_maps_are_exact_at_zero_and_infinity(dtype):
    ends = torch.tensor([0.0, math.inf], dtype=dtype)
    assert sigma_to_flow(ends).tolist() == [0.0, 1.0]          # t = 1 exactly at sigma = inf (was NaN), 0 at 0
    assert flow_to_sigma(torch.tensor([0.0, 1.0], dtype=dtype)).tolist() == [0.0, math.inf]
    trig = sigma_to_trig(ends, SD)
    assert trig[0].item() == 0.0 and trig[1].item() == torch.tensor(math.pi / 2, dtype=dtype).item()
    assert not sigma_to_flow(torch.tensor([math.inf])).isnan().any()


def test_maps_round_trip_at_finite_sigmas_against_the_closed_form():
    sigma = torch.tensor([1e-6, 0.002, 0.05, 0.5, 1.0, 3.0, 80.0, 1e4], dtype=torch.float64)
    t = sigma_to_flow(sigma)
    torch.testing.assert_close(t, sigma / (1 + sigma), rtol=1e-15, atol=0)
    torch.testing.assert_close(flow_to_sigma(t), sigma, rtol=1e-11, atol=0)
    tt = sigma_to_trig(sigma, SD)
    torch.testing.assert_close(tt, torch.atan(sigma / SD), rtol=1e-15, atol=0)
    torch.testing.assert_close(trig_to_sigma(tt, SD), sigma, rtol=1e-10, atol=0)  # tan near pi/2: cond ~ sigma
    torch.testing.assert_close(trig_to_sigma(tt, SD), SD * torch.tan(tt), rtol=0, atol=0)


def test_the_named_maps_are_the_schedules_own():
    sigma = torch.tensor([0.0, 0.01, 0.7, 12.0, math.inf])
    assert torch.equal(sigma_to_flow(sigma), FlowMatchSchedule().time(sigma))
    assert torch.equal(sigma_to_trig(sigma, SD), TrigFlowSchedule(SD).time(sigma))
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(flow_to_sigma(t), FlowMatchSchedule().sigma(t))
    assert torch.equal(trig_to_sigma(t, SD), TrigFlowSchedule(SD).sigma(t))


def _gen():
    return torch.Generator().manual_seed(1234)


def test_lognormal_sigmas_is_the_exponential_of_one_normal_draw():
    s = P.lognormal_sigmas(64, -1.1, 2.0, 0.002 * 1.0001, 80.0, dtype=torch.float64, generator=_gen())
    want = (-1.1 + 2.0 * torch.randn(64, generator=_gen())).exp().clamp(0.002 * 1.0001, 80.0).double()
    assert torch.equal(s, want) and s.dtype == torch.float64
    big = P.lognormal_sigmas(200_000, -1.2, 1.2, generator=_gen())
    assert abs(big.log().mean().item() + 1.2) < 0.01 and abs(big.log().std().item() - 1.2) < 0.01


def test_index_proposals():
    n = P.uniform_index_pairs(170_000, 18, generator=_gen())
    assert torch.equal(n, torch.randint(0, 17, (170_000,), generator=_gen()))
    assert n.min() == 0 and n.max() == 16
    counts = torch.bincount(n, minlength=17).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05
    assert torch.equal(P.uniform_indices(50, 7, generator=_gen()), torch.randint(0, 7, (50,), generator=_gen()))
    probs = P.lognormal_index_probs(torch.linspace(0.002, 80.0, 11))
    assert torch.equal(P.lognormal_index_pairs(40, probs, generator=_gen()),
                       torch.multinomial(probs, 40, replacement=True, generator=_gen()))
    with pytest.raises(ValueError, match="at least 2 points"):
        P.uniform_index_pairs(4, 1)


def test_logit_normal_times_are_sd3s_shifted_logit_normal():
    t = P.logit_normal_times(64, 0.2, 0.8, 3.0, 1e-5, generator=_gen())
    u = torch.sigmoid(0.2 + 0.8 * torch.randn(64, generator=_gen()))
    assert torch.equal(t, (3.0 * u / (1 + 2.0 * u)).clamp(1e-5, 1 - 1e-5))
    assert torch.equal(P.logit_normal_times(64, generator=_gen()), torch.sigmoid(torch.randn(64, generator=_gen())))


def test_shifted_uniform_sigmas_are_rcms_dmd_noise():
    s = P.shifted_uniform_sigmas(64, 5.0, 0.01, 200.0, generator=_gen())
    u = torch.rand(64, dtype=torch.float64, generator=_gen())
    f = 5.0 * u / (1 + 4.0 * u)
    assert torch.equal(s, (f / (1 - f)).clamp(0.01, 200.0)) and s.dtype == torch.float64
    assert torch.equal(shift_times(u, 5.0), f)


def test_trigflow_times_are_scms_tan_lognormal():
    lo, hi = 0.002, 80.0
    t = P.trigflow_times(64, -0.8, 1.6, SD, lo, hi, generator=_gen())
    tau = -0.8 + 1.6 * torch.randn(64, generator=_gen())
    t_min, t_max = (float(torch.atan(torch.tensor(s, dtype=torch.float64) / SD)) for s in (lo, hi))
    assert torch.equal(t, torch.atan(tau.exp() / SD).clamp(t_min, t_max))
    assert t.min() >= t_min - 1e-7 and t.max() <= t_max + 1e-7


def test_meanflow_times_are_two_logit_normals_and_a_share_of_r_equal_t():
    r, t = P.meanflow_times(1000, -0.4, 1.0, 0.25, dtype=torch.float64, generator=_gen())
    g = _gen()
    a, b = torch.sigmoid(-0.4 + 1.0 * torch.randn(2, 1000, generator=g))
    hi, low = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.rand(1000, generator=g) < 0.25
    assert torch.equal(t, hi.double()) and torch.equal(r, torch.where(keep, low, hi).double())
    assert (r <= t).all() and 0.15 < (r < t).double().mean().item() < 0.35
