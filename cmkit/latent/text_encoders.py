"""What every family's prompt encoder shares: prompt lists and their negatives, tokenisation as diffusers'
pipelines tokenise (padded and truncated, with their warning where a prompt was cut), small CLIP text encoders
(through ``transformers``) and offline tokenizers. How a family turns tokens into its conditioning lives in its own
file under ``families/``.

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


def byte_tokenizer(cls: str, specials: list[str], chat_template: str | None = None, **special_tokens):
    """An offline tokenizer of the ``transformers`` class ``cls`` (``Qwen2Tokenizer``, ``GemmaTokenizer``, ...) for
    tiny language-model text encoders: byte-level BPE with no merges (one token per UTF-8 byte, so every text,
    template and language tokenises, deterministically), then ``specials`` (each one token; ``special_tokens`` names
    their roles: ``eos_token="<|endoftext|>"``) and ``chat_template`` (the Jinja template ``apply_chat_template``
    renders). Saved and read back through the class's own ``from_pretrained`` as a pipeline folder's tokenizer."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in specials:
        vocab[t] = len(vocab)
    unk = special_tokens.get("unk_token")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    out = getattr(transformers, cls)(tokenizer_object=tok, **special_tokens)
    if chat_template is not None:
        out.chat_template = chat_template
    return out


class OneEncoderPrompts(torch.nn.Module):
    """What a prompt encoder of one language-model text encoder holds (Qwen-Image's, Z-Image's, Wan's): the encoder,
    its tokenizer and the prompt tokens asked for (``max_sequence_length``, the class's ``default_length`` unless
    given), and ``settings()``, what besides the weights decides the embeddings (the latent cache's key; a family
    adds its template and the like)."""

    pipeline = ""
    default_length = 512

    def __init__(self, text_encoder: torch.nn.Module, tokenizer, max_sequence_length: int | None = None):
        super().__init__()
        self.text_encoder, self.tokenizers = text_encoder, [tokenizer]
        self.max_sequence_length = int(self.default_length if max_sequence_length is None else max_sequence_length)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def settings(self) -> tuple:
        return (self.pipeline, self.max_sequence_length)


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
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a command line's undecodable bytes arrive as lone surrogates
            raise ValueError(f"prompt {i + 1} ({p!r}) is not valid UTF-8 text; write it in UTF-8") from None
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
    full = tok(texts, padding="longest", return_tensors="pt", **kw)
    # each prompt's own tokens (the mask: padding on either side is no prompt text), beyond what the encoder keeps;
    # the last kept position holds the end token where the tokenizer adds one, as CLIP's truncation does
    real = [ids[mask.bool()] for ids, mask in zip(full.input_ids, full.attention_mask, strict=True)]
    cut = [tok.decode(r[max_length - 1: -1], skip_special_tokens=True) for r in real if len(r) > max_length]
    if cut:
        first = next((c for c in cut if c.strip()), "")
        first = first if len(first) <= 60 else f"{first[:57]}... ({len(first)} characters)"  # one short line
        warnings.warn(f"{len(cut)} prompt{'s' if len(cut) != 1 else ''} longer than {max_length} tokens were "
                      f"truncated (the encoder takes {max_length}); dropped, first: {first!r}", stacklevel=3)
    return tokens
