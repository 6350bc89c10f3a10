"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an ``SD3Transformer2DModel`` predicting the flow
velocity at timestep ``1000 t``, prompts encoded as the pipeline encodes them (two CLIP encoders with projection:
penultimate hidden states concatenated along features and zero-padded to the T5 width, then T5's last hidden state
appended along the sequence, or zeros of ``max_sequence_length`` tokens where the folder has no T5; the two pooled
projections concatenated), ``""`` as the unconditional prompt, and the scheduler's static shift (or ``mu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..builders import flow_vae, small_sd3_transformer, small_t5_encoder
from ..components import in_dtype, load_parts, present
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import build_tokenizer, clip_tokenizer, negatives_for, prompt_list, small_text_encoder, tokenize
from .flow import FlowDenoiser, FlowFamily

PIPELINE = "StableDiffusion3Pipeline"


class RepeatedTokenAttention:
    """Joint attention (as diffusers' ``JointAttnProcessor2_0``) in which the last text token stands for ``n``
    identical copies: its attention logit gets ``+ log n`` from every query, which is exactly what ``n`` equal keys
    with equal values give (``n e^{q.k} = e^{q.k + log n}``). Every other operation of the transformer acts on each
    token alone, and the text stream has no position embedding, so the copies stay identical through every block.
    A T5-less SD3 pipeline pads each prompt with ``max_sequence_length`` zero tokens (256 by default); training on
    one of them with this bias is exact and an order of magnitude cheaper (``SD3Denoiser.repeated_zero_tokens``).
    A call without text (SD3.5's second, image-only attention of its dual-attention blocks, ``attn2``, which is
    handed the same keyword arguments) is plain self-attention of the image tokens, as diffusers computes it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, log_repeats=None):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads

        def split(t):
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = (attn.norm_q(q) if attn.norm_q else q), (attn.norm_k(k) if attn.norm_k else k)
        if encoder_hidden_states is None:  # no text stream here: no repeated token either
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n_img, -1).to(q.dtype)
            return attn.to_out[1](attn.to_out[0](out))
        e = encoder_hidden_states
        eq, ek, ev = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
        eq = attn.norm_added_q(eq) if attn.norm_added_q else eq
        ek = attn.norm_added_k(ek) if attn.norm_added_k else ek
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        bias = torch.zeros(k.shape[2] - 1, dtype=q.dtype, device=q.device)
        bias = torch.cat([bias, torch.zeros(1, dtype=q.dtype, device=q.device) if log_repeats is None
                          else log_repeats.to(q.dtype)])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        txt = txt if attn.context_pre_only else attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


class SD3Denoiser(FlowDenoiser):
    """A conditioning with ``zero_token_repeats`` (per sample, all equal: a T5-less encoding whose zero tokens were
    cut to one by ``SD3PromptEncoder.collapsed``) runs the transformer with ``RepeatedTokenAttention``; any other
    with diffusers' own attention."""

    def _velocity(self, x_t, timestep, w, cond):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        repeats = cond.get("zero_token_repeats")
        # which processors are set is kept here: reading transformer.attn_processors walks every module
        ours = self.__dict__.get("_repeated_attention", False)
        if (repeats is not None) != ours:
            self.transformer.set_attn_processor(RepeatedTokenAttention() if repeats is not None
                                                else JointAttnProcessor2_0())
            self.__dict__["_repeated_attention"] = repeats is not None
        # the count is the same for every sample (max_sequence_length); kept on the device, no sync
        extra = {} if repeats is None else {"joint_attention_kwargs": {"log_repeats": repeats[:1].log()}}
        return self.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False, **extra)[0]


class SD3PromptEncoder(nn.Module):
    """Prompts -> SD3's conditioning. ``encoders`` / ``tokenizers``: the two CLIP pairs, then T5's (or None)."""

    pipeline = PIPELINE

    def __init__(self, encoders: list, tokenizers: list, joint_attention_dim: int, max_sequence_length: int = 256):
        super().__init__()
        if len(encoders) != 3 or len(tokenizers) != 3 or (encoders[2] is None) != (tokenizers[2] is None):
            raise ValueError("an SD3 prompt encoder takes two CLIP (tokenizer, encoder) pairs and a T5 pair (or "
                             "None for both)")
        self.encoders = nn.ModuleList([e for e in encoders if e is not None])
        self.tokenizers = list(tokenizers)
        self.joint_attention_dim, self.max_sequence_length = int(joint_attention_dim), int(max_sequence_length)
        # a T5-less encoding's identical zero tokens are cut to one that stands for all of them (exact: see
        # RepeatedTokenAttention; 13x less work for a tiny model); False gives the pipeline's tensors as they are
        self.collapse_zero_tokens = True

    @property
    def t5(self):
        return self.encoders[2] if len(self.encoders) == 3 else None

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def settings(self) -> tuple:
        return (self.pipeline, self.joint_attention_dim, self.max_sequence_length, self.collapse_zero_tokens)

    def _clip(self, i: int, texts):
        tok, enc = self.tokenizers[i], self.encoders[i]
        out = enc(tokenize(tok, texts, tok.model_max_length).input_ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.encoders[0].dtype), out[0]

    def _t5(self, texts):
        if self.t5 is None:
            return torch.zeros(len(texts), self.max_sequence_length, self.joint_attention_dim, device=self.device,
                               dtype=self.encoders[0].dtype)
        ids = tokenize(self.tokenizers[2], texts, self.max_sequence_length, add_special_tokens=True).input_ids
        return self.t5(ids.to(self.device))[0].to(self.t5.dtype)

    def _embed(self, texts):
        (h1, p1), (h2, p2) = self._clip(0, texts), self._clip(1, texts)
        clip, t5 = torch.cat([h1, h2], -1), self._t5(texts)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], -2), torch.cat([p1, p2], -1)

    def collapsed(self, cond: dict) -> dict:
        """``cond`` with the zero tokens of a T5-less encoding cut to one (``SD3Denoiser.repeated_zero_tokens``
        = ``max_sequence_length`` makes that exact)."""
        if self.t5 is not None:
            raise ValueError("only a T5-less SD3 encoding pads with identical zero tokens")
        if "zero_token_repeats" in cond:
            return cond
        embeds = cond["prompt_embeds"]
        keep = embeds.shape[1] - self.max_sequence_length + 1
        out = {k: v[:, :keep] if k.endswith("prompt_embeds") and v.ndim == 3 else v for k, v in cond.items()}
        out["zero_token_repeats"] = torch.full((embeds.shape[0],), float(self.max_sequence_length),
                                               device=embeds.device)
        return out

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        embeds, pooled = self._embed(prompts)
        neg, neg_pooled = self._embed(negatives_for(prompts, negative_prompts))
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg,
                "negative_pooled_prompt_embeds": neg_pooled}
        return self.collapsed(cond) if self.t5 is None and self.collapse_zero_tokens else cond


