"""FLUX.2: ``Flux2KleinPipeline`` (klein) and ``Flux2Pipeline`` (dev), one ``Flux2Transformer2DModel`` over the VAE's
2x2-patchified latents, each patch one token with 4-axis position ids (time, row, column, layer), predicting the
flow velocity at time t, and the scheduler's ``mu`` from ``compute_empirical_mu`` (image tokens and step count) over
``linspace(1, 1/N, N)``. Prompts are encoded as each pipeline encodes them, padded / truncated to
``max_sequence_length`` tokens, three intermediate hidden states stacked along the feature axis:

- klein: Qwen3's chat template with thinking off, layers 9, 18 and 27; classifier-free guidance against the empty
  prompt (the pipeline takes no negative prompt; a step-distilled folder, ``is_distilled``, never guides);
- dev: Mistral 3's chat template (through its Pixtral processor) with the pipeline's system message, layers 10, 20
  and 30; the guidance scale fed to the transformer's guidance embedding in one pass (no negative prompt at all).

``AutoencoderKLFlux2`` normalises its latents after patchifying them, by its batch norm's running statistics: the
model's VAE is ``PatchedVAE``, which presents that patchified space as an ordinary 4-D latent space to everything in
cmkit (see its docstring); the pipelines are handed the real VAE."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..autoencoder import VAEView
from ..components import in_dtype
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import byte_tokenizer, prompt_list, tokenize
from .flow import FlowDenoiser, FlowFamily

KLEIN, DEV = "Flux2KleinPipeline", "Flux2Pipeline"
HIDDEN_LAYERS = {KLEIN: (9, 18, 27), DEV: (10, 20, 30)}  # the pipelines' text_encoder_out_layers defaults


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), as ``Flux2KleinPipeline._patchify_latents`` (channel c*4 + 2 dy + dx)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """The inverse of ``patchify``, as ``_unpatchify_latents``."""
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """(h * w, 4) int64 position ids of the patch tokens, row-major: (0, row, column, 0) (``_prepare_latent_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(n: int, device) -> torch.Tensor:
    """(n, 4) int64 position ids of the text tokens: (0, 0, 0, l) (``_prepare_text_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n)).to(device)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's scheduler shift ``mu`` (diffusers' ``compute_empirical_mu``): linear in the image tokens, fitted at
    10 and 200 steps and interpolated in the step count below 4300 tokens; the 200-step line above."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


class _PatchedPosterior:
    """The VAE's diagonal Gaussian posterior, read in the patchified layout (a permutation of its elements)."""

    def __init__(self, dist):
        self.dist = dist

    @property
    def mean(self) -> torch.Tensor:
        return patchify(self.dist.mean)

    @property
    def std(self) -> torch.Tensor:
        return patchify(self.dist.std)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return patchify(self.dist.sample(generator))


class _Encoded:
    def __init__(self, dist):
        self.latent_dist = _PatchedPosterior(dist)


class _Decoded:
    def __init__(self, sample):
        self.sample = sample


class PatchedVAE(VAEView):
    """``AutoencoderKLFlux2`` (``.vae``) as an ``AutoencoderKL``-like VAE of the latents the transformer sees: the
    2x2-patchified latents, ``(4C, H/16, W/16)``. ``encode(x).latent_dist`` has the patchified ``mean`` / ``std`` /
    ``sample``; ``decode(z)`` unpatchifies and decodes; ``config`` is the real one's with ``latent_channels`` 4C, one
    more halving in ``block_out_channels`` (the factor 16), ``scaling_factor`` 1 and the batch norm's per-channel
    running statistics as ``latents_mean`` / ``latents_std`` (``sqrt(running_var + batch_norm_eps)``), so cmkit's
    ``(z - mean) / std`` is the pipeline's normalisation and ``z * std + mean`` its de-normalisation before decoding.
    """

    @property
    def config(self):
        from diffusers.configuration_utils import FrozenDict

        c, bn = self.vae.config, self.vae.bn
        std = torch.sqrt(bn.running_var.float() + c.batch_norm_eps)  # in float32, as the pipeline computes it
        blocks = list(c.block_out_channels)
        return FrozenDict({**c, "latent_channels": 4 * c.latent_channels, "block_out_channels": blocks + blocks[-1:],
                           "scaling_factor": 1.0, "shift_factor": None,
                           "latents_mean": bn.running_mean.float().tolist(), "latents_std": std.tolist()})

    def encode(self, x: torch.Tensor) -> _Encoded:
        return _Encoded(self.vae.encode(x).latent_dist)

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(self.vae.decode(unpatchify(z)).sample)


class Flux2Denoiser(FlowDenoiser):
    """The FLUX.2 transformer over patch tokens. ``embedded``: dev's way, the guidance scale fed to the guidance
    embedding (always, 1 included, as ``Flux2Pipeline`` does); else klein's, ``guidance=None`` and classifier-free
    guidance; ``distilled``: a klein folder's ``is_distilled`` (never guided)."""

    timestep_scale = 1.0  # the pipeline passes t = timestep / 1000; the transformer multiplies by 1000 itself

    def __init__(self, transformer: nn.Module, scheduler, clip_x0: float | None = None, distilled: bool = False,
                 embedded: bool = False):
        super().__init__(transformer, scheduler, clip_x0)
        self.distilled, self.embedded = bool(distilled), bool(embedded)

    @property
    def embeds_guidance(self) -> bool:
        return self.embedded

    def _guided(self, negative_prompt_embeds, guidance_scale) -> bool:
        # a step-distilled klein ignores guidance_scale (the pipeline's do_classifier_free_guidance)
        return not self.distilled and super()._guided(negative_prompt_embeds, guidance_scale)

    def _velocity(self, x_t, timestep, w, cond):
        b, c, h, w_ = x_t.shape
        embeds = cond["prompt_embeds"]
        tokens = x_t.reshape(b, c, h * w_).permute(0, 2, 1)  # _pack_latents: row-major patch tokens
        out = self.transformer(
            hidden_states=tokens, timestep=timestep, guidance=w.float() if self.embedded else None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids(embeds.shape[1], x_t.device), img_ids=image_ids(h, w_, x_t.device),
            return_dict=False)[0]
        return out[:, : h * w_].permute(0, 2, 1).reshape(b, c, h, w_)


class Flux2PromptEncoder(nn.Module):
    """Prompts -> FLUX.2's conditioning: token ids from a subclass's ``_tokens`` (its pipeline's chat template),
    the text encoder's hidden states of ``layers`` stacked into ``(B, L, len(layers) * D)``."""

    pipeline = ""

    def __init__(self, encoder: nn.Module, tokenizer, max_sequence_length: int = 512, layers=None):
        super().__init__()
        self.encoder, self.tokenizers = encoder, [tokenizer]
        self.max_sequence_length = int(max_sequence_length)
        self.layers = tuple(HIDDEN_LAYERS[self.pipeline] if layers is None else layers)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def settings(self) -> tuple:
        # the chat template decides the tokens, and the latent cache's key reads only the vocabulary
        return (self.pipeline, self.max_sequence_length, self.layers, self.template)

    @property
    def template(self):
        return self.tokenizers[0].chat_template

    def _tokens(self, texts: list[str]):
        raise NotImplementedError

    def _embed(self, texts: list[str]) -> torch.Tensor:
        tokens = self._tokens(texts)
        # the base model alone: the hidden states are the pipeline's, without the vocabulary-sized logits
        out = self.encoder.model(input_ids=tokens["input_ids"].to(self.device),
                                 attention_mask=tokens["attention_mask"].to(self.device), output_hidden_states=True,
                                 use_cache=False)
        if max(self.layers) >= len(out.hidden_states):
            raise ValueError(f"the text encoder has {len(out.hidden_states) - 1} layers; a {self.pipeline} reads the "
                             f"hidden states of layers {list(self.layers)}: use the folder's own text encoder")
        stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=1).to(self.encoder.dtype)
        b, n, length, d = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)

    def _empty_negatives(self, negative_prompts, what: str) -> list[str]:
        negs = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts or [])
        if any(n != "" for n in negs):
            raise ValueError(f"a {self.pipeline} {what} (it takes no negative prompt); leave negative_prompts out")
        return negs


