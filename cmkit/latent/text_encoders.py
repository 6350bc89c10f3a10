"""The text side of a latent text-to-image model: CLIP tokenizers and text encoders (through ``transformers``) and
prompt encoding exactly as diffusers' Stable Diffusion pipelines do it, for both layouts:

- SD 1.x / 2.x: one encoder; the prompt embedding is its last hidden state; the unconditional prompt is ``""``.
- SDXL: two encoders, the penultimate hidden states of both concatenated along features, the pooled (projected)
  embedding of the second, and six "time ids" ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; with no
  negative prompt and ``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros.

Tokenizers for tiny models are learnt offline over a prompt vocabulary (a small deterministic BPE learner) and read
through ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _words(text: str) -> list[str]:
    """Words as CLIP's tokenizer splits lower-cased ASCII text: letter runs, single digits, runs of other marks."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", " ".join(text.lower().split()))


def learn_bpe(texts: list[str], vocab_size: int = 1000) -> dict:
    """A CLIP-style BPE vocabulary learnt from ``texts``: ids 0 and 1 for start / end of text, the characters (and
    word-final characters, ``x</w>``), then one token per merge, most frequent pair first and ties broken by the
    pair's spelling, so the same texts always give the same vocabulary (the ``tokenizers`` library's learner breaks
    ties in no fixed order, and a run must rebuild its tokenizer exactly). Returns
    ``{"vocab": {token: id}, "merges": ["a b", ...]}``."""
    from collections import Counter

    counts = Counter(w for t in texts for w in _words(t))
    if not counts:
        raise ValueError("building a tokenizer needs at least one text with a word in it")
    seqs = {w: (*w[:-1], w[-1] + "</w>") for w in counts}
    vocab = [BOS, EOS] + sorted({c for seq in seqs.values() for c in seq})
    merges = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab.append(best[0] + best[1])
        seqs = {w: _merge(seq, best) for w, seq in seqs.items()}
    return {"vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges}


def _merge(seq: tuple, pair: tuple) -> tuple:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def clip_tokenizer(bpe: dict, max_length: int = 16):
    """``transformers.CLIPTokenizer`` over a vocabulary from ``learn_bpe``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(bpe["merges"]) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def build_tokenizer(texts: list[str], max_length: int = 16, vocab_size: int = 1000):
    """A CLIP tokenizer learnt offline from ``texts`` (``learn_bpe`` then ``clip_tokenizer``)."""
    return clip_tokenizer(learn_bpe(texts, vocab_size), max_length)


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


def prompt_list(prompts) -> list[str]:
    """One prompt or a list of them, as a non-empty list of strings (a one-line error otherwise)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return prompts


def negatives_for(prompts: list[str], negative_prompts) -> list[str]:
    """The negative prompts for ``prompts``: ``""`` by default, one string for all, or one per prompt."""
    negative_prompts = "" if negative_prompts is None else negative_prompts
    negs = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negs) != len(prompts):
        raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts; give one per prompt or a single "
                         "string")
    return negs


def tokenize(tok, texts: list[str], max_length: int, **kw):
    """The tokenizer's output (``input_ids``, ``attention_mask``) padded to ``max_length`` and truncated there, as
    diffusers' pipelines tokenize, with the same warning where a prompt was cut (the text dropped and the length
    it was cut to)."""
    tokens = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt",
                 **kw)
    ids = tokens.input_ids
    full = tok(texts, padding="longest", return_tensors="pt", **kw).input_ids
    if full.shape[-1] > ids.shape[-1] or (full.shape[-1] == ids.shape[-1] and not torch.equal(full, ids)):
        cut = tok.batch_decode(full[:, max_length - 1: -1])
        warnings.warn(f"prompts longer than {max_length} tokens were truncated (the encoder takes {max_length}); "
                      f"dropped: {[c for c in cut if c.strip()]}", stacklevel=3)
    return tokens


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
