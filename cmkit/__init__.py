"""cmkit: consistency models in sigma space (EDM convention, ``x_sigma = x_0 + sigma * z``).

Distil a diffusion teacher, sample in one to four network evaluations, and measure quality against steps.
"""

from . import metrics
from .consistency import ConsistencyModel, DenoiserConsistencyModel
from .denoisers import Denoiser, DiffusersDenoiser, EDMDenoiser, load_teacher
from .editing import colorize, denoise, inpaint, interpolate, sdedit, superres
from .nets import TimeMLP
from .ode import ode_solve, ode_step, pf_ode_drift
from .sampling import sample, sample_teacher, teacher_grid
from .sigmas import boundary_scalings, edm_scalings, karras_sigmas

__version__ = "0.1.0"

__all__ = [
    "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser", "DiffusersDenoiser", "EDMDenoiser", "TimeMLP",
    "boundary_scalings",
    "edm_scalings", "karras_sigmas", "load_teacher", "metrics", "ode_solve", "ode_step", "pf_ode_drift", "sample",
    "sample_teacher", "teacher_grid", "inpaint", "colorize", "superres", "denoise", "interpolate", "sdedit",
]