class Flux2KleinPromptEncoder(Flux2PromptEncoder):
    """As ``Flux2KleinPipeline.encode_prompt``: each prompt a user message through the tokenizer's chat template
    (generation prompt on, thinking off). The negative is always the empty prompt's (the pipeline's only
    unconditional prompt)."""

    pipeline = KLEIN

    def _tokens(self, texts):
        tok = self.tokenizers[0]
        chats = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) for t in texts]
        return tokenize(tok, chats, self.max_sequence_length)

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        self._empty_negatives(negative_prompts, "guides against the empty prompt only")
        return {"prompt_embeds": self._embed(prompts), "negative_prompt_embeds": self._embed([""] * len(prompts))}


class Flux2DevPromptEncoder(Flux2PromptEncoder):
    """As ``Flux2Pipeline.encode_prompt``: the pipeline's system message and each prompt (``[IMG]`` removed) as one
    conversation through the Pixtral processor's chat template (no generation prompt). ``processor`` is the folder's
    tokenizer component; ``tokenizers`` holds its text tokenizer. Negatives only where asked for, and only the empty
    prompt's (the latent cache's unconditional prompt): dev embeds guidance and has no negative prompt."""

    pipeline = DEV

    def __init__(self, encoder: nn.Module, processor, max_sequence_length: int = 512, layers=None):
        super().__init__(encoder, processor.tokenizer, max_sequence_length, layers)
        self.processor = processor

    @property
    def template(self):
        return self.processor.chat_template

    def _tokens(self, texts):
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        chats = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                  {"role": "user", "content": [{"type": "text", "text": t.replace("[IMG]", "")}]}] for t in texts]
        # the pipeline's padding and truncation, passed where transformers reads them without a warning per call
        kw = {"padding": "max_length", "truncation": True, "max_length": self.max_sequence_length}
        return self.processor.apply_chat_template(chats, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                  return_tensors="pt", processor_kwargs=kw)

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        cond = {"prompt_embeds": self._embed(prompts)}
        if self._empty_negatives(negative_prompts, "embeds its guidance scale"):
            cond["negative_prompt_embeds"] = self._embed([""] * len(prompts))
        return cond


