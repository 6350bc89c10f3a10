"""Wan text-to-video (``WanPipeline``): Wan 2.1's one ``WanTransformer3DModel``, or Wan 2.2's two experts
(``transformer`` above the boundary timestep, ``transformer_2`` below it, each with its own guidance scale), over
the latents of ``AutoencoderKLWan``, a causal 3-D VAE (``(C, 1 + (F - 1) / 4, H / 8, W / 8)`` for ``F`` frames),
prompts encoded by UMT5 as the pipeline encodes them, and classifier-free guidance with a negative prompt.

What is matched here, as ``WanPipeline.__call__`` computes it:

- Prompts: the pipeline's ``prompt_clean`` (ftfy where installed, HTML unescaped twice, whitespace collapsed), then
  ``max_sequence_length`` tokens with an attention mask, the encoder's last hidden state, each prompt's own tokens
  kept and the rest zero (``_get_t5_prompt_embeds``' trim and re-pad): a fixed-length tensor, so negatives and
  prompts stack. The transformer takes no mask: the zeros are what it reads. The negative prompt defaults to ``""``
  (``negative_prompt or ""``).
- The two experts: the timestep ``t`` (the scheduler's, ``1000 sigma_flow`` in float32) picks ``transformer`` where
  ``t >= boundary_ratio * num_train_timesteps``, else ``transformer_2``; here per sample, so a batch may straddle the
  boundary. Guidance is on where ``guidance_scale > 1`` (the first scale alone decides, as the pipeline's
  ``do_classifier_free_guidance``); the low-noise expert's steps guide with ``guidance_scale_2`` (default: the
  pipeline's, ``guidance_scale``), a guidance option (``model.denoiser.guide_with(guidance_scale_2=...)`` or
  ``cmkit.text_to_video(..., guidance_scale_2=...)``) that only a two-expert model takes.
- The VAE: ``WanVAE`` wraps the real ``AutoencoderKLWan`` so cmkit's encode / decode see ``(B, 3, F, H, W)`` videos
  and ``(B, C, F', H', W')`` latents already normalised per channel as the pipeline normalises them
  (``z = (z_vae - latents_mean) / latents_std``; decoding ``z / (1 / latents_std) + latents_mean``), with
  ``scaling_factor`` 1 and ``shift_factor`` 0 in its config so the shared normalisation is the identity.
- Wan 2.2 TI2V-5B (``expand_timesteps`` in its ``model_index.json``): one transformer that takes a timestep per
  latent token (the pipeline's ``mask[:, ::2, ::2] * t``, all ones for text to video), over the latents of its
  residual, 2x2-patchified VAE (spatial factor 16, 48 channels); read and sampled as text to video.
- The grid: the folder's scheduler as the pipeline sets it. The Wan folders ship ``UniPCMultistepScheduler`` with
  ``use_flow_sigmas`` and ``flow_shift``; a ``FlowMatchEulerDiscreteScheduler`` swapped in runs its own grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ...core.checks import in_range
from ..autoencoder import VAEView
from ..components import in_dtype
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..flow_map_networks import FLOW_MAP_NETWORKS, TIMESTEP_SCALE, batch_times, merged
from ..text_encoders import OneEncoderPrompts, negatives_for, prompt_list, tokenize
from .flow import FlowDenoiser, FlowFamily

PIPELINE = "WanPipeline"
DEFAULT_FRAMES = 81  # the pipeline's num_frames
DEFAULT_SIZE = (480, 832)  # the pipeline's height and width
MAX_TOKENS = 512  # Wan's text length: the pipeline's default max_sequence_length, what its models were trained on


class WanDenoiser(FlowDenoiser):
    """Wan's transformer (or Wan 2.2's two experts) as a guided denoiser of ``(C, F', H', W')`` latents (module
    docstring)."""

    def __init__(self, transformer: nn.Module, scheduler, transformer_2: nn.Module | None = None,
                 boundary_ratio: float | None = None, clip_x0: float | None = None, expand_timesteps: bool = False):
        # the smallest flow time: a FlowMatch scheduler's sigma_min; Wan's UniPC has none (its config's is None), and
        # its flow sigmas end at 1 / num_train_timesteps as FlowMatch's default does
        t_min = getattr(scheduler, "sigma_min", None) if not type(scheduler).__name__.startswith("UniPC") else None
        t_min = 1.0 / scheduler.config.num_train_timesteps if t_min is None else t_min
        super().__init__(transformer, SimpleNamespace(sigma_min=t_min), clip_x0)
        self.scheduler, self.transformer_2 = scheduler, transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.guidance_scale_2 = None  # the pipeline's default: guidance_scale
        self.expand_timesteps = bool(expand_timesteps)  # TI2V-5B: the network takes a timestep per token

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    def guide_with(self, **options) -> None:
        """Set ``guidance_scale_2`` (the low-noise expert's scale; None: ``guidance_scale``), which only a two-expert
        Wan 2.2 takes; a one-line error for any other option, or for it on a one-expert model."""
        from ...core.checks import finite_number

        for name, value in options.items():
            if name != "guidance_scale_2":
                raise ValueError(f"a {PIPELINE} has no guidance option {name!r}; a two-expert Wan 2.2 takes "
                                 "guidance_scale_2, nothing else")
            if not self.two_experts:
                raise ValueError("guidance_scale_2 is the low-noise expert's scale of a two-expert Wan 2.2 (a folder "
                                 "with transformer_2 and boundary_ratio); this model has one transformer: leave it out")
            self.guidance_scale_2 = None if value is None else finite_number(value, name, "a guidance scale")

    def _low_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """Per sample, whether the pipeline runs ``transformer_2`` here: ``t < boundary_ratio * num_train_timesteps``
        with ``t`` the float32 timestep, compared as the pipeline compares it (the bound as a float32 scalar)."""
        if not self.two_experts:
            return torch.zeros(timestep.shape, dtype=torch.bool, device=timestep.device)
        boundary = self.boundary_ratio * self.scheduler.config.num_train_timesteps
        return ~(timestep.float() >= boundary)

    @property
    def integer_timesteps(self) -> bool:
        """The UniPC scheduler Wan's folders ship hands the network ``int64`` timesteps, ``floor(1000 t)``, while
        its update uses ``t`` itself: the teacher sampled as its folder's pipeline samples it (and its expert
        boundary compared on them). A FlowMatch scheduler's are floats."""
        return type(self.scheduler).__name__.startswith("UniPC")

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        # as FlowDenoiser._denoise hands it to _velocity: the time from float64 sigma, times 1000, in float32
        t = (self.schedule.time(sigma.double()) * self.timestep_scale).float()
        return t.floor() if self.integer_timesteps else t

    def _per_token(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """TI2V-5B's timesteps, ``(B, F' * ceil(H' / 2) * ceil(W' / 2))``: the pipeline's ``mask[:, ::2, ::2] * t``
        flattened, its mask all ones for text to video (``t`` once per token of the 2x2-patched latent)."""
        f, h, w = x_t.shape[2], (x_t.shape[3] + 1) // 2, (x_t.shape[4] + 1) // 2
        return timestep[:, None].expand(-1, f * h * w)

    def _velocity(self, x_t, timestep, w, cond):
        if self.integer_timesteps:
            timestep = timestep.floor()
        low = self._low_noise(timestep)
        if self.expand_timesteps:
            timestep = self._per_token(x_t, timestep)
        embeds = cond["prompt_embeds"]
        out = None
        for expert, rows in ((self.transformer, ~low), (self.transformer_2, low)):
            if not rows.any():
                continue
            if expert is None:
                raise ValueError("this Wan 2.2 model has no transformer_2 for its low-noise steps; load the whole "
                                 "folder")
            dt = expert.dtype
            part = rows.all()  # the whole batch on one expert: no gather (the common case)
            x, t, e = (x_t, timestep, embeds) if part else (x_t[rows], timestep[rows], embeds[rows])
            v = expert(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=e.to(dt), return_dict=False)[0]
            if part:
                return v
            out = torch.empty_like(x_t, dtype=v.dtype) if out is None else out
            out[rows] = v
        return out

    def _combine(self, z, sigma, x0_neg, x0_pos, w):
        # the low-noise expert's steps guide with guidance_scale_2 (when set); guidance itself is on or off by
        # guidance_scale alone, as the pipeline decides it
        if self.two_experts and self.guidance_scale_2 is not None:
            low = self._low_noise(self._timestep(sigma))
            w = torch.where(low, torch.full_like(w, float(self.guidance_scale_2)), w)
        return super()._combine(z, sigma, x0_neg, x0_pos, w)


def _clean(texts: list[str]) -> list[str]:
    """The pipeline's own ``prompt_clean`` of each text (ftfy where installed, HTML unescape, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return [prompt_clean(t) for t in texts]


class WanPromptEncoder(OneEncoderPrompts):
    """Prompts -> Wan's conditioning: UMT5's last hidden state over ``max_sequence_length`` tokens, each prompt's own
    tokens kept and the rest zero (``_get_t5_prompt_embeds``)."""

    pipeline = PIPELINE
    default_length = MAX_TOKENS

    def _embed(self, texts: list[str]) -> torch.Tensor:
        tokens = tokenize(self.tokenizers[0], _clean(texts), self.max_sequence_length)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        # u[:seq_len] re-padded with zeros: the first seq_len positions kept, whatever side the padding is on
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]
        return hidden.masked_fill(~keep[..., None], 0)

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        # the negatives always (the pipeline's default is "" for each prompt): guidance is on for any scale above 1
        return {"prompt_embeds": self._embed(prompts),
                "negative_prompt_embeds": self._embed(negatives_for(prompts, negative_prompts))}


class _Posterior:
    """The VAE's posterior in the normalised latent space: ``mean``, ``std``, ``sample(generator)``."""

    def __init__(self, dist, mean, std):
        self.dist, self.offset, self.scale = dist, mean, std

    @property
    def mean(self):
        return (self.dist.mean - self.offset) / self.scale

    @property
    def std(self):
        return self.dist.std / self.scale

    def sample(self, generator=None):
        return (self.dist.sample(generator) - self.offset) / self.scale


class _Encoded:
    def __init__(self, latent_dist):
        self.latent_dist = latent_dist


class _Decoded:
    def __init__(self, sample):
        self.sample = sample


class WanVAE(VAEView):
    """The ``AutoencoderKLWan`` (``.vae``) as cmkit's VAE code reads a VAE: ``encode(videos).latent_dist`` and
    ``decode(latents).sample`` on ``(B, 3, F, H, W)`` videos in [-1, 1] and ``(B, C, F', H', W')`` latents normalised
    per channel as the pipeline normalises them, and a ``config`` with ``latent_channels`` (``z_dim``),
    ``block_out_channels`` (one more entry than the spatial factor's halvings, so ``2 ** (len - 1)`` is that factor),
    ``scaling_factor`` 1 and ``shift_factor`` 0 (the normalisation is inside), the temporal and spatial factors, and
    the per-channel ``folded_latents_mean`` / ``folded_latents_std`` (so a latent cache keys on them)."""

    @property
    def config(self):
        from diffusers.configuration_utils import FrozenDict

        c = self.vae.config
        halvings = int(round(math.log2(int(c.scale_factor_spatial))))
        patch = int(c.get("patch_size") or 1) ** 2  # a patchified VAE (TI2V-5B's) reads 2x2 pixels as 12 channels
        return FrozenDict(latent_channels=int(c.z_dim), block_out_channels=[int(c.base_dim)] * (halvings + 1),
                          in_channels=int(c.in_channels) // patch, out_channels=int(c.out_channels) // patch,
                          scaling_factor=1.0,
                          shift_factor=0.0, scale_factor_temporal=int(c.scale_factor_temporal),
                          scale_factor_spatial=int(c.scale_factor_spatial),
                          folded_latents_mean=list(c.latents_mean), folded_latents_std=list(c.latents_std))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        view = lambda v: torch.tensor(v).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)  # noqa: E731
        return view(c.latents_mean), view(c.latents_std)

    def encode(self, videos: torch.Tensor) -> _Encoded:
        dist = self.vae.encode(videos).latent_dist
        mean, std = self._stats(dist.mean)
        return _Encoded(_Posterior(dist, mean, std))

    def decode(self, latents: torch.Tensor) -> _Decoded:
        mean, std = self._stats(latents)
        # as the pipeline decodes: latents / (1 / latents_std) + latents_mean
        return _Decoded(self.vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0])


