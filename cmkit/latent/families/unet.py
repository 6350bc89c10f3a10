"""What the Stable Diffusion UNet families (SD 1.x / 2.x and SDXL) share: the UNet as a guided denoiser in sigma
space (``LatentDenoiser``), CLIP prompt encoding exactly as their pipelines encode (``PromptEncoder``), reading such
a folder and the checks that its parts belong together, the grid of its scheduler's discrete timesteps, and a tiny
random stand-in of either layout (``tiny_pipeline``)."""

from __future__ import annotations

import torch
from torch import nn

from ...core import append_dims
from ...models.denoisers import DiffusersDenoiser
from ..autoencoder import small_vae
from ..builders import small_cond_unet
from ..components import in_dtype, load_parts, present
from ..denoiser import GuidedDenoiser, TextToImageModel, guidance_embedding, time_dtype
from ..family import PipelineFamily, patched_shape
from ..text_encoders import build_tokenizer, negatives_for, prompt_list, small_text_encoder, tokenize

SPACINGS = ("leading", "trailing", "linspace")


class LatentDenoiser(GuidedDenoiser, DiffusersDenoiser):
    """A text-conditioned ``UNet2DConditionModel`` (SD 1.x / 2.x, SDXL: epsilon, v or sample prediction over a VP
    table) as a guided denoiser of latents. Since x_0 is affine in the network output at fixed ``z``, guidance in
    x_0 equals diffusers' guidance in epsilon or v. A UNet with a guidance embedding (``time_cond_proj_dim``, LCM's)
    takes ``guidance_scale - 1`` through it (the pipeline convention)."""

    def __init__(self, unet: nn.Module, scheduler, prediction_type: str | None = None,
                 clip_x0: float | None = None):
        DiffusersDenoiser.__init__(self, unet, scheduler, prediction_type, clip_x0)
        self.pipeline_parts = None  # (vae, prompt encoder, pipeline config): set when saving writes a whole pipeline

    @property
    def network(self) -> nn.Module:
        return self.unet

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.unet.config.get("time_cond_proj_dim"))

    forward = GuidedDenoiser.forward

    def _denoise(self, z, sigma, w, cond: dict) -> torch.Tensor:
        s = append_dims(sigma, z.ndim)
        dt = self.unet.dtype
        at = lambda v: None if v is None else v.to(z.device, dt)  # noqa: E731  (encoders may differ in dtype)
        pooled, time_ids = cond.get("pooled_prompt_embeds"), cond.get("add_time_ids")
        added = None
        if pooled is not None or time_ids is not None:
            if pooled is None or time_ids is None:
                raise ValueError("an SDXL UNet needs both pooled_prompt_embeds and add_time_ids")
            added = {"text_embeds": at(pooled), "time_ids": at(time_ids)}
        timestep_cond = cond.get("timestep_cond")
        if self.embeds_guidance and timestep_cond is None:
            timestep_cond = guidance_embedding(w - 1, self.unet.config.time_cond_proj_dim)
        # timesteps in float32: half precision would round 999 to 1000
        out = self.unet(self.schedule.to_native(z, s).to(dt), self.sigma_to_t(sigma).to(time_dtype(z)),
                        encoder_hidden_states=at(cond["prompt_embeds"]), added_cond_kwargs=added,
                        timestep_cond=at(timestep_cond)).sample
        return self.to_x0(z, s, out.to(z.dtype), clip=False)


class PromptEncoder(nn.Module):
    """Prompts -> the conditioning a latent denoiser takes. ``encoders`` / ``tokenizers``: one pair (SD) or two
    (SDXL, the second with a projection); ``image_size``: the pixel size SDXL's time ids describe."""

    def __init__(self, encoders: list[nn.Module], tokenizers: list, force_zeros_for_empty_prompt: bool = False,
                 image_size: tuple[int, int] | None = None):
        super().__init__()
        if len(encoders) != len(tokenizers) or len(encoders) not in (1, 2):
            raise ValueError("a prompt encoder takes one or two (tokenizer, text encoder) pairs")
        self.encoders = nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.force_zeros = force_zeros_for_empty_prompt
        self.image_size = image_size

    @property
    def xl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def pipeline(self) -> str:
        return "StableDiffusionXLPipeline" if self.xl else "StableDiffusionPipeline"

    def settings(self) -> tuple:
        """What besides the weights and tokenizers decides the embeddings (part of the latent cache's key)."""
        return (self.force_zeros, self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
            tokens = tokenize(tok, texts, tok.model_max_length)
            ids = tokens.input_ids.to(self.device)
            if not self.xl:
                # SD 2.x-style encoders that ask for it get the padding mask, as diffusers gives it
                wants = getattr(enc.config, "use_attention_mask", False)
                mask = tokens.attention_mask.to(self.device) if wants else None
                return enc(ids, attention_mask=mask)[0], None
            out = enc(ids, output_hidden_states=True)
            if out[0].ndim == 2 and pooled is None:  # the projected, pooled embedding (SDXL's second encoder)
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, -1), pooled

    @torch.no_grad()
    def forward(self, prompts: list[str] | str, negative_prompts: list[str] | str | None = None) -> dict:
        """``{"prompt_embeds", "negative_prompt_embeds"}`` (+ SDXL's pooled embeddings and ``add_time_ids``) for a
        batch of prompts; ``negative_prompts`` defaults to ``""`` (zeros for SDXL folders that ask for it)."""
        prompts = prompt_list(prompts)
        cond = {}
        cond["prompt_embeds"], pooled = self._embed(prompts)
        if self.xl and (pooled is None or self.image_size is None):
            raise ValueError("an SDXL prompt encoder needs a second encoder with a projection and image_size")
        if negative_prompts is None and self.xl and self.force_zeros:
            neg, neg_pooled = torch.zeros_like(cond["prompt_embeds"]), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._embed(negatives_for(prompts, negative_prompts))
        cond["negative_prompt_embeds"] = neg
        if self.xl:
            h, w = self.image_size
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond["prompt_embeds"].dtype, device=self.device)
            cond.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
                        add_time_ids=ids.expand(len(prompts), 6))
        return cond


