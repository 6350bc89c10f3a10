"""The text side of a latent text-to-image model: CLIP tokenizers and text encoders (through ``transformers``) and
prompt encoding exactly as diffusers' Stable Diffusion pipelines do it, for both layouts:

- SD 1.x / 2.x: one encoder; the prompt embedding is its last hidden state; the unconditional prompt is ``""``.
- SDXL: two encoders, the penultimate hidden states of both concatenated along features, the pooled (projected)
  embedding of the second, and six "time ids" ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; with no
  negative prompt and ``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros.

Tokenizers for tiny models are built offline with the ``tokenizers`` library over a prompt vocabulary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(texts: list[str], max_length: int = 16, vocab_size: int = 1000):
    """A CLIP BPE tokenizer learnt offline from ``texts`` (lower-cased words, ``</w>`` word ends, ids 0 and 1 for
    start/end of text, end of text as padding), saved and read back as ``transformers.CLIPTokenizer``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    if not texts:
        raise ValueError("building a tokenizer needs at least one text")
    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                                       end_of_word_suffix="</w>", show_progress=False))
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def small_text_encoder(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, max_length: int = 16,
                       projection_dim: int | None = None, seed: int = 0):
    """A small CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection_dim`` is given, as SDXL's second
    encoder), randomly initialised from ``seed``; token ids 0/1 are start/end of text as ``build_tokenizer`` makes
    them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection_dim or hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)
    return model.eval()


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
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
            tokens = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                         return_tensors="pt")
            ids = tokens.input_ids.to(self.device)
            if not self.xl:
                # SD 2.x-style encoders that ask for it get the padding mask, as diffusers gives it
                mask = tokens.attention_mask.to(self.device) if enc.config.get("use_attention_mask") else None
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
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        cond = {}
        cond["prompt_embeds"], pooled = self._embed(prompts)
        if self.xl and (pooled is None or self.image_size is None):
            raise ValueError("an SDXL prompt encoder needs a second encoder with a projection and image_size")
        if negative_prompts is None and self.xl and self.force_zeros:
            neg, neg_pooled = torch.zeros_like(cond["prompt_embeds"]), torch.zeros_like(pooled)
        else:
            negative_prompts = "" if negative_prompts is None else negative_prompts
            negs = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts; give one per prompt or "
                                 "a single string")
            neg, neg_pooled = self._embed(negs)
        cond["negative_prompt_embeds"] = neg
        if self.xl:
            h, w = self.image_size
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond["prompt_embeds"].dtype, device=self.device)
            cond.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
                        add_time_ids=ids.expand(len(prompts), 6))
        return cond