@register_family
class Wan(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder",)
    # every block's self- and cross-attention (the same names) and its feed-forward
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    def load(self, path, index, dtype, clip_x0, load_kw):
        ratio = index.get("boundary_ratio")
        needed = ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"]
        needed += ["transformer_2"] if ratio is not None else []
        why = f" (its model_index.json sets boundary_ratio {ratio}: a two-expert Wan 2.2)" if ratio else ""
        p = self.needed_parts(path, index, needed, load_kw, why)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        tr2 = in_dtype(p.get("transformer_2"), dtype)
        for name, t in (("transformer", tr), ("transformer_2", tr2)):
            if t is not None and t.config.in_channels != vae.config.z_dim:
                raise ValueError(f"{path}: the {name} takes {t.config.in_channels} latent channels, the VAE gives "
                                 f"{vae.config.z_dim}; the folder's parts do not belong together")
        prompts = WanPromptEncoder(in_dtype(p["text_encoder"], dtype), p["tokenizer"])
        den = WanDenoiser(tr, sched, tr2 if ratio is not None else None, ratio, clip_x0,
                          expand_timesteps=bool(index.get("expand_timesteps", False)))
        model = TextToImageModel(den, WanVAE(vae.eval()), prompts.eval(), {"pipeline": self.name})
        model.resize(*DEFAULT_SIZE)  # the pipeline's 480 x 832, not a square
        return model

    def checked_scheduler(self, path, scheduler):
        """The folder's ``FlowMatchEulerDiscreteScheduler`` (FlowFamily's checks), or the ``UniPCMultistepScheduler``
        Wan ships, which must predict the flow over flow sigmas with a finite ``flow_shift`` > 0."""
        from pathlib import Path

        from ...core.checks import in_range

        if type(scheduler).__name__ != "UniPCMultistepScheduler":
            return super().checked_scheduler(path, scheduler)
        c, where = scheduler.config, Path(path) / "scheduler" / "scheduler_config.json"
        if not c.get("use_flow_sigmas") or c.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{where}: a {self.name}'s UniPCMultistepScheduler runs over flow sigmas "
                             "(use_flow_sigmas: true, prediction_type: flow_prediction); restore the "
                             "folder's scheduler")
        in_range(c.get("flow_shift", 1.0), f"{where}: flow_shift", 0, low_open=True,
                 fix="give the value the pipeline was trained with")
        return scheduler

    def check_lora(self, model) -> None:
        # one adapter on one expert would leave the other expert's steps untrained, and WanPipeline's
        # load_lora_weights fills one expert per file: the pair's students are full ones (both experts trained)
        if model.denoiser.transformer_2 is not None:
            raise ValueError("a LoRA student of a two-expert Wan 2.2 teacher is not supported (one adapter serves one "
                             "expert); distil a full student (flow_cd, latent_scd, latent_rcm: both experts trained, "
                             "exported as a two-expert WanPipeline folder)")

    def flow_map_network(self, teacher, gate_value: float = 0.25, lora: dict | None = None):
        """A flow-map student of a Wan 2.1 teacher: its transformer as diffusers' ``AnyFlowTransformer3DModel``
        (``AnyFlowNetwork``), exported as an ``AnyFlowPipeline`` folder; ``lora`` (rank, alpha, targets): an adapter
        on one holding the teacher's own weights, its ``delta_embedder`` trained in full."""
        from ..flow_student import add_transformer_lora

        if teacher.denoiser.transformer_2 is not None:
            raise ValueError("a flow-map student of a two-expert Wan 2.2 teacher is not supported (an "
                             "AnyFlowTransformer3DModel is one network, and u(z, t, t) must be the teacher's velocity "
                             "at every t); distil a Wan 2.1 teacher, or a flow_cd / latent_scd student of this one")
        if lora is None:
            return AnyFlowNetwork.from_wan(teacher.denoiser.transformer, gate_value)
        net = AnyFlowNetwork.from_wan(teacher.denoiser.transformer, gate_value, tied=True)
        add_transformer_lora(net.transformer, lora["rank"], lora["alpha"], lora["targets"])
        net.transformer.condition_embedder.delta_embedder.requires_grad_(True)
        return net

    def student_scheduler(self, model, scheduler):
        """A few-step student samples over the Euler grid of the teacher's flow shift: the UniPC scheduler the Wan
        folders ship is a multistep solver of the teacher's flow (its ``flow_shift`` is not the Euler scheduler's
        ``shift`` key, which a plain config copy would drop to 1)."""
        if type(scheduler).__name__ != "UniPCMultistepScheduler":
            return scheduler
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = scheduler.config
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=c.num_train_timesteps,
                                               shift=float(c.get("flow_shift", 1.0)))

    def pipeline(self, model):
        import diffusers

        den, pe = model.denoiser, model.prompt_encoder
        return diffusers.WanPipeline(tokenizer=pe.tokenizers[0], text_encoder=pe.text_encoder, vae=model.vae.vae,
                                     scheduler=model.scheduler, transformer=den.transformer,
                                     transformer_2=den.transformer_2, boundary_ratio=den.boundary_ratio,
                                     expand_timesteps=den.expand_timesteps)

    def default_image_size(self, model) -> int:
        return DEFAULT_SIZE[0]  # the pipeline's height (its width is 832: load sets both)

    def default_num_frames(self, model) -> int:
        return DEFAULT_FRAMES

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        c = model.vae.config
        f, tf = model.num_frames, c.scale_factor_temporal
        if isinstance(f, bool) or not isinstance(f, int) or f < 1 or (f - 1) % tf:
            near = max(1, (f - 1) // tf * tf + 1) if isinstance(f, int) and not isinstance(f, bool) else 1
            raise ValueError(f"num_frames {f} is not 1 + a multiple of {tf} (the VAE's temporal factor: 1, {1 + tf}, "
                             f"{1 + 2 * tf}, ... frames); try {near} or {near + tf}")
        s, patch = c.scale_factor_spatial, int(model.network.config.patch_size[1])
        channels, h, w = patched_shape(int(model.network.config.in_channels), height, width, s, patch,
                                       f"the VAE's factor {s} times Wan's {patch}x{patch} patches")
        return (channels, 1 + (f - 1) // tf, h, w)

    def max_sequence_length(self, model) -> int:
        return MAX_TOKENS

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_wan_pipeline(texts, seed=seed, image_size=image_size)


def tiny_t5_tokenizer():
    """A small offline ``T5Tokenizer`` (transformers' Unigram one, as UMT5's): ``<pad>`` 0, ``</s>`` 1 (appended
    to every text, as T5's), ``<unk>`` 2, the word-start ``▁`` and every printable ASCII character as a piece, so
    any English prompt tokenises, one token a character. (``byte_tokenizer``'s BPE does not survive T5Tokenizer's
    save and reload, which rebuilds a Unigram model from the vocabulary.)"""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


TINY_TEXT_DIM = 32  # tiny_wan_text_side's width: the transformer's text_dim


def tiny_wan_text_side(seed: int = 0, max_sequence_length: int = MAX_TOKENS) -> WanPromptEncoder:
    """Wan's text side for a small model: a one-layer UMT5 encoder (d_model ``TINY_TEXT_DIM``) drawn from
    ``seed`` (the global generator untouched) with ``tiny_t5_tokenizer``, as ``tiny_wan_pipeline`` builds it."""
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer()
    cfg = UMT5Config(vocab_size=len(tok), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(cfg).eval()
    return WanPromptEncoder(encoder, tok, max_sequence_length).eval()


def small_wan_transformer(channels: int, layers: int, heads: int, head_dim: int, text_dim: int, seed: int = 0):
    """A seeded ``WanTransformer3DModel`` on ``channels`` latent channels (Wan 2.1's block: ``(1, 2, 2)`` patches,
    cross-attention norm, RMS q/k norm across heads), ``heads x head_dim`` wide with a feed-forward twice that,
    reading ``text_dim``-wide prompt embeddings; the global generator untouched."""
    from diffusers import WanTransformer3DModel

    if head_dim < 6 or head_dim % 2:
        raise ValueError(f"objective.head_dim {head_dim}: Wan's 3-D rotary embedding splits each head over frames, "
                         "rows and columns; give an even width of 6 or more (12, 32, 64, 128)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                     in_channels=channels, out_channels=channels, text_dim=text_dim, freq_dim=64,
                                     ffn_dim=2 * heads * head_dim, num_layers=layers, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads")


def tiny_wan_pipeline(texts: list[str] | None = None, seed: int = 0, image_size: int = 16, num_frames: int = 9,
                      two_experts: bool = False, boundary_ratio: float = 0.875, flow_shift: float = 3.0,
                      max_sequence_length: int = MAX_TOKENS, ti2v: bool = False) -> TextToImageModel:
    """A randomly initialised ``WanPipeline`` model, sampling ``num_frames`` frames of ``image_size`` squares: a
    one-layer UMT5 encoder (d_model 32) with ``tiny_t5_tokenizer``, one-layer ``WanTransformer3DModel``\\ s
    (hidden 24; ``two_experts``: Wan 2.2's pair with ``boundary_ratio``), a 8-channel ``AutoencoderKLWan`` (spatial
    factor 8, temporal 4) with per-channel latent statistics that are not the identity, and the scheduler the Wan
    folders ship (``UniPCMultistepScheduler`` over flow sigmas, ``flow_shift``). ``ti2v``: Wan 2.2 TI2V-5B's layout
    instead, a timestep per token (``expand_timesteps``) and its VAE's kind (residual, 2x2 patchified: a 12-channel
    spatial factor 16, ``image_size`` a multiple of 32). ``texts`` is unused (the tokenizer
    reads every English text); it is there for the ``tiny`` hook's signature."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    z = 12 if ti2v else 8

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z,
                                     out_channels=z, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    with torch.random.fork_rng(devices=[]):
        prompts = tiny_wan_text_side(seed, max_sequence_length)
        torch.manual_seed(seed + 1)
        tr = transformer().eval()
        torch.manual_seed(seed + 2)
        tr2 = transformer().eval() if two_experts else None
        torch.manual_seed(seed + 3)
        stats = torch.rand(2, z)
        kind = dict(is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12,
                    out_channels=12) if ti2v else {}
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=(stats[0] - 0.5).tolist(),
                               latents_std=(stats[1] + 0.5).tolist(), **kind).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    den = WanDenoiser(tr, sched, tr2, boundary_ratio if two_experts else None, expand_timesteps=ti2v)
    model = TextToImageModel(den, WanVAE(vae), prompts, {"pipeline": PIPELINE})
    model.resize(image_size, image_size, num_frames)
    return model


@FLOW_MAP_NETWORKS.register("anyflow")
class AnyFlowNetwork(nn.Module):
    """A Wan teacher's transformer as diffusers' ``AnyFlowTransformer3DModel`` (module docstring), called on cmkit's
    ``(B, C, F, H, W)`` latents (the model's own layout is ``(B, F, C, H, W)``, one timestep per latent frame)."""

    name = "anyflow"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @classmethod
    def from_wan(cls, wan: nn.Module, gate_value: float = 0.25, tied: bool = False) -> AnyFlowNetwork:
        """The Wan 2.1 text-to-video transformer's weights in an ``AnyFlowTransformer3DModel`` (the same key names;
        ``delta_embedder`` copied from ``time_embedder``), in float32; ``tied``: holding the Wan transformer's own
        parameters (frozen, in their dtype; a LoRA student's base), the ``delta_embedder`` its own."""
        from diffusers import AnyFlowTransformer3DModel

        c = wan.config
        if tuple(c.patch_size)[0] != 1 or c.get("qk_norm") != "rms_norm_across_heads" or c.get("added_kv_proj_dim") \
                or c.get("image_dim") or c.get("pos_embed_seq_len"):
            raise ValueError("an AnyFlow flow-map student takes a Wan 2.1 text-to-video transformer (patch (1, p, p), "
                             "rms_norm_across_heads q/k norm, no image conditioning); this transformer is not one")
        in_range(gate_value, "objective.gate_value", 0, 1, low_open=True, fix="AnyFlow's is 0.25")
        af = AnyFlowTransformer3DModel(
            patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim, in_channels=c.in_channels, out_channels=c.out_channels,
            text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
            cross_attn_norm=c.cross_attn_norm, eps=c.eps, rope_max_seq_len=c.rope_max_seq_len,
            gate_value=float(gate_value), deltatime_type="r")
        state = {k: v.float() for k, v in wan.state_dict().items()}
        prefix = "condition_embedder.time_embedder."
        state.update({k.replace(prefix, "condition_embedder.delta_embedder."): v.clone()
                      for k, v in state.items() if k.startswith(prefix)})
        af.load_state_dict(state, strict=True)
        af.float().train()
        if tied:
            for name, p in wan.named_parameters():
                owner, _, attr = name.rpartition(".")
                setattr(af.get_submodule(owner), attr, p)
        return cls(af)

    def forward(self, z, r, t, prompt_embeds=None, **_):
        b, f = z.shape[0], z.shape[2]
        dt = self.transformer.dtype
        ts, rs = ((batch_times(v, z) * TIMESTEP_SCALE).float()[:, None].expand(b, f) for v in (t, r))
        u = self.transformer(hidden_states=z.permute(0, 2, 1, 3, 4).to(dt), timestep=ts, r_timestep=rs,
                             encoder_hidden_states=prompt_embeds.to(z.device, dt), return_dict=False)[0]
        self._drop_traced_rope()
        return u.permute(0, 2, 1, 3, 4).to(z.dtype)

    def _drop_traced_rope(self) -> None:
        """The rotary table the model caches on first use: one built inside a JVP (``torch.func``) is a wrapped
        tensor that outlives its transform (a later copy or pass fails on it), so it is dropped, rebuilt next call."""
        rope = self.transformer.rope
        cache = getattr(rope, "_freqs_cache", None)
        if cache is not None and torch._C._functorch.is_functorch_wrapped_tensor(cache[1]):
            rope._freqs_cache = None

    def pipeline(self, parts, scheduler):
        import diffusers

        pe = parts.prompt_encoder
        return diffusers.AnyFlowPipeline(tokenizer=pe.tokenizers[0], text_encoder=pe.text_encoder,
                                         transformer=merged(self.transformer), vae=parts.vae.vae, scheduler=scheduler)

    def write(self, parts, folder: Path, shift: float) -> None:
        from diffusers import FlowMapEulerDiscreteScheduler

        n = int(parts.scheduler.config.num_train_timesteps)
        self.pipeline(parts, FlowMapEulerDiscreteScheduler(num_train_timesteps=n, shift=shift)).save_pretrained(
            folder, safe_serialization=True)

    @classmethod
    def read(cls, folder: Path, meta: dict):
        """``(network, parts)`` of an ``AnyFlowPipeline`` folder: the parts a Wan teacher's sampling needs (its
        prompt encoder, VAE, latent shape) around the flow-map transformer."""
        import diffusers

        pipe = diffusers.AnyFlowPipeline.from_pretrained(str(folder), use_safetensors=True)
        n = int(pipe.scheduler.config.num_train_timesteps)
        grid = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=float(meta["shift"]))
        den = WanDenoiser(pipe.transformer.float(), grid)  # never called: the parts' latent shape and scheduler
        prompts = WanPromptEncoder(pipe.text_encoder.eval(), pipe.tokenizer)
        parts = TextToImageModel(den, WanVAE(pipe.vae.float().eval()), prompts.eval(), {"pipeline": PIPELINE})
        return cls(pipe.transformer), parts
