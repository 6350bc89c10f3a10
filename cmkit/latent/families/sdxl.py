"""SDXL (``StableDiffusionXLPipeline``): two CLIP encoders (penultimate hidden states concatenated, the second's
pooled projection), six time ids, zeros as the unconditional embedding where the folder asks for it."""

from __future__ import annotations

from ..family import register_family
from .unet import UNetFamily


@register_family
class StableDiffusionXL(UNetFamily):
    name = "StableDiffusionXLPipeline"
    encoders = ("text_encoder", "text_encoder_2")
    layout = "sdxl"
    xl = True

    def pipeline(self, model):
        import diffusers

        pe, den = model.prompt_encoder, model.denoiser
        return diffusers.StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=pe.encoders[0], text_encoder_2=pe.encoders[1], tokenizer=pe.tokenizers[0],
            tokenizer_2=pe.tokenizers[1], unet=den.unet, scheduler=den.scheduler,
            force_zeros_for_empty_prompt=pe.force_zeros)
