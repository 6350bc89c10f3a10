"""Layer 2 (beside ``cmkit.models``): the latent text-to-image stack. Pipeline families as adapters (``family.py``,
``families/``: SD 1.x / 2.x, SDXL, SD3, Flux), the guided denoisers of latents and ``TextToImageModel``
(``denoiser.py``), the text side (``text_encoders.py``), the VAE (``autoencoder.py``), a dataset encoded once
(``latent_cache.py``), latent consistency models (``lcm.py``), and small pipelines built from configs
(``builders.py``), few-step students of flow teachers (``flow_student.py``)."""

from . import families  # noqa: F401  (registers every pipeline family)
from .denoiser import GuidedDenoiser, LatentDenoiser, TextToImageModel
from .family import FAMILIES, PipelineFamily, register_family
from .flow_student import FlowConsistencyModel
from .lcm import LatentConsistencyModel
from .text_encoders import PromptEncoder

__all__ = ["FAMILIES", "FlowConsistencyModel", "GuidedDenoiser", "LatentConsistencyModel", "LatentDenoiser",
           "PipelineFamily", "PromptEncoder", "TextToImageModel", "register_family"]
