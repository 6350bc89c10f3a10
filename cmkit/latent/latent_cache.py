"""A dataset encoded once: VAE posteriors of every image and the prompt embedding of every distinct caption, cached
on disk as safetensors under a key made of the VAE's weights, the text encoders' weights and the data itself, so a
second run (or a resumed one, or a distillation of the same teacher on the same data) reads instead of encodes. The
key is stored inside the file too: a file whose key or shapes do not match (swapped, copied from another data set),
or that cannot be read (truncated), is encoded again with a one-line note."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.files import cache_write, note

CACHE_KEY = "cmkit_cache_key"  # the file's own key, in its safetensors metadata


@dataclass
class EncodedSet:
    mean: torch.Tensor        # (n, C, h, w) VAE posterior means, unscaled
    std: torch.Tensor         # (n, C, h, w) posterior standard deviations
    caption_index: torch.Tensor  # (n,) row of each image's caption in ``embeds``
    captions: list[str]       # the distinct captions, in ``embeds`` order
    embeds: dict              # the prompt encoder's output for every distinct caption (negatives: one row)

    def cond(self, rows: torch.Tensor) -> dict:
        """Positive conditioning for images ``rows``: embeddings (and SDXL's pooled embeddings and time ids)."""
        idx = self.caption_index[rows]
        return {k: v[idx] for k, v in self.embeds.items() if not k.startswith("negative_")}

    def batch(self, n: int, device, normalisation, prompt_dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
        """``n`` training examples drawn with torch's global generator: latents sampled from their posteriors and
        normalised as the model sees them (``normalisation``: ``(offset, scale)`` of
        ``autoencoder.latent_normalisation``), and their prompts' conditioning, a ``prompt_dropout`` share of it
        unconditional."""
        rows = torch.randint(0, len(self.mean), (n,))
        z = self.mean[rows] + self.std[rows] * torch.randn(self.mean[rows].shape)
        cond = self.cond(rows)
        if prompt_dropout > 0:
            drop = torch.rand(n) < prompt_dropout
            for key, uncond in self.unconditional(n).items():
                cond[key] = torch.where(drop.view(-1, *[1] * (uncond.ndim - 1)), uncond, cond[key])
        offset, scale = normalisation
        return ((z - offset) * scale).to(device), {k: v.to(device) for k, v in cond.items()}

    def negatives(self, n: int) -> dict:
        """The negative conditioning for ``n`` samples, under the negative keys (for a guided teacher)."""
        return {k: v[:1].expand(n, *v.shape[1:]) for k, v in self.embeds.items() if k.startswith("negative_")}

    def unconditional(self, n: int) -> dict:
        """The negative ("" or zeros) conditioning for ``n`` samples, under the positive keys."""
        # keys without a negative (SDXL's time ids) are the same for every prompt
        return {k: self.embeds.get("negative_" + k, v)[:1].expand(n, *v.shape[1:]) for k, v in self.embeds.items()
                if not k.startswith("negative_")}


def _embed_captions(prompt_encoder, captions: list[str], batch_size: int) -> dict:
    """Every distinct caption's embedding, in batches; the negatives ("" or zeros, the same for all) once. (A
    prompt encoder that gives no negatives, Flux's, is asked for ``""``'s: the unconditional prompt of dropout.)"""
    parts = [_embed_with_negatives(prompt_encoder, captions[i: i + batch_size])
             for i in range(0, len(captions), batch_size)]
    return {k: (torch.cat([p[k] for p in parts]) if not k.startswith("negative") else parts[0][k][:1]).cpu()
            for k in parts[0]}


def _embed_with_negatives(prompt_encoder, captions: list[str]) -> dict:
    cond = prompt_encoder(captions)
    return cond if "negative_prompt_embeds" in cond else prompt_encoder(captions, [""] * len(captions))


def cache_root() -> Path:
    return Path(os.environ.get("CMKIT_CACHE", Path.home() / ".cache" / "cmkit")) / "latents"


def _weights_hash(h, module: torch.nn.Module) -> None:
    """Feed ``module``'s weights to ``h``. A LoRA adapter's tensors are left out and peft's ``base_layer`` names
    read as the plain ones, so a base network with an adapter on it hashes as the base alone."""
    state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(*modules: torch.nn.Module) -> str:
    """A short SHA-256 of the modules' weights (adapters left out): what a model trained on a base records of it,
    so a base whose weights changed since (same shapes) is noticed. A model loaded into bf16 / fp16 answers with
    the digest of its weights as stored (``source_digest``, taken when it was read)."""
    if len(modules) == 1 and "source_digest" in modules[0].__dict__:
        return modules[0].__dict__["source_digest"]
    h = hashlib.sha256()
    for module in modules:
        _weights_hash(h, module)
    return h.hexdigest()[:24]


def cache_key(vae, prompt_encoder, images: torch.Tensor, captions: list[str]) -> str:
    h = hashlib.sha256()
    _weights_hash(h, vae)
    _weights_hash(h, prompt_encoder)
    h.update(repr(sorted(vae.config.items())).encode())
    for tok in prompt_encoder.tokenizers:
        if tok is not None:
            h.update(repr((sorted(tok.get_vocab().items()), tok.model_max_length)).encode())
    h.update(repr(prompt_encoder.settings()).encode())
    h.update(images.cpu().numpy().tobytes())
    h.update("\n".join(captions).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def encode_set(vae, prompt_encoder, images: torch.Tensor, captions: list[str],
               batch_size: int = 256, progress: bool = True, cache: bool = True) -> EncodedSet:
    """Encode ``images`` (in [-1, 1]) and ``captions`` (one per image), or read them from the cache."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; every image needs one caption")
    images = images.contiguous()
    key = cache_key(vae, prompt_encoder, images, captions)
    path = cache_root() / f"{key}.safetensors"
    distinct = sorted(set(captions))
    if cache and path.is_file():
        found = read_cached(path, key, len(images), len(distinct))
        if found is not None:
            return EncodedSet(found["mean"], found["std"], found["caption_index"], distinct, found["embeds"])
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode images", disable=not progress,
                  dynamic_ncols=True):
        dist = vae.encode(images[i: i + batch_size].to(vae.device, torch.float32)).latent_dist
        # the VAE's convolutions may hand back channels-last memory; a fresh encode and a cache read must give the
        # UNet the same layout, or its convolutions round differently and a resumed run drifts from an unbroken one
        means.append(dist.mean.cpu().contiguous())
        stds.append(dist.std.cpu().contiguous())
    row = {c: i for i, c in enumerate(distinct)}
    index = torch.tensor([row[c] for c in captions], dtype=torch.long)
    embeds = _embed_captions(prompt_encoder, distinct, batch_size)
    out = EncodedSet(torch.cat(means), torch.cat(stds), index, distinct, embeds)
    if cache:
        tensors = {"mean": out.mean.contiguous(), "std": out.std.contiguous(), "caption_index": index,
                   **{f"embeds.{k}": v.contiguous() for k, v in embeds.items()}}
        cache_write(path, lambda tmp: save_file(tensors, tmp, metadata={CACHE_KEY: key}))
    return out


def read_cached(path: Path, key: str, n_images: int, n_captions: int) -> dict | None:
    """The tensors of cache file ``path`` if it is the encoding of key ``key`` (``n_images`` images,
    ``n_captions`` distinct captions); None, with a one-line note, where it is unreadable or holds something else."""
    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get(CACHE_KEY)
        t = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error (or OSError) for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        note(f"latent cache {path} is unreadable ({type(e).__name__}: {first}; truncated?); encoding the data "
             "again")
        return None
    embeds = {k[len("embeds."):]: v for k, v in t.items() if k.startswith("embeds.")}
    rows = [v.shape[0] for k, v in embeds.items() if not k.startswith("negative_")]
    fits = (all(k in t for k in ("mean", "std", "caption_index")) and len(t["mean"]) == len(t["std"]) == n_images
            and tuple(t["caption_index"].shape) == (n_images,) and rows and all(r == n_captions for r in rows))
    if stored != key or not fits:
        why = (f"the key {stored}" if stored else "no key") if stored != key else "tensors of other shapes"
        note(f"latent cache {path} holds {why}, not the encoding of this data and these encoders "
             "(swapped or copied from elsewhere); encoding the data again")
        return None
    return {"mean": t["mean"], "std": t["std"], "caption_index": t["caption_index"], "embeds": embeds}
