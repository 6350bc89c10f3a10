"""cmkit: consistency models in sigma space (EDM convention, ``x_sigma = x_0 + sigma * z``).

Distil a diffusion teacher, sample in one to four network evaluations, and measure quality against steps. The
subpackages are layers, lowest first: core, models, solvers, objectives, training / sampling, data / eval, cli
(see ARCHITECTURE.md); the names below are the public API.

The names are loaded on first use (PEP 562), so ``import cmkit`` and the command line's ``--help`` do not import
torch; ``cmkit.sample`` and ``from cmkit import sample`` work as plain attributes would.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

# diffusers imports bitsandbytes whenever it is installed (cmkit's bnb extra, for train.optimizer = "adamw8bit"), and
# on CPUs with AVX512-BF16 bitsandbytes then warns that an optional 4-bit GEMM kernel package is missing: a line on
# every command, about a kernel cmkit never calls. Its other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.2.0"

# public name -> the subpackage it lives in
_EXPORTS = {
    **dict.fromkeys(("boundary_scalings", "edm_scalings", "karras_sigmas", "sigma_to_flow", "sigma_to_trig",
                     "trig_to_sigma"), "core"),
    **dict.fromkeys(("metrics",), "eval"),
    **dict.fromkeys(("ConsistencyModel", "Denoiser", "DenoiserConsistencyModel", "DiffusersDenoiser", "EDMDenoiser",
                     "MeanFlowModel", "TimeMLP", "TrigFlowConsistencyModel", "load_model", "load_teacher"), "models"),
    **dict.fromkeys(("LatentConsistencyModel", "LatentDenoiser", "TextToImageModel"), "latent"),
    **dict.fromkeys(("colorize", "denoise", "inpaint", "interpolate", "lcm_sample", "sample", "sample_teacher",
                     "sdedit", "superres", "text_to_image"), "sampling"),
    **dict.fromkeys(("ode_solve", "ode_step", "pf_ode_drift", "teacher_grid"), "solvers"),
}

__all__ = [
    "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser", "DiffusersDenoiser", "EDMDenoiser", "TimeMLP",
    "boundary_scalings", "edm_scalings", "karras_sigmas", "load_model", "load_teacher", "metrics", "ode_solve",
    "ode_step", "pf_ode_drift", "sample", "sample_teacher", "teacher_grid", "inpaint", "colorize", "superres",
    "denoise", "interpolate", "sdedit", "LatentDenoiser", "TextToImageModel", "text_to_image", "MeanFlowModel",
    "TrigFlowConsistencyModel", "sigma_to_flow", "sigma_to_trig", "trig_to_sigma", "LatentConsistencyModel",
    "lcm_sample",
]


_SUBPACKAGES = ("core", "models", "latent", "solvers", "objectives", "training", "sampling", "data", "eval", "cli")


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # ``import cmkit; cmkit.models.load_model`` as before
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .core import boundary_scalings, edm_scalings, karras_sigmas, sigma_to_flow, sigma_to_trig, trig_to_sigma
    from .eval import metrics
    from .latent import LatentConsistencyModel, LatentDenoiser, TextToImageModel
    from .models import (
        ConsistencyModel,
        Denoiser,
        DenoiserConsistencyModel,
        DiffusersDenoiser,
        EDMDenoiser,
        MeanFlowModel,
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
        lcm_sample,
        sample,
        sample_teacher,
        sdedit,
        superres,
        text_to_image,
    )
    from .solvers import ode_solve, ode_step, pf_ode_drift, teacher_grid
