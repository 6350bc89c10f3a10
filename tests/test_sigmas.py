import math

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler

import cmkit
from cmkit import core as S


def test_karras_grid_shape_and_ends():
    s = cmkit.karras_sigmas(18)
    assert s.shape == (18,)
    assert s[0] == 80.0 and s[-1] == torch.tensor(0.002)
    assert (s[1:] < s[:-1]).all()
    # closed form at an interior point
    i, n, rho = 5, 18, 7.0
    want = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert math.isclose(s[i].item(), want, rel_tol=1e-6)
    assert cmkit.karras_sigmas(1).tolist() == [80.0]


def test_boundary_scalings_match_diffusers_scheduler():
    sched = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    sig = torch.cat([torch.logspace(math.log10(0.002), math.log10(80.0), 500, dtype=torch.float64),
                     cmkit.karras_sigmas(40, dtype=torch.float64)])
    c_skip, c_out, c_in = cmkit.boundary_scalings(sig)
    ref_skip, ref_out = sched.get_scalings_for_boundary_condition(sig)
    torch.testing.assert_close(c_skip, ref_skip, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_out, ref_out, rtol=0, atol=1e-6)
    # diffusers divides the model input by (sigma^2 + sigma_data^2)^0.5 and feeds the net 250 log(sigma)
    torch.testing.assert_close(c_in, 1 / (sig**2 + 0.25) ** 0.5)
    np.testing.assert_allclose(S.c_noise(sig).numpy(), sched.sigma_to_t(sig.numpy()), rtol=1e-12, atol=1e-9)


def test_boundary_condition_is_exact_in_float32():
    c_skip, c_out, _ = cmkit.boundary_scalings(torch.tensor([0.002]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_edm_scalings_match_diffusers_edm_scheduler():
    """cmkit's EDM preconditioning equals diffusers' EDMEulerScheduler's (an independent implementation):
    c_in from precondition_inputs, c_skip and c_out from precondition_outputs on unit inputs."""
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler(sigma_data=0.5)
    sig = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = cmkit.edm_scalings(sig)
    one, zero = torch.ones_like(sig), torch.zeros_like(sig)
    torch.testing.assert_close(c_in, sched.precondition_inputs(one, sig), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_skip, sched.precondition_outputs(one, zero, sig), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, sched.precondition_outputs(zero, one, sig), rtol=1e-14, atol=0)


def test_check_sigmas_errors():
    import pytest

    with pytest.raises(ValueError, match="descending"):
        S.check_sigmas([1.0, 2.0], 0.002, 80)
    with pytest.raises(ValueError, match=r"\[sigma_min, sigma_max\]"):
        S.check_sigmas([100.0, 1.0], 0.002, 80)
    with pytest.raises(ValueError, match=r"\[sigma_min, sigma_max\]"):
        S.check_sigmas([80.0, 0.001], 0.002, 80)
    assert S.check_sigmas([80.0, 0.8], 0.002, 80).tolist() == [80.0, 0.8]
