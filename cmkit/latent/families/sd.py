"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder, its last hidden state as the
prompt embedding, ``""`` as the unconditional prompt."""

from __future__ import annotations

from ..family import register_family
from .unet import UNetFamily


@register_family
class StableDiffusion(UNetFamily):
    name = "StableDiffusionPipeline"
    encoders = ("text_encoder",)
    layout = "sd"

    def pipeline(self, model):
        import diffusers

        pe, den = model.prompt_encoder, model.denoiser
        return diffusers.StableDiffusionPipeline(
            vae=model.vae, text_encoder=pe.encoders[0], tokenizer=pe.tokenizers[0], unet=den.unet,
            scheduler=den.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