@register_family
class StableDiffusion3(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    mu_defaults = (256, 4096, 0.5, 1.16)

    def load(self, path, index, dtype, clip_x0, load_kw):
        needed = ["transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        missing = [c for c in needed if not present(index, c)]
        if missing:
            raise ValueError(f"{path} is an SD3 folder without {', '.join(missing)}; it needs {', '.join(needed)} "
                             "(text_encoder_3 / tokenizer_3, the T5, may be absent)")
        if present(index, "text_encoder_3") != present(index, "tokenizer_3"):
            raise ValueError(f"{path}: text_encoder_3 and tokenizer_3 come together (give both or neither)")
        p = load_parts(path, index, needed + ["text_encoder_3", "tokenizer_3"], load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if tr.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} channels, the VAE's latents "
                             f"have {vae.config.latent_channels}; its components do not belong together")
        encs = [in_dtype(p[e], dtype) for e in self.encoders]
        prompts = SD3PromptEncoder(encs, [p["tokenizer"], p["tokenizer_2"], p["tokenizer_3"]],
                                   tr.config.joint_attention_dim)
        return TextToImageModel(SD3Denoiser(tr, sched, clip_x0), vae.eval(), prompts.eval(),
                                {"pipeline": self.name})

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.StableDiffusion3Pipeline(
            transformer=model.network, scheduler=model.scheduler, vae=model.vae, text_encoder=pe.encoders[0],
            tokenizer=pe.tokenizers[0], text_encoder_2=pe.encoders[1], tokenizer_2=pe.tokenizers[1],
            text_encoder_3=pe.t5, tokenizer_3=pe.tokenizers[2])

    def default_image_size(self, model) -> int:
        return int(model.network.config.sample_size) * model.vae_scale_factor

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        f, p = model.vae_scale_factor, int(model.network.config.patch_size)
        return patched_shape(model.network.config.in_channels, height, width, f, p,
                             f"the VAE's factor {f} times the transformer's patch size {p}")

    def max_sequence_length(self, model) -> int | None:
        return 512  # StableDiffusion3Pipeline's check_inputs

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        p = int(model.network.config.patch_size)
        return (h // p) * (w // p)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_sd3_pipeline(texts, seed=seed, image_size=image_size, pipeline=self.name)


def tiny_sd3_pipeline(texts: list[str] | None = None, t5: bool = False, seed: int = 0, image_size: int = 32,
                      shift: float = 3.0, max_sequence_length: int = 16, pipeline: str = PIPELINE) -> TextToImageModel:
    """A randomly initialised ``StableDiffusion3Pipeline`` model: two CLIP encoders with projection (widths 32),
    optionally a small T5, an ``SD3Transformer2DModel`` over image / 4 latents, ``FlowMatchEulerDiscreteScheduler``
    with ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    texts = texts or ["a red sneaker", "a green bag", "a blue dress", "a photo of a cat"]
    toks = [build_tokenizer(texts, max_length=12) for _ in range(3 if t5 else 2)]
    encs = [small_text_encoder(len(toks[i]), hidden=32, max_length=12, projection_dim=16, seed=seed + i)
            for i in range(2)]
    encs.append(small_t5_encoder(len(toks[2]), 64, seed=seed + 2) if t5 else None)
    toks += [] if t5 else [None]
    tr = small_sd3_transformer(image_size // 4, joint_attention_dim=64, pooled_dim=32, seed=seed + 3)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    prompts = SD3PromptEncoder(encs, toks, 64, max_sequence_length)
    return TextToImageModel(SD3Denoiser(tr, sched), flow_vae(image_size, 4, seed + 4, 0.1), prompts.eval(),
                            {"pipeline": pipeline})


def sd3_text_side(bpe: dict, hidden: int = 64, layers: int = 2, heads: int = 4, max_length: int = 8,
                  projection_dim: int = 32, max_sequence_length: int = 256, seed: int = 0):
    """SD3's text side for a small model: two seeded-and-frozen CLIP encoders with projection over one learnt
    tokenizer, no T5 (the pipeline pads with ``max_sequence_length`` zero tokens); the joint attention width is the
    two encoders' widths together."""
    toks = [clip_tokenizer(bpe, max_length=max_length) for _ in range(2)]
    encs = [small_text_encoder(len(toks[i]), hidden, layers, heads, max_length, projection_dim, seed=seed + i)
            .requires_grad_(False) for i in range(2)]
    return SD3PromptEncoder([*encs, None], [*toks, None], 2 * hidden, max_sequence_length).eval()
