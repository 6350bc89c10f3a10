"""Layer 2: the pixel networks. Backbones, the one preconditioning, denoiser wrappers (EDM, diffusers VP / DDPM and
flow-matching networks), consistency models, the model folder format and loading by name. The latent text-to-image
stack lives beside it in ``cmkit.latent``."""

from .backbones import BACKBONE_CLASSES, BACKBONES, TimeMLP, network_of, num_classes_of, sample_shape, small_unet
from .consistency import ConsistencyModel, DenoiserConsistencyModel
from .continuous import MeanFlowModel, TrigFlowConsistencyModel
from .denoisers import Denoiser, DiffusersDenoiser, EDMDenoiser
from .folder import MODEL_KINDS
from .loading import asset_path, load_model, load_teacher
from .precond import Preconditioned

__all__ = [
    "BACKBONE_CLASSES", "BACKBONES", "MODEL_KINDS", "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser",
    "DiffusersDenoiser", "EDMDenoiser", "MeanFlowModel", "Preconditioned", "TimeMLP", "TrigFlowConsistencyModel",
    "asset_path", "load_model", "load_teacher",
    "network_of", "num_classes_of", "sample_shape", "small_unet",
]
