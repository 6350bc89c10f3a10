"""Z-Image (``ZImagePipeline``): a ``ZImageTransformer2DModel`` over per-sample lists of 2x2-patched latents and
variable-length caption features, prompts encoded as the pipeline encodes them (the Qwen3 chat template rendered with
``enable_thinking=True``, ``max_sequence_length`` tokens, the second-to-last hidden state, the masked tokens alone),
the Flux VAE (scale and shift), the scheduler's grid over ``linspace(1, 1/N, N)`` with the pipeline's ``mu``, and the
pipeline's own classifier-free guidance with its ``cfg_normalization`` and ``cfg_truncation``.

Three things differ from the other flow families and are matched here:

- The transformer is called at time ``1 - t`` and predicts ``x0 - eps``; the pipeline negates it into the velocity
  ``eps - x0`` the scheduler steps with.
- The caption features are as long as each prompt's tokens. The prompt encoder returns them padded to
  ``max_sequence_length`` with ``prompt_attention_mask`` beside them (so negatives and prompts stack, and the latent
  cache stores one shape); the denoiser hands the transformer each sample's masked tokens alone, the very list the
  pipeline passes.
- Guidance: the pipeline's ``guidance_scale`` ``g`` guides as ``pos + g (pos - neg)`` and is off at 0. cmkit keeps
  its one convention for every family (1 = no guidance, ``neg + w (pos - neg)``), so cmkit's ``guidance_scale = w``
  is the pipeline's ``g = w - 1``. ``cfg_normalization`` (a factor; the pipeline's ``True`` is 1) caps the guided
  velocity's norm at that factor times the conditional one's, per sample; ``cfg_truncation`` switches guidance off
  (the conditional prediction alone) where ``1 - t`` is above it. Both are the denoiser's settings
  (``model.denoiser.guide_with(cfg_normalization=..., cfg_truncation=...)``), by default the pipeline's defaults
  (off, 1.0: never truncated).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core import append_dims
from ..builders import flow_vae
from ..components import in_dtype
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import OneEncoderPrompts, byte_tokenizer, negatives_for, prompt_list, tokenize
from .flow import FlowDenoiser, FlowFamily

PIPELINE = "ZImagePipeline"
GUIDANCE_OPTIONS = ("cfg_normalization", "cfg_truncation")


class ZImageDenoiser(FlowDenoiser):
    """Z-Image's transformer as a guided denoiser, guiding as ``ZImagePipeline.__call__`` does (module docstring)."""

    timestep_scale = 1000.0  # the scheduler's timestep t * 1000, which the pipeline turns into (1000 - t) / 1000

    def __init__(self, transformer: nn.Module, scheduler, clip_x0: float | None = None):
        super().__init__(transformer, scheduler, clip_x0)
        self.cfg_normalization, self.cfg_truncation = 0.0, 1.0  # the pipeline's defaults: False, 1.0
        # the rotary table is cached on first use; made inside a JVP (sCD's tangent) it would keep the transform's
        # dead wrapper tensors, and the student could not be copied or exported: make it now, outside any transform
        rope = transformer.rope_embedder
        if rope.freqs_cis is None:
            rope.freqs_cis = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)

    def _apply(self, fn, *args, **kwargs):
        # the table is no buffer, so .to(device) leaves it behind and the transformer would move it on its first call,
        # perhaps inside a JVP: it follows the weights here instead, outside any transform
        out = super()._apply(fn, *args, **kwargs)
        rope, device = self.transformer.rope_embedder, next(self.transformer.parameters()).device
        if rope.freqs_cis is not None and device.type != "meta" and rope.freqs_cis[0].device != device:
            rope.freqs_cis = [f.to(device) for f in rope.freqs_cis]
        return out

    def guide_with(self, **options) -> None:
        """Set the pipeline's guidance options: ``cfg_normalization`` (False / 0: off; True: 1; a factor > 0 caps the
        guided velocity's norm at that many times the conditional one's) and ``cfg_truncation`` (guidance off where
        ``1 - t`` exceeds it; above 1 or None: never). A one-line error for any other option."""
        from ...core.checks import finite_number, in_range

        for name, value in options.items():
            if name not in GUIDANCE_OPTIONS:
                raise ValueError(f"a {PIPELINE} has no guidance option {name!r}; it takes "
                                 f"{' and '.join(GUIDANCE_OPTIONS)}")
            if name == "cfg_normalization":  # the pipeline's bool is a factor: True caps at the conditional norm
                value = in_range(float(value) if isinstance(value, bool) else value, name, 0,
                                 fix="False / 0 for off, True / 1 to cap at the conditional norm")
            elif value is not None:
                value = finite_number(value, name, "guidance stops where 1 - t exceeds it; 1: never")
            setattr(self, name, value)

    def _velocity(self, x_t, timestep, w, cond):
        mask = cond["prompt_attention_mask"].bool()
        caps = [e[m] for e, m in zip(cond["prompt_embeds"], mask, strict=True)]  # each prompt's own tokens
        out = self.transformer(list(x_t.unsqueeze(2).unbind(0)), (1000 - timestep) / 1000, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts x0 - eps; the pipeline steps with eps - x0

    def _truncated(self, sigma) -> torch.Tensor:
        """Where the pipeline switches guidance off: ``(1000 - timestep) / 1000 > cfg_truncation``, in the float32
        it computes that in."""
        if self.cfg_truncation is None or self.cfg_truncation > 1:
            return torch.zeros(sigma.shape, dtype=torch.bool, device=sigma.device)
        timestep = (self.schedule.time(sigma.double()) * 1000).float()
        return (1000 - timestep) / 1000 > self.cfg_truncation

    def _combine(self, z, sigma, x0_neg, x0_pos, w):
        # in velocities v = (x_t - x0) / t, as the pipeline combines its outputs (the norm cap is not affine in x0)
        s = append_dims(sigma, z.ndim)
        x_t, t = self.schedule.to_native(z, s), self.schedule.time(s).to(z.dtype)
        v_pos, v_neg = (x_t - x0_pos) / t, (x_t - x0_neg) / t
        g = (w - 1).to(z.dtype)  # the pipeline's guidance scale
        v = v_pos + append_dims(g, z.ndim) * (v_pos - v_neg)
        if self.cfg_normalization > 0:
            pos_norm, new_norm = v_pos.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1)
            cap = pos_norm * self.cfg_normalization
            v = v * append_dims(torch.where(new_norm > cap, cap / new_norm, torch.ones_like(cap)), z.ndim)
        guided = self.schedule.to_x0("flow", x_t, s, v)
        # a step the pipeline runs unguided (truncated, or a per-sample scale of 1) is the conditional pass alone
        plain = self._truncated(sigma) | (g <= 0)
        return torch.where(append_dims(plain, z.ndim), x0_pos, guided)


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the pipeline renders it: one user message, the generation prompt, ``enable_thinking=True``."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for p in prompts]