class UNetFamily(PipelineFamily):
    """SD-style pipelines: a ``UNet2DConditionModel`` over a VP scheduler, CLIP text encoders, an ``AutoencoderKL``."""

    network = "unet"
    # LCM-LoRA's: attention, feed-forward, resnet convolutions and time projections
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
    student = "lcm"
    xl = False
    lora_layouts = ("diffusers", "kohya")

    def lora_state(self, model, state: dict, config, layout: str) -> dict:
        if layout != "kohya":
            return super().lora_state(model, state, config, layout)
        import torch
        from diffusers.utils import convert_state_dict_to_kohya

        out = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        # diffusers writes alpha = rank (a scale of 1); the adapter's own scale is lora_alpha / r
        return {k: torch.tensor(float(config.lora_alpha)) if k.endswith(".alpha") else v for k, v in out.items()}

    def load(self, path, index, dtype, clip_x0, load_kw):
        pairs = [(e, e.replace("text_encoder", "tokenizer")) for e in self.encoders]
        needed = ["unet", "vae", "scheduler", *[n for p in pairs for n in p]]
        missing = [c for c in needed if not present(index, c)]
        if missing:
            raise ValueError(f"{path} is a {self.name} folder without {', '.join(missing)}; a text-to-image "
                             f"teacher of this class needs {', '.join(needed)}")
        parts = load_parts(path, index, needed, load_kw)
        unet, vae = in_dtype(parts["unet"], dtype), in_dtype(parts["vae"], torch.float32)
        check_layout(path, unet, vae, self.xl)
        den = LatentDenoiser(unet, parts["scheduler"], clip_x0=clip_x0)
        size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", self.xl))
        prompts = PromptEncoder([in_dtype(parts[e], dtype) for e, _ in pairs], [parts[t] for _, t in pairs],
                                force_zeros, (size, size) if self.xl else None)
        config = {"pipeline": self.name, "force_zeros_for_empty_prompt": force_zeros}
        return TextToImageModel(den, vae.eval(), prompts.eval(), config)

    def default_image_size(self, model) -> int:
        return int(model.unet.config.sample_size) * model.vae_scale_factor

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        return patched_shape(model.unet.config.in_channels, height, width, model.vae_scale_factor)

    def resized(self, model) -> None:
        if self.xl:  # SDXL's time ids: original and target size, as the pipeline sets them from height / width
            model.prompt_encoder.image_size = (model.height, model.width)

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        return timestep_sigmas(model, steps, spacing)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_pipeline("sdxl" if self.xl else "sd", texts=texts, seed=seed, image_size=image_size,
                             pipeline=self.name)


def timestep_sigmas(model, steps: int, spacing: str | None = "trailing") -> list[float]:
    """The descending sigma grid of a ``steps``-step solve at the model's discrete timesteps, spaced as diffusers'
    ``timestep_spacing`` does ("trailing": the first step starts at the last training timestep, the right choice
    for few steps), ending at 0.

    ``None`` follows the model's own scheduler config as ``StableDiffusionPipeline`` runs it with ``DDIMScheduler``
    (which sets ``steps_offset=1``), ending where that DDIM ends (sigma 0 with ``set_alpha_to_one``, else the first
    table entry). That is step for step diffusers' DDIM whenever each step lands on the next listed timestep, as with
    "leading" spacing (SD's and SDXL's); diffusers' DDIM steps from t to ``t - T // steps`` whatever the spacing, so
    for "trailing" or "linspace" with ``T % steps != 0`` it is not a grid at all.
    """
    from diffusers import DDIMScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)} or None (the folder's)")
    over = {"timestep_spacing": spacing} if spacing is not None else {"steps_offset": 1}
    sched = DDIMScheduler.from_config(model.scheduler.config, **over)
    sched.set_timesteps(int(steps))
    sig = model.denoiser.t_to_sigma(sched.timesteps.to(torch.float64)).tolist()
    final = model.sigma_min if spacing is None and not sched.config.set_alpha_to_one else 0.0
    # a last timestep of 0 then ends where it starts: diffusers' final step there is the identity
    return sig + [final] if final < sig[-1] else sig


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


def tiny_pipeline(layout: str = "sd", prediction_type: str = "epsilon", texts: list[str] | None = None,
                  seed: int = 0, image_size: int = 32, pipeline: str | None = None) -> TextToImageModel:
    """A randomly initialised text-to-image model of the given ``layout`` ("sd" or "sdxl"): a 3-level VAE (image
    / 4 latents), CLIP encoders with a tokenizer learnt over ``texts``, a 2-level UNet and a ``DDIMScheduler``
    (SD's scaled-linear betas, ``steps_offset=1``); ``pipeline``: its class (default the layout's)."""
    from diffusers import DDIMScheduler

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
                            {"force_zeros_for_empty_prompt": xl, **({"pipeline": pipeline} if pipeline else {})})
