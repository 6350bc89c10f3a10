"""Multistep PF-ODE solvers that run a whole grid (one evaluation per step)."""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from .registry import grid_solver


@grid_solver("dpmpp_2m", evals_per_step=1)
def dpmpp_2m(den, x: torch.Tensor, sigmas: list[float], **cond) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in k-diffusion's form, with t = -log sigma and h = t_next - t:

        x <- (sigma_next / sigma) x - expm1(-h) D',   D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_last / h

    (first step and the step to sigma = 0 use D' = D_i). From sigma = inf (the state holds the unit noise eps) the
    step's limit is ``D + sigma_next eps``, and no earlier D enters the step after it (r is infinite there)."""
    old = None
    for i, (s0, s1) in enumerate(pairwise(sigmas)):
        d = den(x, s0, **cond)
        if s1 == 0:
            return d
        if math.isinf(s0):
            x, old = d + s1 * x, None
            continue
        h = math.log(s0) - math.log(s1)
        if old is not None:
            r = (math.log(sigmas[i - 1]) - math.log(s0)) / h
            d_use = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        else:
            d_use = d
        x = (s1 / s0) * x - math.expm1(-h) * d_use
        old = d
    return x
