"""Small latent text-to-image parts built from configs (the UNet2DConditionModel of cmkit's tiny teacher, a small
T5, SD3 transformer and flow VAE), which the families' tiny stand-ins (``PipelineFamily.tiny``: what tests and
``--dry-run`` use in place of real checkpoints) are made of."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .autoencoder import small_vae


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


def small_t5_encoder(vocab_size: int, d_model: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    """A small ``T5EncoderModel``, randomly initialised from ``seed`` (pad id 1, as ``build_tokenizer`` makes it)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1,
                   decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(cfg).eval()


def small_sd3_transformer(sample_size: int = 8, channels: int = 4, layers: int = 2, heads: int = 2,
                          head_dim: int = 16, joint_attention_dim: int = 64, pooled_dim: int = 32, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=layers,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=32)


def flow_vae(image_size: int, channels: int, seed: int, shift: float):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = small_vae(image_size, (16, 16, 16), latent_channels=channels, norm_num_groups=8)
    vae.register_to_config(scaling_factor=0.5, shift_factor=shift)
    return vae.eval()
