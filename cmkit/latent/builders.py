"""Small latent text-to-image parts built from configs: the UNet2DConditionModel of cmkit's tiny teacher, and whole
randomly initialised pipelines in the SD and SDXL layouts (what tests and ``--dry-run`` stand in for real
checkpoints with; they are read and written through the same diffusers folders)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .autoencoder import small_vae
from .denoiser import LatentDenoiser, TextToImageModel
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


def _flow_vae(image_size: int, channels: int, seed: int, shift: float):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = small_vae(image_size, (16, 16, 16), latent_channels=channels, norm_num_groups=8)
    vae.register_to_config(scaling_factor=0.5, shift_factor=shift)
    return vae.eval()


def tiny_sd3_pipeline(texts: list[str] | None = None, t5: bool = False, seed: int = 0, image_size: int = 32,
                      shift: float = 3.0, max_sequence_length: int = 16) -> TextToImageModel:
    """A randomly initialised ``StableDiffusion3Pipeline`` model: two CLIP encoders with projection (widths 32),
    optionally a small T5, an ``SD3Transformer2DModel`` over image / 4 latents, ``FlowMatchEulerDiscreteScheduler``
    with ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .families.sd3 import SD3Denoiser, SD3PromptEncoder

    texts = texts or ["a red sneaker", "a green bag", "a blue dress", "a photo of a cat"]
    toks = [build_tokenizer(texts, max_length=12) for _ in range(3 if t5 else 2)]
    encs = [small_text_encoder(len(toks[i]), hidden=32, max_length=12, projection_dim=16, seed=seed + i)
            for i in range(2)]
    encs.append(small_t5_encoder(len(toks[2]), 64, seed=seed + 2) if t5 else None)
    toks += [] if t5 else [None]
    tr = small_sd3_transformer(image_size // 4, joint_attention_dim=64, pooled_dim=32, seed=seed + 3)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    prompts = SD3PromptEncoder(encs, toks, 64, max_sequence_length)
    return TextToImageModel(SD3Denoiser(tr, sched), _flow_vae(image_size, 4, seed + 4, 0.1), prompts.eval(),
                            {"pipeline": "StableDiffusion3Pipeline"})


def tiny_flux_pipeline(texts: list[str] | None = None, guidance: bool = True, seed: int = 0, image_size: int = 32,
                       max_sequence_length: int = 16) -> TextToImageModel:
    """A randomly initialised ``FluxPipeline`` model (dev with ``guidance``, else schnell): a CLIP encoder, a small
    T5, a ``FluxTransformer2DModel`` over 2x2-packed image / 4 latents, the dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from .families.flux import FluxDenoiser, FluxPromptEncoder

    texts = texts or ["a red sneaker", "a green bag", "a blue dress", "a photo of a cat"]
    toks = [build_tokenizer(texts, max_length=12) for _ in range(2)]
    encs = [small_text_encoder(len(toks[0]), hidden=32, max_length=12, seed=seed),
            small_t5_encoder(len(toks[1]), 32, seed=seed + 1)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    model = TextToImageModel(FluxDenoiser(tr, sched), _flow_vae(image_size, 4, seed + 3, 0.1),
                             FluxPromptEncoder(encs, toks, max_sequence_length).eval(), {"pipeline": "FluxPipeline"})
    model.image_size = image_size
    return model


def sd3_text_side(bpe: dict, hidden: int = 64, layers: int = 2, heads: int = 4, max_length: int = 8,
                  projection_dim: int = 32, max_sequence_length: int = 256, seed: int = 0):
    """SD3's text side for a small model: two seeded-and-frozen CLIP encoders with projection over one learnt
    tokenizer, no T5 (the pipeline pads with ``max_sequence_length`` zero tokens); the joint attention width is the
    two encoders' widths together."""
    from .families.sd3 import SD3PromptEncoder
    from .text_encoders import clip_tokenizer

    toks = [clip_tokenizer(bpe, max_length=max_length) for _ in range(2)]
    encs = [small_text_encoder(len(toks[i]), hidden, layers, heads, max_length, projection_dim, seed=seed + i)
            .requires_grad_(False) for i in range(2)]
    return SD3PromptEncoder([*encs, None], [*toks, None], 2 * hidden, max_sequence_length).eval()


def tiny_of_class(pipeline: str, texts: list[str] | None = None, image_size: int = 32, seed: int = 0):
    """A tiny random model of a pipeline class (``"any"``: SD3), as dry runs stand it in for weights not here."""
    build = {"StableDiffusionPipeline": lambda: tiny_pipeline("sd", texts=texts, seed=seed, image_size=image_size),
             "StableDiffusionXLPipeline": lambda: tiny_pipeline("sdxl", texts=texts, seed=seed, image_size=image_size),
             "StableDiffusion3Pipeline": lambda: tiny_sd3_pipeline(texts, seed=seed, image_size=image_size),
             "any": lambda: tiny_sd3_pipeline(texts, seed=seed, image_size=image_size),
             "FluxPipeline": lambda: tiny_flux_pipeline(texts, seed=seed, image_size=image_size)}
    if pipeline not in build:
        raise ValueError(f"no tiny stand-in for pipeline class {pipeline!r} (known: {', '.join(build)})")
    return build[pipeline]()
