"""Layer 2: the pixel networks. Backbones, the one preconditioning, denoiser wrappers (EDM, diffusers VP / DDPM and
flow-matching networks), consistency models and the model folder format. The latent text-to-image stack builds on it
in ``cmkit.latent``; ``cmkit.loading`` opens either by name."""

from .backbones import BACKBONE_CLASSES, BACKBONES, TimeMLP, network_of, num_classes_of, sample_shape, small_unet
from .consistency import ConsistencyModel, DenoiserConsistencyModel
from .continuous import MeanFlowModel, TrigFlowConsistencyModel
from .denoisers import Denoiser, DiffusersDenoiser, EDMDenoiser
from .folder import MODEL_KINDS
from .precond import Preconditioned

__all__ = [
    "BACKBONE_CLASSES", "BACKBONES", "MODEL_KINDS", "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser",
    "DiffusersDenoiser", "EDMDenoiser", "MeanFlowModel", "Preconditioned", "TimeMLP", "TrigFlowConsistencyModel",
    "network_of", "num_classes_of", "sample_shape", "small_unet",
]
