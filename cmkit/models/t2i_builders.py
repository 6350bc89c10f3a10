"""Small latent text-to-image parts built from configs: the UNet2DConditionModel of cmkit's tiny teacher, and whole
randomly initialised pipelines in the SD and SDXL layouts (what tests and ``--dry-run`` stand in for real
checkpoints with; they are read and written through the same diffusers folders)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .autoencoder import small_vae
from .latent import LatentDenoiser, TextToImageModel
from .text_encoders import PromptEncoder, build_tokenizer, small_text_encoder


def small_cond_unet(sample_size: int = 8, channels: int = 4, base: int = 32, levels: int = 2,
                    layers_per_block: int = 1, cross_attention_dim: int = 32, heads: int = 4,
                    pooled_dim: int | None = None, time_ids_dim: int = 8, time_cond_proj_dim: int | None = None,
                    norm_num_groups: int = 8, seed: int = 0) -> UNet2DConditionModel:
    """A small ``UNet2DConditionModel``: ``levels`` resolutions with ``base * 2^i`` channels, cross-attention at
    every level but the first (and in the middle). ``pooled_dim``: the SDXL layout (text-time additional embedding
    of a pooled text embedding of that size and six time ids)."""
    if levels < 2:
        raise ValueError(f"the text-conditioned UNet needs levels >= 2, got {levels}")
    chans = tuple(base * 2**i for i in range(levels))
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    xl = {}
    if pooled_dim:
        xl = dict(addition_embed_type="text_time", addition_time_embed_dim=time_ids_dim,
                  projection_class_embeddings_input_dim=pooled_dim + 6 * time_ids_dim, use_linear_projection=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=chans,
            down_block_types=down, up_block_types=up, layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=norm_num_groups,
            time_cond_proj_dim=time_cond_proj_dim, **xl)


def tiny_pipeline(layout: str = "sd", prediction_type: str = "epsilon", texts: list[str] | None = None,
                  seed: int = 0, image_size: int = 32) -> TextToImageModel:
    """A randomly initialised text-to-image model of the given ``layout`` ("sd" or "sdxl"): a 3-level VAE (image
    / 4 latents), CLIP encoders with a tokenizer learnt over ``texts``, a 2-level UNet and a ``DDIMScheduler``
    (SD's scaled-linear betas, ``steps_offset=1``)."""
    if layout not in ("sd", "sdxl"):
        raise ValueError(f"layout must be 'sd' or 'sdxl', got {layout!r}")
    texts = texts or ["a red sneaker", "a green bag", "a blue dress", "a photo of a cat"]
    tokenizers, encoders = [build_tokenizer(texts, max_length=12)], []
    if layout == "sd":
        encoders.append(small_text_encoder(len(tokenizers[0]), hidden=32, max_length=12, seed=seed))
        unet = small_cond_unet(image_size // 4, cross_attention_dim=32, seed=seed + 1)
    else:
        tokenizers.append(build_tokenizer(texts, max_length=12))
        encoders.append(small_text_encoder(len(tokenizers[0]), hidden=32, max_length=12, seed=seed))
        encoders.append(small_text_encoder(len(tokenizers[1]), hidden=32, max_length=12, projection_dim=16,
                                           seed=seed + 2))
        unet = small_cond_unet(image_size // 4, cross_attention_dim=64, pooled_dim=16, seed=seed + 1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        vae = small_vae(image_size, (16, 16, 16), norm_num_groups=8)
    vae.register_to_config(scaling_factor=0.5)
    xl = layout == "sdxl"
    prompts = PromptEncoder(encoders, tokenizers, force_zeros_for_empty_prompt=xl,
                            image_size=(image_size, image_size) if xl else None)
    return TextToImageModel(LatentDenoiser(unet, scheduler), vae.eval(), prompts.eval(),
                            {"force_zeros_for_empty_prompt": xl})
