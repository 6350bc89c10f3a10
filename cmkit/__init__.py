"""cmkit: consistency models in sigma space (EDM convention, ``x_sigma = x_0 + sigma * z``).

Distil a diffusion teacher, sample in one to four network evaluations, and measure quality against steps. The
subpackages are layers, lowest first: core; models, data; latent, solvers; loading; objectives; training, sampling;
eval; cli (see ARCHITECTURE.md); ``_EXPORTS`` below is the public API.

The names are loaded on first use (PEP 562), so ``import cmkit`` and the command line's ``--help`` do not import
torch; ``cmkit.sample`` and ``from cmkit import sample`` work as plain attributes would.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings

from .core.lazy import lazy_exports


class _NoHubKernelsInBitsandbytes(importlib.abc.MetaPathFinder):
    """diffusers, peft and transformers import bitsandbytes whenever it is installed (cmkit's bnb extra, for
    ``train.optimizer = "adamw8bit"`` alone), and on CPUs with AVX512-BF16 its CPU backend then asks the ``kernels``
    package for a 4-bit GEMM kernel from the Hugging Face hub: code fetched from the network at import, and offline a
    line on every command. While that one module runs, ``kernels`` cannot be imported, so bitsandbytes takes its own
    fallback (its warning about it is quieted below); the 4-bit CPU kernel is one cmkit never calls."""

    TARGET = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path=None, target=None):
        if name != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            saved = sys.modules.get("kernels")
            sys.modules["kernels"] = None  # ``from kernels import get_kernel`` raises ImportError
            try:
                run(module)
            finally:
                if saved is None:
                    del sys.modules["kernels"]
                else:
                    sys.modules["kernels"] = saved

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _NoHubKernelsInBitsandbytes) for f in sys.meta_path):
    sys.meta_path.insert(0, _NoHubKernelsInBitsandbytes())
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# diffusers imports torchao whenever it is installed (cmkit's quant extra, for teacher.quantize alone), and torchao
# then says at every command that its C++ extensions do not match this torch: they hold custom kernels cmkit does
# not call (its weight-only int8 runs on plain tensor subclasses)
logging.getLogger("torchao").setLevel(logging.ERROR)
# diffusers' config download of a hub id passes huggingface_hub an argument it deprecated: a line about an internal
# call of another library, above cmkit's own output, that the user can do nothing about
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)

__version__ = "0.2.0"

# the public API, the one list of it: name -> the subpackage it lives in
_EXPORTS = {
    **dict.fromkeys(("boundary_scalings", "edm_scalings", "karras_sigmas", "sigma_to_flow", "sigma_to_trig",
                     "trig_to_sigma"), "core"),
    **dict.fromkeys(("metrics",), "eval"),
    **dict.fromkeys(("ConsistencyModel", "Denoiser", "DenoiserConsistencyModel", "DiffusersDenoiser", "EDMDenoiser",
                     "MeanFlowModel", "TimeMLP", "TrigFlowConsistencyModel"), "models"),
    **dict.fromkeys(("LatentConsistencyModel", "LatentDenoiser", "TextToImageModel"), "latent"),
    **dict.fromkeys(("load_model", "load_teacher"), "loading"),
    **dict.fromkeys(("colorize", "denoise", "inpaint", "interpolate", "lcm_sample", "sample", "sample_teacher",
                     "sdedit", "superres", "text_to_image", "text_to_video"), "sampling"),
    **dict.fromkeys(("ode_solve", "ode_step", "pf_ode_drift", "teacher_grid"), "solvers"),
}
__all__ = sorted(_EXPORTS)


_SUBPACKAGES = ("core", "models", "data", "latent", "solvers", "loading", "objectives", "training", "sampling", "eval",
                "cli")


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBPACKAGES)
