"""cmkit: consistency models in sigma space (EDM convention, ``x_sigma = x_0 + sigma * z``).

Distil a diffusion teacher, sample in one to four network evaluations, and measure quality against steps. The
subpackages are layers, lowest first: core, models, solvers, objectives, training / sampling, data / eval, cli
(see ARCHITECTURE.md); the names below are the public API.
"""

from .core import boundary_scalings, edm_scalings, karras_sigmas, sigma_to_flow, sigma_to_trig, trig_to_sigma
from .eval import metrics
from .models import (
                     ConsistencyModel,
                     Denoiser,
                     DenoiserConsistencyModel,
                     DiffusersDenoiser,
                     EDMDenoiser,
                     LatentDenoiser,
                     MeanFlowModel,
                     TextToImageModel,
                     TimeMLP,
                     TrigFlowConsistencyModel,
                     load_model,
                     load_teacher,
)
from .sampling import (
                       colorize,
                       denoise,
                       inpaint,
                       interpolate,
                       sample,
                       sample_teacher,
                       sdedit,
                       superres,
                       text_to_image,
)
from .solvers import ode_solve, ode_step, pf_ode_drift, teacher_grid

__version__ = "0.2.0"

__all__ = [
    "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser", "DiffusersDenoiser", "EDMDenoiser", "TimeMLP",
    "boundary_scalings", "edm_scalings", "karras_sigmas", "load_model", "load_teacher", "metrics", "ode_solve",
    "ode_step", "pf_ode_drift", "sample", "sample_teacher", "teacher_grid", "inpaint", "colorize", "superres",
    "denoise", "interpolate", "sdedit", "LatentDenoiser", "TextToImageModel", "text_to_image", "MeanFlowModel",
    "TrigFlowConsistencyModel", "sigma_to_flow", "sigma_to_trig", "trig_to_sigma",
]