class Flux2Family(FlowFamily):
    """What klein and dev share: the folder's parts, the patched VAE, sizes, the grid with its step-dependent mu."""

    encoders = ("text_encoder",)
    # the double blocks' image and text attention and feed-forwards, the single blocks' fused QKV + MLP input; their
    # output projection is named by index (a bare "to_out" also names the double blocks' to_out ModuleList, which peft
    # cannot adapt): FLUX.2 dev has 48 single blocks, klein 20 (4B) or 24 (9B); targets a model lacks are skipped
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                    "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)))

    def load(self, path, index, dtype, clip_x0, load_kw):
        p = self.needed_parts(path, index, ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"], load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if not hasattr(vae, "bn"):
            raise ValueError(f"{path}: the VAE is a {type(vae).__name__}; a {self.name} normalises latents by an "
                             "AutoencoderKLFlux2's batch norm: restore the folder's vae")
        if tr.config.in_channels != 4 * vae.config.latent_channels:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} patch channels, 4x the VAE's "
                             f"{vae.config.latent_channels} latent channels would be {4 * vae.config.latent_channels}")
        encoder = in_dtype(p["text_encoder"], dtype)
        # the pipeline's default of 512 tokens, within what the encoder's positions take
        n = min(512, positions(encoder))
        prompts, den = self._parts(encoder, p["tokenizer"], n, tr, sched, clip_x0, index)
        return TextToImageModel(den, PatchedVAE(vae.eval()), prompts.eval(), {"pipeline": self.name})

    def _parts(self, encoder, tokenizer, n: int, transformer, scheduler, clip_x0, index: dict):
        """The prompt encoder and the denoiser of this pipeline class."""
        raise NotImplementedError

    def fresh_noise(self, model, like):
        # the scheduler steps (B, h*w, 4C) tokens (``_pack_latents``): the noise is drawn in that order
        b, c, h, w = like.shape
        tokens = torch.randn(b, h * w, c, dtype=like.dtype, device=like.device)
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)

    def default_image_size(self, model) -> int:
        return 64 * model.vae_scale_factor  # the pipeline's default_sample_size 128 times the VAE's own factor 8

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        f = model.vae_scale_factor  # the VAE's factor times the 2x2 patches
        return patched_shape(int(model.network.config.in_channels), height, width, f, 1,
                             f"the VAE's factor {f // 2} times FLUX.2's 2x2 patches")

    def max_sequence_length(self, model) -> int | None:
        # the pipeline checks none; the text encoder's positions are the limit
        return positions(model.prompt_encoder.encoder)

    def grid_mu(self, model, scheduler, steps: int) -> float:
        # mu depends on the step count too (compute_empirical_mu); the pipeline passes it whether or not it is used
        return self.mu(model, steps)

    def set_timesteps_kwargs(self, model, steps: int) -> dict:
        if model.scheduler.config.get("use_flow_sigmas"):
            return {"num_inference_steps": steps}
        return {"sigmas": np.linspace(1.0, 1 / steps, steps)}

    def mu(self, model, steps: int = 50) -> float:
        return empirical_mu(self.image_tokens(model), steps)

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        return h * w



def positions(encoder) -> int:
    """The text encoder's positions (Mistral 3 keeps them in its text config)."""
    config = getattr(encoder.config, "text_config", None) or encoder.config
    return int(config.max_position_embeddings)


@register_family
class Flux2Klein(Flux2Family):
    name = KLEIN

    def _parts(self, encoder, tokenizer, n, transformer, scheduler, clip_x0, index):
        den = Flux2Denoiser(transformer, scheduler, clip_x0, distilled=bool(index.get("is_distilled", False)))
        return Flux2KleinPromptEncoder(encoder, tokenizer, n), den

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.Flux2KleinPipeline(scheduler=model.scheduler, vae=model.vae.vae, text_encoder=pe.encoder,
                                            tokenizer=pe.tokenizers[0], transformer=model.network,
                                            # a student folds guidance in: its folder says so, and the
                                            # pipeline then samples it unguided by default, as it must
                                            is_distilled=model.denoiser.distilled
                                            or bool(model.config.get("guidance_folded")))

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_flux2_klein_pipeline(texts, seed=seed, image_size=image_size)


