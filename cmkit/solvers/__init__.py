"""Layer 3: the probability-flow ODE of any denoiser, ``dx/dsigma = (x - D(x, sigma)) / sigma``: solvers by name
(a registry: step solvers and grid solvers, one signature each), whole-trajectory solves (torchdiffeq for adaptive
ones) and teacher grids of an exact NFE. Importing this package registers every solver module."""

from . import multistep, steps, unipc  # noqa: F401  (registers the solvers)
from .registry import SOLVERS, Solver, grid_solver, pf_ode_drift, step_solver, step_solvers
from .solve import ode_solve, ode_step, teacher_grid

__all__ = ["SOLVERS", "Solver", "grid_solver", "ode_solve", "ode_step", "pf_ode_drift", "step_solver", "step_solvers",
           "teacher_grid"]
