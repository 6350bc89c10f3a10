"""UniPC (Zhao et al. 2023): the unified predictor-corrector multistep solver, data-prediction form, B(h) = e^-h - 1
("bh2"), order 2, in sigma space. It is diffusers' ``UniPCMultistepScheduler`` at its defaults (``solver_order=2``,
``predict_x0=True``, ``solver_type="bh2"``, ``lower_order_final=True``, no corrector disabled), step for step, over
any grid: flow-matching grids (``use_flow_sigmas``, ``alpha_t = 1 - t``, ``sigma_t = t``: Wan's folders ship it)
and VP grids alike, since ``lambda = log(alpha_t / sigma_t) = -log sigma`` in every parameterisation.

In sigma space, with lambda = -log sigma, a step from sigma_s to sigma_t (h = lambda_t - lambda_s = log(sigma_s /
sigma_t) > 0) of the data-prediction update ``x_t = (sigma_t / sigma_s) x_s - expm1(-h) D_s - B(h) sum_k rho_k D1_k``
with B(h) = expm1(-h) = sigma_t / sigma_s - 1 reads

    x_t = D~ + (sigma_t / sigma_s) (x_s - D~),      D~ = D_s + sum_k rho_k D1_k,

a DDIM step with a corrected denoised estimate D~. With r_k = (lambda_{s-k} - lambda_s) / h and D1_k = (D_{s-k} -
D_s) / r_k:

- UniP-2 (predictor): D~ = D_s + D1_1 / 2 (``rho_p = 1/2``; this is DPM-Solver++(2M), ``dpmpp_2m``);
- UniC-p (corrector, after the network is evaluated at the predicted point x_t, D_t = D(x_t, sigma_t)): the same
  step from x_s again, with D~ = D_s + sum_{k<p} rho_k D1_k + rho_p (D_t - D_s), rho the solution of
  ``sum_k rho_k r_k^(i-1) = b_i`` (i = 1..p, r_p = 1), ``b_i = i! (-h) phi_{i+1}(-h) / B(h)`` (phi_1(z) = (e^z - 1)/z,
  phi_{k+1}(z) = (phi_k(z) - 1/k!) / z); UniC-1 uses ``rho = 1/2``.

Each step costs one evaluation: D_t serves both the corrector of x_t and the next predictor (evaluated at the
*uncorrected* x_t, as the scheduler does). Orders: the first step is order 1 (warm-up), the last step is order 1
(``lower_order_final``; to sigma = 0 it returns D_s), the corrector of a point uses the order of the predictor that
reached it, and no corrector follows the last step.

From sigma = inf (the state holds the unit noise eps) the first step's limit is ``D + sigma_1 eps``, and every
difference with the point at infinity drops out (r_k = -inf: D1_k = 0, and UniC-2's rho solves to (0, b_1)).
diffusers' flow grid starts at t = 1 - 1e-6 instead (sigma ~ 1e6), where those differences still weigh a few per
cent: to reproduce the scheduler, pass its grid as it is (``FlowMatchSchedule().sigma(sched.sigmas)``).
"""

from __future__ import annotations

import math

import torch

from .registry import grid_solver


def _ddim(x, d, s0: float, s1: float) -> torch.Tensor:
    """``D~ + (sigma_t / sigma_s) (x - D~)``; from sigma_s = inf (x holds eps) its limit ``D~ + sigma_t eps``."""
    if math.isinf(s0):
        return d + s1 * x
    return d + (s1 / s0) * (x - d)


def _r(sigmas: list[float], k: int, j: int, h: float) -> float:
    """``r = (lambda_k - lambda_j) / h`` with lambda = -log sigma; -inf where sigma_k = inf."""
    if math.isinf(sigmas[k]):
        return -math.inf
    return (math.log(sigmas[j]) - math.log(sigmas[k])) / h


def _predict(x, d, d_prev, sigmas: list[float], i: int, order: int) -> torch.Tensor:
    """UniP-``order`` from sigmas[i] to sigmas[i + 1] (D_s = ``d`` at sigmas[i], D_{s-1} = ``d_prev``)."""
    s0, s1 = sigmas[i], sigmas[i + 1]
    if s1 == 0:                                     # h = inf: the step's value is D_s
        return d
    d_tilde = d
    if order == 2:
        r = _r(sigmas, i - 1, i, math.log(s0) - math.log(s1))
        if math.isfinite(r):                        # r = -inf (the previous point at infinity): D1 = 0
            d_tilde = d + 0.5 * (d_prev - d) / r    # rho_p = 1/2
    return _ddim(x, d_tilde, s0, s1)


def _correct(x_s, d_s, d_prev, d_t, sigmas: list[float], i: int, order: int) -> torch.Tensor:
    """UniC-``order``: the step from sigmas[i] (x_s, D_s; D_{s-1} = ``d_prev``) to sigmas[i + 1] again, with D_t
    evaluated at the predicted point there."""
    s0, s1 = sigmas[i], sigmas[i + 1]
    if order == 1:                                  # rho = 1/2
        return _ddim(x_s, d_s + 0.5 * (d_t - d_s), s0, s1)
    hh = -(math.log(s0) - math.log(s1))             # -h
    b_h = math.expm1(hh)                            # B(h) = e^-h - 1 (bh2)
    h_phi = math.expm1(hh) / hh - 1                 # hh phi_2(hh)
    b1 = h_phi / b_h                                # 1! hh phi_2(hh) / B(h)
    h_phi = h_phi / hh - 0.5                        # hh phi_3(hh)
    b2 = 2 * h_phi / b_h                            # 2! hh phi_3(hh) / B(h)
    r = _r(sigmas, i - 1, i, -hh)
    if math.isinf(r):                               # [[1, 1], [-inf, 1]] rho = [b1, b2]: rho = (0, b1)
        return _ddim(x_s, d_s + b1 * (d_t - d_s), s0, s1)
    rho_1 = (b1 - b2) / (1 - r)                     # [[1, 1], [r, 1]] rho = [b1, b2]
    rho_t = b1 - rho_1
    return _ddim(x_s, d_s + rho_1 * (d_prev - d_s) / r + rho_t * (d_t - d_s), s0, s1)


@grid_solver("unipc", evals_per_step=1)
def unipc(den, x: torch.Tensor, sigmas: list[float], **cond) -> torch.Tensor:
    """UniPC-2 (bh2, data prediction) over a descending grid: a predictor step, then at each new point one evaluation
    that first corrects the point and then drives the next predictor (the module docstring has the equations)."""
    n = len(sigmas) - 1
    d_prev = d_prev_prev = None  # D at sigmas[i - 1], sigmas[i - 2]
    last = None                # (x, D, order) at the start of the previous step, for the corrector
    for i in range(n):
        d = den(x, sigmas[i], **cond)                  # at the predicted (uncorrected) point
        if last is not None:                           # UniC: correct x at sigmas[i] with D there
            x_s, d_s, p = last
            x = _correct(x_s, d_s, d_prev_prev, d, sigmas, i - 1, p)
        order = min(2, n - i, i + 1)                   # warm-up at the first step, order 1 at the last
        last = (x, d, order)
        x = _predict(x, d, d_prev, sigmas, i, order)
        d_prev_prev, d_prev = d_prev, d
    return x
