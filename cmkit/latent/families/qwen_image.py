"""Qwen-Image (``QwenImagePipeline``): a ``QwenImageTransformer2DModel`` over 2x2-packed latents (rotary positions
from ``img_shapes``), predicting the flow velocity at time t; prompts encoded as the pipeline encodes them (the
Qwen2.5-VL chat template around the prompt, the last hidden state of the masked tokens, the template's first 34 tokens
dropped, at most ``max_sequence_length`` tokens, with an attention mask over the padding); the scheduler's
resolution-dependent ``mu`` shift over ``linspace(1, 1/N, N)``; "true" classifier-free guidance with a negative prompt
whose guided velocity is rescaled, per packed token, to the norm of the conditional velocity.

What cmkit's ``guidance_scale`` means here: the pipeline's ``true_cfg_scale``, with the negative prompt ``" "`` (one
space, the model card's) unless ``negative_prompts`` are given; at 1 it is the unguided pipeline. The pipeline's own
``guidance_scale`` (an embedded guidance for guidance-distilled transformers, ``guidance_embeds``) has no working
network in diffusers (its ``QwenTimestepProjEmbeddings`` takes no guidance): such folders are refused.

The VAE (``AutoencoderKLQwenImage``) is a causal 3-D VAE with a frame axis and per-channel ``latents_mean`` /
``latents_std``; ``QwenImageVAE`` presents it to cmkit as a 4-D ``AutoencoderKL``-like VAE (one frame)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ...core import append_dims
from ..autoencoder import VAEView
from ..components import in_dtype
from ..denoiser import TextToImageModel
from ..family import patched_shape, register_family
from ..text_encoders import OneEncoderPrompts, byte_tokenizer, negatives_for, prompt_list
from .flow import FlowDenoiser, FlowFamily
from .flux import pack, packed_noise, unpack

PIPELINE = "QwenImagePipeline"
# QwenImagePipeline.__init__'s prompt_template_encode / prompt_template_encode_start_idx / tokenizer_max_length
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
MAX_TOKENS = 1024               # check_inputs: max_sequence_length cannot be greater than 1024
DEFAULT_NEGATIVE = " "          # the model card's negative prompt: a single space, not ""
DEFAULT_LENGTH = 512            # QwenImagePipeline.__call__'s max_sequence_length


class QwenImageVAE(VAEView):
    """``AutoencoderKLQwenImage`` (held as ``.vae``, what the pipeline is given) as cmkit's VAE code reads a VAE: 4-D
    images and latents (one frame: ``x[:, :, None]`` in, ``[:, :, 0]`` out), ``encode(x).latent_dist`` with ``.mean``
    / ``.std`` / ``.sample``, ``decode(z).sample``, and ``config`` with ``latent_channels`` (``z_dim``),
    ``block_out_channels`` (one per level, so ``2 ** (len - 1)`` is the pipeline's ``2 ** len(temperal_downsample)``),
    ``latents_mean`` / ``latents_std`` and ``scaling_factor = 1``: ``z = (E(x) - mean) / std``, as the pipeline
    decodes ``z * std + mean``."""

    def __init__(self, vae):
        super().__init__(vae)
        c = vae.config
        if len(c.dim_mult) != len(c.temperal_downsample) + 1:
            raise ValueError(f"a QwenImage VAE with dim_mult {list(c.dim_mult)} downsamples "
                             f"{len(c.dim_mult) - 1} times but temperal_downsample names {len(c.temperal_downsample)} "
                             "levels (the pipeline's factor); give one entry per downsampling level")

    @property
    def config(self):
        from diffusers.configuration_utils import FrozenDict

        c = self.vae.config
        return FrozenDict(latent_channels=int(c.z_dim), block_out_channels=tuple(c.base_dim * m for m in c.dim_mult),
                          in_channels=int(c.input_channels), out_channels=int(c.input_channels),
                          latents_mean=list(c.latents_mean), latents_std=list(c.latents_std), scaling_factor=1.0,
                          shift_factor=None)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        post = self.vae.encode(x.unsqueeze(2)).latent_dist
        dist = DiagonalGaussianDistribution(post.parameters[:, :, 0])  # the same mean / clamped log-variance, 4-D
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        x = self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]
        return DecoderOutput(sample=x) if return_dict else (x,)


def trimmed(embeds: torch.Tensor, mask: torch.Tensor | None):
    """The prompt embeddings cut to the batch's longest prompt, and their mask (None where nothing is padding): the
    shapes the pipeline hands its transformer (it pads a batch to its longest prompt and drops an all-ones mask).
    Padding further under the mask changes nothing (masked keys; the text's rotary positions count from the start),
    so the encoder pads to a fixed length (batches and the latent cache need one) and this undoes it."""
    if mask is None:
        return embeds, None
    used = mask.bool().any(0).nonzero()
    n = int(used.max()) + 1 if len(used) else 1
    embeds, mask = embeds[:, :n], mask[:, :n]
    return embeds, (None if bool(mask.bool().all()) else mask)


class QwenImageDenoiser(FlowDenoiser):
    timestep_scale = 1.0  # the pipeline passes t = timestep / 1000; the transformer scales it itself

    def _velocity(self, x_t, timestep, w, cond):
        b, _, h, w_ = x_t.shape
        embeds, mask = trimmed(cond["prompt_embeds"], cond.get("prompt_embeds_mask"))
        out = self.transformer(hidden_states=pack(x_t), timestep=timestep, encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w_ // 2)]] * b,
                               return_dict=False)[0]
        return unpack(out, h, w_)

    def _combine(self, z, sigma, x0_neg, x0_pos, w):
        """The pipeline's true CFG in velocity space, ``v = v_neg + w (v_pos - v_neg)``, rescaled per packed token
        (the 2x2 patch's 4C values, the pipeline's ``dim=-1``) to the conditional velocity's norm, back to x0."""
        s = append_dims(sigma, z.ndim)
        x_n = self.schedule.to_native(z, s)
        t = self.schedule.time(s).to(z.dtype)
        v_neg, v_pos = pack((x_n - x0_neg) / t), pack((x_n - x0_pos) / t)
        comb = v_neg + append_dims(w.to(z.dtype), 3) * (v_pos - v_neg)
        comb = comb * (torch.norm(v_pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return x_n - t * unpack(comb, *z.shape[-2:])


class QwenImagePromptEncoder(OneEncoderPrompts):
    """Prompts -> Qwen-Image's conditioning (``prompt_embeds`` and ``prompt_embeds_mask``, and the negatives'),
    padded with zeros to ``max_sequence_length`` tokens under the mask. Negatives are always given (``" "`` by
    default), so guidance above 1 is the pipeline's true CFG with that negative prompt."""

    pipeline = PIPELINE
    default_length = DEFAULT_LENGTH

    def settings(self) -> tuple:
        return (self.pipeline, self.max_sequence_length, TEMPLATE, DROP, DEFAULT_NEGATIVE)

    def _embed(self, texts: list[str]):
        tok = self.tokenizers[0](
            [TEMPLATE.format(t) for t in texts], max_length=MAX_TOKENS + DROP, padding=True, truncation=True,
            return_tensors="pt").to(self.device)
        # the language model under the generation head: its hidden states are the pipeline's (which also computes
        # the unused logits over the whole vocabulary)
        model = getattr(self.text_encoder, "model", self.text_encoder)
        hidden = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                       output_hidden_states=True).hidden_states[-1]
        n = self.max_sequence_length
        rows = [h[m.bool()][DROP:] for h, m in zip(hidden, tok.attention_mask, strict=True)]
        cut = [r.shape[0] - n for r in rows if r.shape[0] > n]
        if cut:
            warnings.warn(f"{len(cut)} prompt{'s' if len(cut) != 1 else ''} longer than {n} tokens were truncated "
                          f"(max_sequence_length {n}; up to {MAX_TOKENS}); {max(cut)} tokens dropped", stacklevel=3)
        embeds = hidden.new_zeros(len(rows), n, hidden.shape[-1])
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=hidden.device)
        for i, r in enumerate(rows):
            embeds[i, : min(len(r), n)] = r[:n]
            mask[i, : min(len(r), n)] = 1
        return embeds.to(self.text_encoder.dtype), mask

    @torch.no_grad()
    def forward(self, prompts, negative_prompts=None) -> dict:
        prompts = prompt_list(prompts)
        embeds, mask = self._embed(prompts)
        negs = negatives_for(prompts, DEFAULT_NEGATIVE if negative_prompts is None else negative_prompts)
        neg, neg_mask = self._embed(negs)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": neg,
                "negative_prompt_embeds_mask": neg_mask}


@register_family
class QwenImage(FlowFamily):
    name = PIPELINE
    encoders = ("text_encoder",)
    # the double-stream blocks' image and text attention and feed-forwards (Qwen-Image names them img_mlp / txt_mlp)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

    def load(self, path, index, dtype, clip_x0, load_kw):
        p = self.needed_parts(path, index, ["transformer", "vae", "scheduler", "text_encoder", "tokenizer"], load_kw)
        sched = self.checked_scheduler(path, p["scheduler"])
        tr, vae = in_dtype(p["transformer"], dtype), in_dtype(p["vae"], torch.float32)
        if tr.config.guidance_embeds:
            raise ValueError(f"{path}: the transformer has guidance_embeds=True, an embedded guidance diffusers' "
                             "QwenImageTransformer2DModel cannot run (its time embedding takes no guidance); cmkit "
                             "samples Qwen-Image with true CFG (guidance_scale is true_cfg_scale): set guidance_embeds "
                             "to false in transformer/config.json")
        if tr.config.in_channels != 4 * vae.config.z_dim:
            raise ValueError(f"{path}: the transformer takes {tr.config.in_channels} packed channels, 4x the VAE's "
                             f"{vae.config.z_dim} latent channels would be {4 * vae.config.z_dim}")
        prompts = QwenImagePromptEncoder(in_dtype(p["text_encoder"], dtype), p["tokenizer"])
        return TextToImageModel(QwenImageDenoiser(tr, sched, clip_x0), QwenImageVAE(vae.eval()), prompts.eval(),
                                {"pipeline": self.name})

    def pipeline(self, model):
        import diffusers

        pe = model.prompt_encoder
        vae = model.vae.vae if isinstance(model.vae, QwenImageVAE) else model.vae  # diffusers takes the 3-D VAE
        return diffusers.QwenImagePipeline(transformer=model.network, scheduler=model.scheduler, vae=vae,
                                           text_encoder=pe.text_encoder, tokenizer=pe.tokenizers[0])

    def default_image_size(self, model) -> int:
        return 128 * model.vae_scale_factor  # the pipeline's default_sample_size

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        f = model.vae_scale_factor
        return patched_shape(int(model.network.config.in_channels) // 4, height, width, f, 2,
                             f"the VAE's factor {f} times Qwen-Image's 2x2 packing")

    def max_sequence_length(self, model) -> int | None:
        return MAX_TOKENS

    def student_scheduler(self, model, scheduler):
        # a student samples 1 to 4 steps: without the terminal stretch, whose 1-step grid is 0/0 (NaN in the
        # pipeline too), the stretch being a many-step schedule's
        if scheduler.config.get("shift_terminal"):
            return type(scheduler).from_config(scheduler.config, shift_terminal=None)
        return scheduler

    def pipeline_latents(self, model, latents):
        return pack(latents)

    def fresh_noise(self, model, like):
        return packed_noise(like)

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        sigmas = super().grid(model, steps, spacing)
        if any(math.isnan(s) for s in sigmas):  # Qwen-Image's own scheduler at 1 step: 0/0 in the terminal stretch
            raise ValueError(f"the folder's scheduler has no {steps}-step grid (its shift_terminal "
                             f"{model.scheduler.config.get('shift_terminal')} stretches the grid to 0/0, NaN in "
                             "QwenImagePipeline too); sample with 2 or more steps, or a scheduler without "
                             "shift_terminal (Qwen-Image-Lightning's)")
        return sigmas

    def set_timesteps_kwargs(self, model, steps: int) -> dict:
        return {"num_inference_steps": steps, "sigmas": np.linspace(1.0, 1 / steps, steps)}  # always, as __call__

    def image_tokens(self, model) -> int:
        _, h, w = model.sample_shape
        return (h // 2) * (w // 2)

    def tiny(self, texts=None, image_size: int = 32, seed: int = 0):
        return tiny_qwen_image_pipeline(texts, seed=seed, image_size=image_size)


QWEN_IMAGE_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
# Qwen-Image-Lightning's few-step scheduler: a fixed exponential shift log 3 and no terminal stretch
LIGHTNING_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=math.log(3), max_shift=math.log(3),
                           base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=None,
                           time_shift_type="exponential")


def tiny_qwen_image_pipeline(texts: list[str] | None = None, seed: int = 0, image_size: int = 32,
                             max_sequence_length: int = DEFAULT_LENGTH,
                             scheduler: dict | None = None) -> TextToImageModel:
    """A randomly initialised ``QwenImagePipeline`` model: a one-layer Qwen2.5-VL text encoder (hidden 32) over a
    byte-level ``Qwen2Tokenizer`` (every text tokenises, so ``texts`` need not be known), a one-block
    ``QwenImageTransformer2DModel`` over 2x2-packed image / 4 latents, a two-level ``AutoencoderKLQwenImage`` with
    per-channel statistics, and Qwen-Image's scheduler settings (dynamic exponential shift, terminal 0.02; or
    ``scheduler``'s, e.g. ``LIGHTNING_SCHEDULER``)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    del texts  # a byte-level tokenizer needs no vocabulary learnt from the prompts
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = byte_tokenizer("Qwen2Tokenizer", specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        vocab_size=len(tok), hidden_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = Qwen2_5_VLForConditionalGeneration(cfg).eval()
        torch.manual_seed(seed + 1)
        tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         axes_dims_rope=(8, 4, 4))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                                     latents_std=[0.5, 0.8, 0.6, 1.2])
    sched = FlowMatchEulerDiscreteScheduler(**(QWEN_IMAGE_SCHEDULER if scheduler is None else scheduler))
    model = TextToImageModel(QwenImageDenoiser(tr, sched), QwenImageVAE(vae.eval()),
                             QwenImagePromptEncoder(enc, tok, max_sequence_length).eval(), {"pipeline": PIPELINE})
    model.image_size = image_size
    return model
