"""Latent text-to-image models (Stable Diffusion 1.x / 2.x, SDXL and their fine-tunes, and cmkit's own tiny one) in
cmkit's sigma space.

``LatentDenoiser`` is the UNet2DConditionModel as a guided denoiser of latents ``z``:

    D_w(z, sigma) = D(z, sigma | negative) + w (D(z, sigma | prompt) - D(z, sigma | negative))

computed as one batched pass over ``[negative; prompt]`` (two network passes' worth of work, counted as two by
``passes``). Since x_0 is affine in the network output at fixed ``z``, guidance in x_0 equals diffusers' guidance in
epsilon or v. ``TextToImageModel`` adds the VAE and the prompt encoder and reads and writes diffusers pipeline
folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core import append_dims, as_batch_sigma
from ..core.files import atomic_dir
from .autoencoder import vae_decode, vae_encode
from .denoisers import DiffusersDenoiser
from .text_encoders import PromptEncoder


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of ``1000 w`` that guidance-embedding UNets (LCM's) take as ``timestep_cond`` (VDM's;
    diffusers' ``get_guidance_scale_embedding``): ``[sin(1000 w f_i), cos(1000 w f_i)]``,
    ``f_i = 10000^(-i / (dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = (w.float() * 1000.0)[:, None] * freqs.to(w.device)[None]
    emb = torch.cat([arg.sin(), arg.cos()], 1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class LatentDenoiser(DiffusersDenoiser):
    """A text-conditioned diffusers UNet (epsilon, v or sample prediction) over a VP scheduler's table, guided as
    diffusers' pipelines guide: classifier-free guidance when ``guidance_scale > 1`` and negatives are given (a
    per-sample tensor of scales always guides), the conditional prediction alone otherwise; a UNet with a guidance
    embedding (``time_cond_proj_dim``, LCM's) takes ``guidance_scale - 1`` through it instead, in one pass."""

    def __init__(self, unet: nn.Module, scheduler, prediction_type: str | None = None,
                 clip_x0: float | None = None):
        super().__init__(unet, scheduler, prediction_type, clip_x0)
        self.pipeline_parts = None  # (vae, prompt encoder, pipeline config): set when saving writes a whole pipeline

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.unet.config.get("time_cond_proj_dim"))

    def passes(self, negative_prompt_embeds=None, guidance_scale=1.0, **cond) -> int:
        """Network passes one call costs: 2 when guided (a batch of twice the size), else 1."""
        return 2 if self._guided(negative_prompt_embeds, guidance_scale) else 1

    def _guided(self, negative_prompt_embeds, guidance_scale) -> bool:
        if negative_prompt_embeds is None or self.embeds_guidance:
            return False
        return torch.is_tensor(guidance_scale) or float(guidance_scale) > 1.0

    def forward(self, z: torch.Tensor, sigma, prompt_embeds: torch.Tensor | None = None,
                negative_prompt_embeds: torch.Tensor | None = None, guidance_scale=1.0,
                pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, add_time_ids=None,
                timestep_cond=None) -> torch.Tensor:
        if prompt_embeds is None:
            raise ValueError("a text-to-image denoiser needs prompt_embeds=; encode prompts with "
                             "model.encode_prompt(prompts)")
        if prompt_embeds.shape[0] != z.shape[0]:
            raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings for a batch of {z.shape[0]} latents; give "
                             "one prompt per sample")
        sigma = as_batch_sigma(sigma, z)
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=z.device)
        w = w.expand(z.shape[0]) if w.ndim == 0 else w
        if self.embeds_guidance and timestep_cond is None:
            timestep_cond = guidance_embedding(w - 1, self.unet.config.time_cond_proj_dim)
        if not self._guided(negative_prompt_embeds, guidance_scale):
            return self._clip(self._denoise(z, sigma, prompt_embeds, pooled_prompt_embeds, add_time_ids,
                                            timestep_cond))
        if (pooled_prompt_embeds is None) != (negative_pooled_prompt_embeds is None):
            raise ValueError("guidance with pooled_prompt_embeds needs negative_pooled_prompt_embeds too")
        two = lambda a, b: None if b is None else torch.cat([a, b])  # noqa: E731
        x0_neg, x0_pos = self._denoise(
            torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([negative_prompt_embeds, prompt_embeds]),
            two(negative_pooled_prompt_embeds, pooled_prompt_embeds), two(add_time_ids, add_time_ids),
            two(timestep_cond, timestep_cond)).chunk(2)
        return self._clip(x0_neg + append_dims(w.to(z.dtype), z.ndim) * (x0_pos - x0_neg))

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 else x0

    def _denoise(self, z, sigma, embeds, pooled, time_ids, timestep_cond):
        s = append_dims(sigma, z.ndim)
        dt = self.unet.dtype
        at = lambda v: None if v is None else v.to(z.device, dt)  # noqa: E731  (encoders may differ in dtype)
        added = None
        if pooled is not None or time_ids is not None:
            if pooled is None or time_ids is None:
                raise ValueError("an SDXL UNet needs both pooled_prompt_embeds and add_time_ids")
            added = {"text_embeds": at(pooled), "time_ids": at(time_ids)}
        # timesteps in float32: half precision would round 999 to 1000
        out = self.unet((z / (1 + s**2).sqrt()).to(dt), self.sigma_to_t(sigma).float(),
                        encoder_hidden_states=at(embeds), added_cond_kwargs=added,
                        timestep_cond=at(timestep_cond)).sample
        return self.to_x0(z, s, out.to(z.dtype), clip=False)

    def save_pretrained(self, folder) -> Path:
        if self.pipeline_parts is None:
            raise ValueError("this denoiser has no VAE and text encoder to save a pipeline with; save the "
                             "TextToImageModel that holds it")
        vae, prompts, config = self.pipeline_parts
        return TextToImageModel(self, vae, prompts, config).save_pretrained(folder)