@register_family
class Flux2Dev(Flux2Family):
    name = DEV

    def _parts(self, encoder, tokenizer, n, transformer, scheduler, clip_x0, index):
        return Flux2DevPromptEncoder(encoder, tokenizer, n), Flux2Denoiser(transformer, scheduler, clip_x0,
                                                                           embedded=True)

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        return diffusers.Flux2Pipeline(scheduler=model.scheduler, vae=model.vae.vae, text_encoder=pe.encoder,
                                       tokenizer=pe.processor, transformer=model.network)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_flux2_dev_pipeline(texts, seed=seed, image_size=image_size)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template as it renders one user message with add_generation_prompt and enable_thinking=False
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                 "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _tiny_parts(seed: int, image_size: int, joint_attention_dim: int, guidance: bool):
    """A small ``Flux2Transformer2DModel`` over 2x2 patches of a 4-channel ``AutoencoderKLFlux2`` (factor 8, random
    batch-norm statistics) and the dynamic-shift scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tr = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2,
                                     joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
                                     axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, sample_size=image_size)
        vae.bn.running_mean.normal_(0.0, 0.5)  # statistics the normalisation must get right, not 0 and 1
        vae.bn.running_var.uniform_(0.25, 4.0)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
    return tr, PatchedVAE(vae.eval()), sched


def tiny_flux2_klein_pipeline(texts: list[str] | None = None, seed: int = 0, image_size: int = 32,
                              max_sequence_length: int = 64, distilled: bool = False) -> TextToImageModel:
    """A randomly initialised ``Flux2KleinPipeline`` model: a 27-layer Qwen3 of width 16 (the pipeline reads layers
    9, 18 and 27) with a byte-level Qwen2 tokenizer and Qwen3's chat template, and ``_tiny_parts``. ``texts`` is
    unused (the byte tokenizer takes any text)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = byte_tokenizer("Qwen2TokenizerFast", QWEN_SPECIALS, QWEN_TEMPLATE, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Qwen3ForCausalLM(cfg).eval()
    tr, vae, sched = _tiny_parts(seed, image_size, 3 * 16, guidance=False)
    model = TextToImageModel(Flux2Denoiser(tr, sched, distilled=distilled), vae,
                             Flux2KleinPromptEncoder(encoder, tok, max_sequence_length).eval(), {"pipeline": KLEIN})
    model.image_size = image_size
    return model


MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral Small 3's chat template as it renders a system message and a user message of text parts
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif "
                    "m['role'] == 'user' %}[INST]{% endif %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                    "{{ c['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif "
                    "m['role'] == 'user' %}[/INST]{% endif %}{% endfor %}")


def tiny_flux2_dev_pipeline(texts: list[str] | None = None, seed: int = 0, image_size: int = 32,
                            max_sequence_length: int = 64) -> TextToImageModel:
    """A randomly initialised ``Flux2Pipeline`` (dev) model: a ``Mistral3ForConditionalGeneration`` whose language
    model has 30 layers of width 16 (the pipeline reads layers 10, 20 and 30) and a tiny Pixtral vision tower, a
    ``PixtralProcessor`` over a byte-level tokenizer with Mistral's chat template, and ``_tiny_parts`` with the
    guidance embedding."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    # the system message as one added token: every prompt starts with it, and bytes would make it ~180 tokens
    tok = byte_tokenizer("LlamaTokenizerFast", [*MISTRAL_SPECIALS, SYSTEM_MESSAGE], unk_token="<unk>",
                         bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=16,
                                 spatial_merge_size=1, chat_template=MISTRAL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "[IMG]")}
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                     "max_position_embeddings": 128, "num_attention_heads": 2, "num_hidden_layers": 30,
                     "num_key_value_heads": 1, "head_dim": 8, "sliding_window": None, "bos_token_id": ids["<s>"],
                     "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": 32, "patch_size": 16, "num_channels": 3},
        image_token_index=ids["[IMG]"], spatial_merge_size=1, vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Mistral3ForConditionalGeneration(cfg).eval()
    tr, vae, sched = _tiny_parts(seed, image_size, 3 * 16, guidance=True)
    model = TextToImageModel(Flux2Denoiser(tr, sched, embedded=True), vae,
                             Flux2DevPromptEncoder(encoder, processor, max_sequence_length).eval(), {"pipeline": DEV})
    model.image_size = image_size
    return model