class ZImagePromptEncoder(OneEncoderPrompts):
    """Prompts -> Z-Image's conditioning: the text encoder's second-to-last hidden state over the chat-templated
    prompt padded to ``max_sequence_length`` tokens (zero where padded), and ``prompt_attention_mask`` saying which
    tokens the pipeline keeps."""

    pipeline = PIPELINE
    default_length = 512

    def _embed(self, texts):
        tok = self.tokenizers[0]
        tokens = tokenize(tok, chat_prompts(tok, texts), self.max_sequence_length)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return hidden.masked_fill(~mask[..., None], 0), mask  # the padding is never read: zeros, not whatever it was

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        embeds, mask = self._embed(prompts)
        # the negatives always (the pipeline's default is "" for each prompt): guidance is on for any scale above 1
        neg, neg_mask = self._embed(negatives_for(prompts, negative_prompts))
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
                "negative_prompt_attention_mask": neg_mask}


@register_family
class ZImage(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder",)
    # every block's attention (noise / context refiners and the main layers share the names) and SwiGLU feed-forward
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

    def load(self, path, index, dtype, clip_x0, load_kw):
        p = self.needed_parts(path, index, ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"], load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if tr.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} latent channels, the VAE gives "
                             f"{vae.config.latent_channels}; the folder's parts do not belong together")
        prompts = ZImagePromptEncoder(in_dtype(p["text_encoder"], dtype), p["tokenizer"])
        return TextToImageModel(ZImageDenoiser(tr, sched, clip_x0), vae.eval(), prompts.eval(), {"pipeline": self.name})

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.ZImagePipeline(transformer=model.network, scheduler=model.scheduler, vae=model.vae,
                                        text_encoder=pe.text_encoder, tokenizer=pe.tokenizers[0])

    def default_image_size(self, model) -> int:
        return 1024  # the pipeline's height or 1024

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        f = model.vae_scale_factor
        return patched_shape(int(model.network.config.in_channels), height, width, f, 2,
                             f"the VAE's factor {f} times Z-Image's 2x2 patches")

    def max_sequence_length(self, model) -> int | None:
        # the pipeline sets no limit of its own: the text encoder's positions are the limit
        return int(model.prompt_encoder.text_encoder.config.max_position_embeddings)

    def set_timesteps_kwargs(self, model, steps: int) -> dict:
        # get_default_z_image_sigmas: torch's float32 linspace, as the pipeline makes it (numpy's may differ by an ulp)
        return {"sigmas": torch.linspace(1.0, 1 / steps, steps).tolist()}

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        return (h // 2) * (w // 2)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_z_image_pipeline(texts, seed=seed, image_size=image_size)


# what Qwen3's own template renders for one user message with add_generation_prompt and enable_thinking=True (the
# pipeline's call); with enable_thinking=False it adds the empty think block, as Qwen3's does
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                 "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def tiny_z_image_pipeline(texts: list[str] | None = None, seed: int = 0, image_size: int = 32,
                          max_sequence_length: int = 64, dynamic_shift: bool = False) -> TextToImageModel:
    """A randomly initialised ``ZImagePipeline`` model: a 2-layer Qwen3 text encoder (hidden 16) with a byte-level
    ``Qwen2Tokenizer`` and a Qwen3-style chat template, a ``ZImageTransformer2DModel`` (dim 32, one refiner layer
    each, two main layers), a 16-channel VAE with the Flux VAE's scale and shift, and the scheduler Z-Image ships
    (static shift 3; ``dynamic_shift``: the resolution-dependent one). ``texts`` is unused (the byte tokenizer reads
    every text); it is there for the ``tiny`` hook's signature."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = byte_tokenizer("Qwen2Tokenizer", SPECIALS, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    cfg = Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, vocab_size=len(tok), max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Qwen3Model(cfg).eval()
        torch.manual_seed(seed + 1)
        tr = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                      cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        with torch.no_grad():  # the pad tokens start as torch.empty: give them values a saved folder reproduces
            tr.x_pad_token.normal_()
            tr.cap_pad_token.normal_()
    vae = flow_vae(image_size, 16, seed + 2, 0.1159)
    vae.register_to_config(scaling_factor=0.3611)  # the Flux VAE's, which Z-Image ships
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic_shift)
    model = TextToImageModel(ZImageDenoiser(tr.eval(), sched), vae,
                             ZImagePromptEncoder(encoder, tok, max_sequence_length).eval(), {"pipeline": PIPELINE})
    model.image_size = image_size
    return model

