"""Latent text-to-image models in cmkit's sigma space: the guidance every family shares (``GuidedDenoiser``:
classifier-free guidance as one batched pass, or a guidance embedding; each family's denoiser builds on it), and
``TextToImageModel``, which adds the VAE and the prompt
encoder and reads and writes diffusers pipeline folders through its family's adapter (``family.py``).

    D_w(z, sigma) = D(z, sigma | negative) + w (D(z, sigma | prompt) - D(z, sigma | negative))

is computed as one batched pass over ``[negative; prompt]`` (two network passes' worth of work, counted as two by
``passes``). Since x_0 is affine in the network output at fixed ``z``, guidance in x_0 equals diffusers' guidance in
epsilon, v or velocity.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
from pathlib import Path

import torch
from torch import nn

from ..core import append_dims, as_batch_sigma
from ..core.assets import hub_load_kw, looks_like_hub_id, resolve
from ..core.files import atomic_dir
from .autoencoder import vae_decode, vae_encode
from .components import UNSUPPORTED, is_text_to_image, read_model_index
from .family import FAMILIES, family_of


def time_dtype(z: torch.Tensor) -> torch.dtype:
    """The dtype a network's time input is passed in: float32, as the pipelines pass it, or float64 in a float64 run."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of ``1000 w`` that guidance-embedding UNets (LCM's) take as ``timestep_cond`` (VDM's;
    diffusers' ``get_guidance_scale_embedding``): ``[sin(1000 w f_i), cos(1000 w f_i)]``,
    ``f_i = 10000^(-i / (dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    arg = (w.float() * 1000.0)[:, None] * freqs.to(w.device)[None]
    emb = torch.cat([arg.sin(), arg.cos()], 1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class GuidedDenoiser:
    """Classifier-free guidance for a denoiser of latents, as diffusers' pipelines guide: when
    ``guidance_scale > 1`` and negatives are given (a per-sample tensor of scales always guides),
    ``D_w = D(neg) + w (D(pos) - D(neg))`` as one batched pass over ``[negative; prompt]``; the conditional
    prediction alone otherwise; a network that embeds guidance (``embeds_guidance``: LCM's ``time_cond_proj_dim``,
    Flux-dev's guidance embedding) takes ``w`` through its embedding instead, in one pass.

    The conditioning is a dict of batched tensors: each key ``k`` with a ``negative_k`` beside it takes the
    negative in the unconditional half; the rest (SDXL's time ids) are shared. A family's ``_denoise(z, sigma, w,
    cond)`` makes the network call in sigma space."""

    clip_x0: float | None = None
    pipeline_parts = None  # (vae, prompt encoder, pipeline config): set when saving writes a whole pipeline

    @property
    def embeds_guidance(self) -> bool:
        return False

    def guide_with(self, **options) -> None:
        """Set the pipeline's own guidance options (Z-Image's ``cfg_normalization`` / ``cfg_truncation``, a two-expert
        model's second scale), each an attribute of this denoiser; a family whose pipeline has some overrides this
        to check and set them. Here: none, and a one-line error naming the option given."""
        for name in options:
            raise ValueError(f"a {type(self).__name__} has no guidance option {name!r} (its pipeline guides with "
                             "guidance_scale alone); leave it out")

    def passes(self, negative_prompt_embeds=None, guidance_scale=1.0, **cond) -> int:
        """Network passes one call costs: 2 when guided (a batch of twice the size), else 1."""
        return 2 if self._guided(negative_prompt_embeds, guidance_scale) else 1

    def _guided(self, negative_prompt_embeds, guidance_scale) -> bool:
        if negative_prompt_embeds is None or self.embeds_guidance:
            return False
        return torch.is_tensor(guidance_scale) or float(guidance_scale) > 1.0

    def forward(self, z: torch.Tensor, sigma, guidance_scale=1.0, **cond) -> torch.Tensor:
        embeds = cond.get("prompt_embeds")
        if embeds is None:
            raise ValueError("a text-to-image denoiser needs prompt_embeds=; encode prompts with "
                             "model.encode_prompt(prompts)")
        if embeds.shape[0] != z.shape[0]:
            raise ValueError(f"{embeds.shape[0]} prompt embeddings for a batch of {z.shape[0]} latents; give "
                             "one prompt per sample")
        sigma = as_batch_sigma(sigma, z)
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=z.device)
        w = w.expand(z.shape[0]) if w.ndim == 0 else w
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_") and v is not None}
        if not self._guided(cond.get("negative_prompt_embeds"), guidance_scale):
            return self._clip(self._denoise(z, sigma, w, pos))
        missing = [k for k in pos if k.endswith("embeds") and cond.get("negative_" + k) is None]
        if missing:
            raise ValueError(f"guidance with {missing[0]} needs negative_{missing[0]} too")
        both = {k: torch.cat([cond.get("negative_" + k, v), v]) for k, v in pos.items()}
        x0_neg, x0_pos = self._denoise(torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([w, w]),
                                       both).chunk(2)
        return self._clip(self._combine(z, sigma, x0_neg, x0_pos, w))

    def _combine(self, z, sigma, x0_neg, x0_pos, w) -> torch.Tensor:
        """The guided prediction from the unconditional and conditional ones (batched ``sigma`` and ``w``):
        ``x0_neg + w (x0_pos - x0_neg)``, diffusers' guidance in any parameterisation affine in x0. A family whose
        pipeline guides otherwise (a norm rescale of the guided velocity, guidance switched off below a time)
        overrides this."""
        return x0_neg + append_dims(w.to(z.dtype), z.ndim) * (x0_pos - x0_neg)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 else x0

    def _denoise(self, z, sigma, w, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def save_pretrained(self, folder) -> Path:
        if self.pipeline_parts is None:
            raise ValueError("this denoiser has no VAE and text encoder to save a pipeline with; save the "
                             "TextToImageModel that holds it")
        vae, prompts, config = self.pipeline_parts
        return TextToImageModel(self, vae, prompts, config).save_pretrained(folder)


# A pipeline folder cmkit trained at a size or prompt length other than its pipeline's defaults (a tiny video
# teacher's 9 frames of 32x32 at 32 prompt tokens where WanPipeline defaults to 81 of 480x832 at 512) says so here,
# so cmkit samples it as trained; the pipeline itself reads nothing of it (pass height / width / num_frames /
# max_sequence_length to it).
SIZE_FILE = "sample_size.json"


def _restore_sample_size(path, model) -> None:
    from ..core.checks import positive_int

    where = Path(str(path)) / SIZE_FILE
    if not where.is_file():
        return
    fix = "delete the file to sample at the pipeline's defaults"
    try:
        size = json.loads(where.read_text())
        h, w = (positive_int(size.get(k, d), f"{where}: {k}", fix) for k, d in (("height", model.height),
                                                                               ("width", model.width)))
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{where} is not a sample size ({type(e).__name__}); write {{\"height\": H, \"width\": W}} "
                         "(\"num_frames\", \"max_sequence_length\" where they differ from the pipeline's) or delete "
                         "it") from None
    frames = size.get("num_frames")
    model.resize(h, w, None if frames is None else positive_int(frames, f"{where}: num_frames", fix))
    if size.get("max_sequence_length") is not None:
        model.max_sequence_length = positive_int(size["max_sequence_length"], f"{where}: max_sequence_length", fix)


def delegate(path: str) -> property:
    """A read-only attribute that is another object's (``delegate("denoiser.unet")``): how a wrapper shows the
    parts it holds."""
    get = operator.attrgetter(path)
    return property(lambda self: get(self), doc=f"``self.{path}``")


class LatentDenoiserView:
    """What a model built around a latent denoiser (``self.denoiser``) shows of it: the network, the scheduler and
    its noise schedule, the noise range and the latent shape, so samplers and solvers treat the wrapper as the
    denoiser."""

    unet = delegate("denoiser.unet")
    network = delegate("denoiser.network")
    scheduler = delegate("denoiser.scheduler")
    schedule = delegate("denoiser.schedule")
    sigma_min = delegate("denoiser.sigma_min")
    sigma_max = delegate("denoiser.sigma_max")
    sigma_data = delegate("denoiser.sigma_data")
    prediction_type = delegate("denoiser.prediction_type")
    sample_shape = delegate("denoiser.sample_shape")


class TextToImageModel(LatentDenoiserView, nn.Module):
    """A latent text-to-image model: ``denoiser`` (a guided denoiser of latents in sigma space), ``vae`` and
    ``prompt_encoder``, read and written as a diffusers pipeline folder of its family's class (``family``, by
    ``config["pipeline"]``). Called as a denoiser of latents; ``encode_prompt`` / ``encode`` / ``decode`` are the
    rest of a pipeline. ``height`` / ``width``: the pixel size it samples (the family's default, e.g. the UNet's
    ``sample_size`` times the VAE's factor; ``resize`` or ``sampling_at`` for another size where the network takes
    it)."""

    kind = "teacher"  # how it samples (cmkit.sampling.kinds): a guided PF-ODE solve over its pipeline's grid

    def __init__(self, denoiser, vae: nn.Module, prompt_encoder, config: dict | None = None):
        super().__init__()
        self.denoiser, self.vae, self.prompt_encoder = denoiser, vae, prompt_encoder
        self.config = dict(config or {})
        self.config.setdefault("pipeline", prompt_encoder.pipeline)
        self.family = family_of(self.config["pipeline"])
        size = self.config.get("image_size")
        self._size = (int(size), int(size)) if size else None
        if self.config.get("height"):  # a non-square size to sample at
            self._size = (int(self.config["height"]), int(self.config["width"]))
        frames = self.config.get("num_frames")
        self._frames = int(frames) if frames else None  # a video model's frame count: the family's default until resize

    # --- the denoiser, as everything above sees it
    def forward(self, z, sigma, **cond):
        return self.denoiser(z, sigma, **cond)

    def passes(self, **cond) -> int:
        return self.denoiser.passes(**cond)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def height(self) -> int:
        return int(self._size[0] if self._size else self.family.default_image_size(self))

    @property
    def width(self) -> int:
        return int(self._size[1] if self._size else self.family.default_image_size(self))

    @property
    def num_frames(self) -> int | None:
        """A video model's frame count (the family's default until ``resize``); None for an image model."""
        return self._frames if self._frames is not None else self.family.default_num_frames(self)

    def resize(self, height: int, width: int | None = None, num_frames: int | None = None) -> None:
        """Sample ``height`` x ``width`` images (a video model: of ``num_frames`` frames) from now on (``width``
        defaults to ``height``): a one-line error where the family's patching cannot take it; conditioning that
        describes the size (SDXL's time ids) and a resolution-dependent shift (Flux's ``mu``) follow."""
        width = height if width is None else width
        frames = self._frames
        if num_frames is not None:
            if self.family.default_num_frames(self) is None:
                raise ValueError(f"a {self.family.name} makes images, not videos; leave num_frames out")
            from ..core.checks import positive_int

            self._frames = positive_int(num_frames, "num_frames")
        try:
            self.family.latent_shape(self, height, width)
        except ValueError:
            self._frames = frames
            raise
        self._size = (int(height), int(width))
        self.family.resized(self)

    @property
    def image_size(self) -> int:
        """The side of the square images it samples (the family's default until ``resize``)."""
        if self.height != self.width:
            raise ValueError(f"this model samples {self.height}x{self.width} images, not squares; read .height and "
                             ".width")
        return self.height

    @image_size.setter
    def image_size(self, size: int) -> None:
        self.resize(size, size)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape(self, self.height, self.width)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one decoded image, ``(3, H, W)``, or video, ``(3, F, H, W)``."""
        frames = () if self.num_frames is None else (self.num_frames,)
        return (self.vae.config.out_channels, *frames, self.height, self.width)

    @property
    def max_sequence_length(self) -> int | None:
        """The prompt tokens its encoder is asked for (the pipelines' ``max_sequence_length``), where it has one."""
        n = getattr(self.prompt_encoder, "max_sequence_length", None)
        return None if self.family.max_sequence_length(self) is None else n

    @max_sequence_length.setter
    def max_sequence_length(self, n: int) -> None:
        from ..core.checks import positive_int

        top = self.family.max_sequence_length(self)
        if top is None:
            raise ValueError(f"a {self.family.name} takes no max_sequence_length (its CLIP encoders read "
                             "77 tokens); leave it out")
        n = positive_int(n, "max_sequence_length")
        if n > top:
            raise ValueError(f"max_sequence_length {n} is beyond what a {self.family.name}'s encoder takes ({top}); "
                             f"use at most {top}")
        self.prompt_encoder.max_sequence_length = n

    @contextlib.contextmanager
    def sampling_at(self, height: int | None = None, width: int | None = None,
                    max_sequence_length: int | None = None, num_frames: int | None = None):
        """Within the block, sample ``height`` x ``width`` images (either alone keeps the other side; a video model:
        ``num_frames`` frames) with prompts encoded at ``max_sequence_length`` tokens, as a pipeline call with those
        arguments; restored after."""
        size, frames, n = self._size, self._frames, getattr(self.prompt_encoder, "max_sequence_length", None)
        try:
            if height is not None or width is not None or num_frames is not None:
                self.resize(self.height if height is None else height, self.width if width is None else width,
                            num_frames)
            if max_sequence_length is not None:
                self.max_sequence_length = max_sequence_length
            yield self
        finally:
            self._size, self._frames = size, frames
            self.family.resized(self)
            if n is not None:
                self.prompt_encoder.max_sequence_length = n

    # --- the rest of a pipeline
    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale: float = 1.0) -> dict:
        """The conditioning dict for ``prompts``: embeddings, negatives (the family's default unconditional
        prompt) and the guidance scale."""
        return {**self.prompt_encoder(prompts, negative_prompts), "guidance_scale": guidance_scale}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean, scaled), in float32."""
        return vae_encode(self.vae, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], in float32."""
        return vae_decode(self.vae, latents)

    def grid(self, steps: int, spacing: str | None = None) -> list[float]:
        """The descending sigma grid of a ``steps``-step solve; ``spacing=None``: as the folder's pipeline runs."""
        return self.family.grid(self, int(steps), spacing)

    def save_pretrained(self, folder, record_size: bool | None = None) -> Path:
        """A diffusers pipeline folder of this model's class (``StableDiffusionPipeline``, ...XLPipeline,
        ``StableDiffusion3Pipeline``, ``FluxPipeline``). ``record_size`` (default: the model's config
        ``"sample_size"``, which a teacher cmkit trains sets): write ``SIZE_FILE`` with its size, frame count and
        prompt length where they are not the pipeline's defaults, so cmkit samples the folder at them."""
        folder = Path(folder)
        record = self.config.get("sample_size", False) if record_size is None else record_size
        with atomic_dir(folder) as tmp:
            self.family.write(self, tmp)
            n, size = self.max_sequence_length, {}  # what is not the pipeline's default, said
            size.update({"height": self.height, "width": self.width} if self._size is not None else {})
            size.update({"num_frames": self._frames} if self._frames is not None else {})
            size.update({"max_sequence_length": n} if n != self.family.max_sequence_length(self) else {})
            if record and size:
                (tmp / SIZE_FILE).write_text(json.dumps(size) + "\n")
        return folder

    @classmethod
    def open(cls, name) -> TextToImageModel:
        """A pipeline folder, shipped ``cmkit:NAME`` or hub id (offline: the local hub cache alone, which answers at
        once), as a LoRA student's recorded base is opened; a one-line error where there is none."""
        path = resolve(name)
        if not Path(path).is_dir() and not looks_like_hub_id(path):
            raise FileNotFoundError(f"text-to-image pipeline folder {path!r} does not exist")
        load_kw = {} if Path(path).is_dir() else hub_load_kw()
        try:
            if not is_text_to_image(read_model_index(path, **load_kw)):
                raise ValueError(f"{name!r} is not a text-to-image teacher (no text encoder in its model_index.json)")
            return cls.from_pretrained(path, **load_kw)
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileNotFoundError(f"could not load {path!r}: no such folder here, and as a hub id ({first}); "
                                    "download it where there is network access and pass the local folder") from e

    @classmethod
    def from_pretrained(cls, path: str, clip_x0: float | None = None, dtype: torch.dtype = torch.float32,
                        **load_kw) -> TextToImageModel:
        """A diffusers text-to-image pipeline folder or hub id of a class cmkit has an adapter for (components read
        through their own ``from_pretrained``); the network and text encoders in ``dtype``, the VAE in float32.
        ``load_kw`` goes to every one of those calls (``local_files_only``, ``revision``)."""
        index = read_model_index(path, **load_kw)
        name = index.get("_class_name")
        if name in UNSUPPORTED:
            raise ValueError(f"{path} is a {name} ({UNSUPPORTED[name]}); cmkit takes text-to-image pipelines ("
                             f"{', '.join(FAMILIES.names())})")
        model = family_of(name, path).load(str(path), index, torch.float32, clip_x0, load_kw)
        _restore_sample_size(path, model)
        if dtype != torch.float32:
            # what students record of their base is the weights as stored, whatever they are held in here
            from ..core.digests import weights_digest

            model.__dict__["source_digest"] = weights_digest(model)
            model.denoiser.network.to(dtype)
            model.prompt_encoder.to(dtype)
        return model
