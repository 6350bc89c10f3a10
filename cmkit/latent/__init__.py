"""Layer 2 (beside ``cmkit.models``): the latent text-to-image stack. Pipeline families as adapters (``family.py``,
``families/``: SD 1.x / 2.x, SDXL, SD3, Flux, each with its denoiser, prompt encoder and tiny stand-in), guidance
and ``TextToImageModel`` (``denoiser.py``), the shared text side (``text_encoders.py``), the VAE
(``autoencoder.py``), latent consistency models (``lcm.py``), few-step students of flow teachers
(``flow_student.py``), and small parts built from configs (``builders.py``)."""

from . import families  # noqa: F401  (registers every pipeline family)
from .denoiser import GuidedDenoiser, TextToImageModel
from .families.unet import LatentDenoiser, PromptEncoder
from .family import FAMILIES, PipelineFamily, register_family
from .flow_map import FlowMapModel
from .flow_student import FlowConsistencyModel
from .lcm import LatentConsistencyModel

__all__ = ["FAMILIES", "FlowConsistencyModel", "FlowMapModel", "GuidedDenoiser", "LatentConsistencyModel",
           "LatentDenoiser",
           "PipelineFamily", "PromptEncoder", "TextToImageModel", "register_family"]
