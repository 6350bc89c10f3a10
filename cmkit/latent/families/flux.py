"""Flux.1 (``FluxPipeline``, dev and schnell): a ``FluxTransformer2DModel`` over 2x2-packed latents with image and
text position ids, predicting the flow velocity at time t; prompts encoded as the pipeline encodes them (T5's last
hidden state, ``max_sequence_length`` tokens, and the CLIP encoder's pooled output); dev's guidance embedding takes
the guidance scale itself in one pass (schnell has none); the scheduler's resolution-dependent ``mu`` shift over
``linspace(1, 1/N, N)``. Negative prompts (the pipeline's "true CFG") are used only where given."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..builders import flow_vae, small_t5_encoder
from ..components import in_dtype, load_parts, present
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import build_tokenizer, negatives_for, prompt_list, small_text_encoder, tokenize
from .flow import FlowDenoiser, FlowFamily

PIPELINE = "FluxPipeline"


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of height ``h`` and width ``w``."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def packed_noise(like: torch.Tensor) -> torch.Tensor:
    """Unit noise of ``like``'s shape drawn as packed tokens (the order a scheduler stepping packed latents draws
    it), then unpacked."""
    return unpack(torch.randn(pack(like).shape, dtype=like.dtype, device=like.device), *like.shape[-2:])


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxDenoiser(FlowDenoiser):
    timestep_scale = 1.0  # the transformer multiplies t by 1000 itself

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def _velocity(self, x_t, timestep, w, cond):
        _, _, h, w_ = x_t.shape
        embeds = cond["prompt_embeds"]
        out = self.transformer(
            hidden_states=pack(x_t), timestep=timestep, guidance=w.float() if self.embeds_guidance else None,
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h, w_, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack(out, h, w_)


class FluxPromptEncoder(nn.Module):
    """Prompts -> Flux's conditioning. ``encoders`` / ``tokenizers``: CLIP (pooled output), then T5."""

    pipeline = PIPELINE

    def __init__(self, encoders: list, tokenizers: list, max_sequence_length: int = 512):
        super().__init__()
        self.encoders, self.tokenizers = nn.ModuleList(encoders), list(tokenizers)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def settings(self) -> tuple:
        return (self.pipeline, self.max_sequence_length)

    def _embed(self, texts):
        clip, t5 = self.encoders
        ids = tokenize(self.tokenizers[0], texts, self.tokenizers[0].model_max_length).input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output.to(clip.dtype)
        embeds = t5(tokenize(self.tokenizers[1], texts, self.max_sequence_length).input_ids.to(self.device),
                    output_hidden_states=False)[0].to(t5.dtype)
        return embeds, pooled

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        embeds, pooled = self._embed(prompts)
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if negative_prompts is not None:
            neg, neg_pooled = self._embed(negatives_for(prompts, negative_prompts))
            cond.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return cond


@register_family
class Flux(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder", "text_encoder_2")

    def load(self, path, index, dtype, clip_x0, load_kw):
        needed = ["transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        missing = [c for c in needed if not present(index, c)]
        if "text_encoder_2" in missing or "tokenizer_2" in missing:
            raise ValueError(f"{path} is a Flux folder without its T5 encoder (text_encoder_2 / tokenizer_2): Flux's "
                             "prompt embedding is T5's; download the folder with text_encoder_2 and tokenizer_2")
        if missing:
            raise ValueError(f"{path} is a Flux folder without {', '.join(missing)}; it needs {', '.join(needed)}")
        p = load_parts(path, index, needed, load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if tr.config.in_channels != 4 * vae.config.latent_channels:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} packed channels, 4x the VAE's "
                             f"{vae.config.latent_channels} latent channels would be {4 * vae.config.latent_channels}")
        prompts = FluxPromptEncoder([in_dtype(p[e], dtype) for e in self.encoders], [p["tokenizer"], p["tokenizer_2"]])
        return TextToImageModel(FluxDenoiser(tr, sched, clip_x0), vae.eval(), prompts.eval(),
                                {"pipeline": self.name})

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.FluxPipeline(transformer=model.network, scheduler=model.scheduler, vae=model.vae,
                                      text_encoder=pe.encoders[0], tokenizer=pe.tokenizers[0],
                                      text_encoder_2=pe.encoders[1], tokenizer_2=pe.tokenizers[1])

    def default_image_size(self, model) -> int:
        return 128 * model.vae_scale_factor  # the pipeline's default_sample_size

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        f = model.vae_scale_factor
        return patched_shape(int(model.network.config.in_channels) // 4, height, width, f, 2,
                             f"the VAE's factor {f} times Flux's 2x2 packing")

    def max_sequence_length(self, model) -> int | None:
        return 512  # FluxPipeline's check_inputs

    def pipeline_latents(self, model, latents):
        return pack(latents)

    def fresh_noise(self, model, like):
        return packed_noise(like)

    def set_timesteps_kwargs(self, model, steps: int) -> dict:
        if model.scheduler.config.get("use_flow_sigmas"):
            return {"num_inference_steps": steps}
        return {"num_inference_steps": steps, "sigmas": np.linspace(1.0, 1 / steps, steps)}

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        return (h // 2) * (w // 2)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_flux_pipeline(texts, seed=seed, image_size=image_size, pipeline=self.name)


def tiny_flux_pipeline(texts: list[str] | None = None, guidance: bool = True, seed: int = 0, image_size: int = 32,
                       max_sequence_length: int = 16, pipeline: str = PIPELINE) -> TextToImageModel:
    """A randomly initialised ``FluxPipeline`` model (dev with ``guidance``, else schnell): a CLIP encoder, a small
    T5, a ``FluxTransformer2DModel`` over 2x2-packed image / 4 latents, the dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

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
    model = TextToImageModel(FluxDenoiser(tr, sched), flow_vae(image_size, 4, seed + 3, 0.1),
                             FluxPromptEncoder(encs, toks, max_sequence_length).eval(), {"pipeline": pipeline})
    model.image_size = image_size
    return model