class LatentDenoiserView:
    """What a model built around a ``LatentDenoiser`` (``self.denoiser``) shows of it: the UNet, the scheduler, the
    noise range and the latent shape, so samplers and solvers treat the wrapper as the denoiser."""

    @property
    def unet(self) -> nn.Module:
        return self.denoiser.unet

    @property
    def scheduler(self):
        return self.denoiser.scheduler

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    @property
    def sigma_data(self) -> float:
        return self.denoiser.sigma_data

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape


class TextToImageModel(LatentDenoiserView, nn.Module):
    """A latent text-to-image model: ``denoiser`` (a ``LatentDenoiser``), ``vae`` and ``prompt_encoder``. Called as
    a denoiser of latents; ``encode_prompt`` / ``encode`` / ``decode`` are the rest of a pipeline.
    ``config``: ``{"pipeline": class name, "force_zeros_for_empty_prompt": ...}`` from ``model_index.json``."""

    def __init__(self, denoiser: LatentDenoiser, vae: nn.Module, prompt_encoder: PromptEncoder,
                 config: dict | None = None):
        super().__init__()
        self.denoiser, self.vae, self.prompt_encoder = denoiser, vae, prompt_encoder
        self.config = dict(config or {})
        self.config.setdefault("pipeline", "StableDiffusionXLPipeline" if prompt_encoder.xl
                               else "StableDiffusionPipeline")

    # --- the denoiser, as everything above sees it
    def forward(self, z, sigma, **cond):
        return self.denoiser(z, sigma, **cond)

    def passes(self, **cond) -> int:
        return self.denoiser.passes(**cond)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one decoded image: ``(3, H, W)``."""
        c, h, w = self.sample_shape
        return (self.vae.config.out_channels, h * self.vae_scale_factor, w * self.vae_scale_factor)

    # --- the rest of a pipeline
    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale: float = 1.0) -> dict:
        """The conditioning dict for ``prompts``: embeddings, negatives (``""`` by default) and the guidance
        scale."""
        return {**self.prompt_encoder(prompts, negative_prompts), "guidance_scale": guidance_scale}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean, scaled), in float32."""
        return vae_encode(self.vae, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], in float32."""
        return vae_decode(self.vae, latents)

    def save_pretrained(self, folder) -> Path:
        """A diffusers pipeline folder (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``)."""
        import diffusers

        folder = Path(folder)
        pe, den = self.prompt_encoder, self.denoiser
        if pe.xl:
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=pe.encoders[0], text_encoder_2=pe.encoders[1], tokenizer=pe.tokenizers[0],
                tokenizer_2=pe.tokenizers[1], unet=den.unet, scheduler=den.scheduler,
                force_zeros_for_empty_prompt=pe.force_zeros)
        else:
            pipe = diffusers.StableDiffusionPipeline(
                vae=self.vae, text_encoder=pe.encoders[0], tokenizer=pe.tokenizers[0], unet=den.unet,
                scheduler=den.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        with atomic_dir(folder) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return folder

    @classmethod
    def from_pretrained(cls, path: str, clip_x0: float | None = None, dtype: torch.dtype = torch.float32,
                        **load_kw) -> TextToImageModel:
        """A diffusers text-to-image pipeline folder or hub id (components read through their own
        ``from_pretrained``); the UNet and text encoders in ``dtype``, the VAE in float32. ``load_kw`` goes to
        every one of those calls (``local_files_only``, ``revision``)."""
        index = read_model_index(path, **load_kw)
        if index.get("_class_name") in UNSUPPORTED:
            raise ValueError(f"{path} is a {index['_class_name']} ({UNSUPPORTED[index['_class_name']]}); cmkit takes "
                             "text-to-image pipelines (StableDiffusionPipeline, StableDiffusionXLPipeline)")
        missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not _present(index, c)]
        if missing:
            raise ValueError(f"{path} is a pipeline without {', '.join(missing)}; a text-to-image teacher needs unet, "
                             "vae, text_encoder, tokenizer and scheduler (SDXL refiner layouts are not supported)")
        part = lambda name: _load_component(path, name, index[name], load_kw)  # noqa: E731
        xl = _present(index, "text_encoder_2")
        names = [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if xl else [])
        unet, vae = _in_dtype(part("unet"), dtype), _in_dtype(part("vae"), torch.float32)
        check_layout(path, unet, vae, xl)
        den = LatentDenoiser(unet, part("scheduler"), clip_x0=clip_x0)
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", xl))
        prompts = PromptEncoder([_in_dtype(part(e), dtype) for e, _ in names], [part(t) for _, t in names], force_zeros,
                                (size, size) if xl else None)
        config = {"pipeline": index.get("_class_name"), "force_zeros_for_empty_prompt": force_zeros}
        return cls(den, vae.eval(), prompts.eval(), config)


# pipelines with a text encoder that are not text-to-image denoisers of plain latents
UNSUPPORTED = {
    "StableDiffusionInpaintPipeline": "its UNet also takes a mask and masked-image latents",
    "StableDiffusionXLInpaintPipeline": "its UNet also takes a mask and masked-image latents",
    "StableDiffusionInstructPix2PixPipeline": "its UNet also takes image latents",
    "StableDiffusionUpscalePipeline": "its UNet takes a low-resolution image and a noise level",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
}


def _in_dtype(module, dtype):
    return module if module.dtype == dtype else module.to(dtype)


def check_layout(path, unet, vae, xl: bool) -> None:
    """One-line errors for UNet / VAE / layout combinations a text-to-image denoiser cannot run."""
    c = vae.config.latent_channels
    if unet.config.in_channels != c or unet.config.out_channels not in (c, 2 * c):
        raise ValueError(f"{path}: the UNet takes {unet.config.in_channels} channels and gives "
                         f"{unet.config.out_channels}, the VAE's latents have {c}; not a text-to-image layout cmkit "
                         "runs (inpainting and image-conditioned UNets are not supported)")
    if (unet.config.get("addition_embed_type") == "text_time") != xl:
        raise ValueError(f"{path}: the UNet {'expects' if not xl else 'lacks'} SDXL's pooled text embeddings and time "
                         f"ids but the folder {'has one' if not xl else 'has two'} text encoder"
                         f"{'' if not xl else 's'}; its components do not belong together")


def read_model_index(path, **load_kw) -> dict:
    local = Path(path) / "model_index.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{local} is not valid JSON") from None
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(path, **load_kw)


def _present(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` names a component (diffusers writes ``[null, null]`` for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and all(entry)


def is_text_to_image(index: dict) -> bool:
    return _present(index, "text_encoder") or _present(index, "text_encoder_2")


def _load_component(path: str, name: str, entry, load_kw: dict):
    import importlib

    library, class_name = entry
    if library not in ("diffusers", "transformers"):
        raise ValueError(f"{path}: component {name} comes from {library!r}; cmkit reads diffusers and transformers "
                         "components only")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ValueError(f"{path}: unknown {library} class {class_name!r} for {name}/")
    return cls.from_pretrained(path, subfolder=name, **load_kw)
