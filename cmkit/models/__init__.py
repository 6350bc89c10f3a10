"""Layer 2: backbones, the one preconditioning, denoiser wrappers (EDM, VP / DDPM), latent text-to-image models
(guided UNet2DConditionModel denoisers, VAE, CLIP prompt encoding, the latent cache), consistency models, and the
model folder format."""

from .backbones import BACKBONE_CLASSES, BACKBONES, TimeMLP, network_of, num_classes_of, sample_shape, small_unet
from .consistency import ConsistencyModel, DenoiserConsistencyModel
from .continuous import MeanFlowModel, TrigFlowConsistencyModel
from .denoisers import Denoiser, DiffusersDenoiser, EDMDenoiser
from .folder import MODEL_KINDS
from .latent import LatentDenoiser, TextToImageModel
from .loading import asset_path, load_model, load_teacher
from .precond import Preconditioned
from .text_encoders import PromptEncoder

__all__ = [
    "BACKBONE_CLASSES", "BACKBONES", "MODEL_KINDS", "ConsistencyModel", "DenoiserConsistencyModel", "Denoiser",
    "DiffusersDenoiser", "EDMDenoiser", "LatentDenoiser", "MeanFlowModel", "Preconditioned", "PromptEncoder",
    "TextToImageModel", "TimeMLP", "TrigFlowConsistencyModel", "asset_path", "load_model", "load_teacher",
    "network_of", "num_classes_of", "sample_shape", "small_unet",
]
