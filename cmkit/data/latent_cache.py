"""Captioned images encoded once: the VAE posterior of every image and the prompt embedding of every distinct caption,
cached on disk as safetensors shards, one per source shard (a caption source lists its shards: see
``cmkit.data.caption_sources``), each under a key made of the VAE's weights, the text encoders' weights and the
shard's own identity. A second run, a resumed one or another distillation of the same teacher on the same data reads
instead of encodes; a killed encode keeps every shard it finished (each written atomically). Under several processes
each encodes its own share of the missing shards, the others wait, and then every process opens all of them.

Shards are never loaded whole: a batch reads its own rows from them (``core.tensor_rows``). The key is stored inside
each file too: a file whose key or shapes do not match (swapped, copied from another data set), or that cannot be read
(truncated), is encoded again with a one-line note. Samples a source could not read are counted in the shard and
reported on every run.

The encoders are handed in (a VAE module with ``encode`` and ``config``; a prompt encoder module called as
``encoder(prompts[, negatives]) -> conditioning dict``, with ``tokenizers`` and ``settings()``): nothing here knows
the latent stack, and ``caption_encoder`` is what the job layer hands an objective."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.digests import weights_hash
from ..core.files import cache_write, note
from ..core.processes import barrier, rank_world
from ..core.tensor_rows import open_safetensors
from .caption_sources import CUT_SHORT, ArraySource, read_shards, source_size

CACHE_KEY = "cmkit_cache_key"  # the file's own key, in its safetensors metadata
# a shard's tensors: per image (mean, std, caption_index, and SDXL's add_time_ids when the encoder gives them)
IMAGE_KEYS = ("mean", "std", "caption_index")
MAX_LATENT = 1e4  # no VAE's posterior mean or std comes near this; a cached value beyond it was not encoded here


class CacheShard:
    """One cached shard, left on disk: rows of latents, each row's caption index into the shard's own embeddings."""

    def __init__(self, path: Path, tensors: dict, meta: dict):
        self.path, self.t = path, tensors
        self.rows = int(meta.get("rows", 0))
        self.captions = json.loads(meta.get("captions", "[]"))
        self.skipped = json.loads(meta.get("skipped", "[]"))
        self.embed_keys = sorted(k[len("embeds."):] for k in tensors if k.startswith("embeds."))


class EncodedSet:
    """The cached encoding of a caption source, read row by row from its shards on disk."""

    def __init__(self, shards: list[CacheShard]):
        self.shards = [s for s in shards if s.rows]
        self.skipped = [why for s in shards for why in s.skipped]
        if not self.shards:
            why = f"{len(self.skipped)} sample(s) skipped; first: {self.skipped[0]}" if self.skipped else \
                "the data holds no samples"
            raise ValueError(f"no readable captioned images in the data ({why})")
        self.starts = np.cumsum([0] + [s.rows for s in self.shards])
        self.per_image_time_ids = "add_time_ids" in self.shards[0].t
        self.data_shards: dict | None = None  # ``shard_record`` of the source, for a run's checkpoint

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.shards[0].t["mean"].shape[1:]

    def _split(self, rows: torch.Tensor):
        """``(shard, where in rows, local rows)`` for each shard a set of global ``rows`` touches."""
        rows = rows.numpy()
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(owner):
            where = np.nonzero(owner == s)[0]
            yield self.shards[s], torch.from_numpy(where), rows[where] - self.starts[s]

    def _gather(self, rows: torch.Tensor, pick) -> dict:
        """``{name: tensor}`` over global ``rows``, each shard's part from ``pick(shard, local rows)``."""
        out = {}
        for shard, where, local in self._split(rows):
            for name, part in pick(shard, local).items():
                if name not in out:
                    out[name] = torch.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
                out[name][where] = part
        return out

    def _cond_of(self, shard: CacheShard, local) -> dict:
        idx = shard.t["caption_index"].rows(local).numpy()
        cond = {k: shard.t[f"embeds.{k}"].rows(idx) for k in shard.embed_keys if not k.startswith("negative_")}
        if self.per_image_time_ids:
            cond["add_time_ids"] = shard.t["add_time_ids"].rows(local).to(cond["prompt_embeds"].dtype)
        return cond

    def cond(self, rows: torch.Tensor) -> dict:
        """Positive conditioning for images ``rows``: embeddings (and SDXL's pooled embeddings and time ids)."""
        return self._gather(rows, self._cond_of)

    def batch(self, n: int, device, normalisation, prompt_dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
        """``n`` training examples drawn with torch's global generator: latents sampled from their posteriors and
        normalised as the model sees them (``normalisation``: ``(offset, scale)`` of
        ``autoencoder.latent_normalisation``), and their prompts' conditioning, a ``prompt_dropout`` share of it
        unconditional (SDXL's time ids, which describe the image, are kept)."""
        rows = torch.randint(0, len(self), (n,))
        moments = self._gather(rows, lambda s, local: {"mean": s.t["mean"].rows(local), "std": s.t["std"].rows(local)})
        z = moments["mean"] + moments["std"] * torch.randn(moments["mean"].shape)
        cond = self.cond(rows)
        if prompt_dropout > 0:
            drop = torch.rand(n) < prompt_dropout
            for key, uncond in self.unconditional(n).items():
                if key == "add_time_ids" and self.per_image_time_ids:
                    continue
                cond[key] = torch.where(drop.view(-1, *[1] * (uncond.ndim - 1)), uncond, cond[key])
        offset, scale = normalisation
        return ((z - offset) * scale).to(device), {k: v.to(device) for k, v in cond.items()}

    def _first_rows(self) -> dict:
        return {k: self.shards[0].t[f"embeds.{k}"].rows([0]) for k in self.shards[0].embed_keys}

    def negatives(self, n: int) -> dict:
        """The negative conditioning for ``n`` samples, under the negative keys (for a guided teacher)."""
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._first_rows().items() if k.startswith("negative_")}

    def unconditional(self, n: int) -> dict:
        """The negative ("" or zeros) conditioning for ``n`` samples, under the positive keys."""
        first = self._first_rows()
        # keys without a negative (SDXL's time ids) are the same for every prompt
        return {k: first.get("negative_" + k, v).expand(n, *v.shape[1:]) for k, v in first.items()
                if not k.startswith("negative_")}

    # whole-set views, for the small sets a teacher is trained on and for tests: these load every shard
    @property
    def mean(self) -> torch.Tensor:
        return torch.cat([s.t["mean"].all() for s in self.shards])

    @property
    def std(self) -> torch.Tensor:
        return torch.cat([s.t["std"].all() for s in self.shards])

    @property
    def captions(self) -> list[str]:
        return [c for s in self.shards for c in s.captions]

    @property
    def embeds(self) -> dict:
        keys = self.shards[0].embed_keys
        return {k: (torch.cat([s.t[f"embeds.{k}"].all() for s in self.shards]) if not k.startswith("negative_")
                    else self.shards[0].t[f"embeds.{k}"].all()) for k in keys}


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


def encoders_key(vae, prompt_encoder) -> str:
    """What decides an encoding besides the data: the VAE's and text encoders' weights and configs, the tokenizers
    and the prompt encoder's settings."""
    h = hashlib.sha256()
    weights_hash(h, vae)
    weights_hash(h, prompt_encoder)
    h.update(repr(sorted(vae.config.items())).encode())
    for tok in prompt_encoder.tokenizers:
        if tok is not None:
            h.update(repr((sorted(tok.get_vocab().items()), tok.model_max_length)).encode())
    h.update(repr(prompt_encoder.settings()).encode())
    return h.hexdigest()[:24]


def shard_key(encoders: str, source_key: str) -> str:
    return hashlib.sha256(f"{encoders}|{source_key}".encode()).hexdigest()[:24]


@torch.no_grad()
def encode_source(vae, prompt_encoder, source, batch_size: int = 256, workers: int = 0,
                  progress: bool = True) -> EncodedSet:
    """The cached encoding of ``source`` (a ``CaptionSource``): its missing shards encoded (this process's share of
    them, in batches of ``batch_size`` images, read by ``workers`` dataloader workers), then every shard opened."""
    encoders = encoders_key(vae, prompt_encoder)
    source_keys = source.shard_keys()
    keys = [shard_key(encoders, k) for k in source_keys]
    paths = [cache_root() / f"{k}.safetensors" for k in keys]
    rank, world = rank_world()
    # in-memory images keep their own height and width; every other source crops to its (height, width)
    latent = expected_latent(vae, source_size(source), int(getattr(source, "num_frames", 0) or 0))
    # shard i is process i % world's, whatever is cached: every process agrees on the split without talking
    opened = {i: open_shard(paths[i], keys[i], quiet=False, latent=latent) for i in range(rank, len(keys), world)}
    mine = [i for i, shard in opened.items() if shard is None]
    if mine:
        with _share_lock([keys[i] for i in mine]):
            # another run on the same data may have encoded them while this one waited
            mine = [i for i in mine if open_shard(paths[i], keys[i], quiet=True, latent=latent) is None]
            if mine:
                who = f" (process {rank} of {world}: its share)" if world > 1 else ""
                note(f"latent cache: encoding {len(mine)} of the {len(keys)} shard(s) of {source.name}{who}; "
                     "finished shards are kept if this is stopped")
                from_source = {i: (paths[i], keys[i]) for i in mine}
                _encode_shards(vae, prompt_encoder, source, from_source, batch_size, workers, progress)
    barrier()
    shards = []
    for i, (p, k) in enumerate(zip(paths, keys, strict=True)):  # headers read once: what was cached stays open
        shard = opened.get(i) or open_shard(p, k, quiet=True, latent=latent)
        if shard is None:
            raise RuntimeError(f"shard {i} of {source.name} was not encoded into {p} (did another process fail?); "
                               "run again: finished shards are kept")
        shards.append(shard)
    out = EncodedSet(shards)
    out.data_shards = shard_record(source.name, source_keys)  # a run's checkpoint records it (training.trainer)
    if rank == 0:
        _report_skipped(out, source.name)
    return out


def _shard_label(key: str) -> str:
    """A shard's name for a message, from its source key: a tar's file name, a dataset's row range or stream shard,
    an in-memory array's short hash."""
    kind, _, rest = key.partition(":")
    if kind == "tar":  # tar:PATH:size:mtime:image_size:crop:seed
        return Path(rest.rsplit(":", 5)[0]).name
    if kind == "hf":  # hf:fingerprint:WHERE:start:stop
        start, stop = rest.rsplit(":", 2)[1:]
        return f"rows {start}-{stop}"
    if kind == "hf-stream":
        return f"stream shard {rest.rsplit(':', 1)[1]}"
    return rest[:12] if kind == "array" else key[:40]


def shard_record(source_name: str, keys: list[str]) -> dict:
    """What a run's checkpoint records of the data it reads through the cache (``EncodedSet.data_shards``; compared
    at resume by ``training.checkpoints.shard_changes``): the source's name and each shard's label and identity (a
    digest of its source key: its file, size and time, or its rows), compact for JSON."""
    return {"source": source_name,
            "shards": [[_shard_label(k), hashlib.sha256(k.encode()).hexdigest()[:16]] for k in keys]}


def _report_skipped(out: EncodedSet, name: str) -> None:
    """One note for the shards cut short (the samples after each cut are gone), one for the samples left out."""
    cut = [why for why in out.skipped if f": {CUT_SHORT}" in why]
    samples = [why for why in out.skipped if f": {CUT_SHORT}" not in why]
    if cut:
        note(f"{len(cut)} shard(s) of {name} are {CUT_SHORT}, the samples after each cut missing ({len(out)} "
             f"samples kept; first: {cut[0]})")
    if samples:
        note(f"{len(samples)} sample(s) of {name} could not be read and are left out of training "
             f"({len(out)} kept; first: {samples[0]})")


@contextlib.contextmanager
def _share_lock(keys: list[str]):
    """Held while this process encodes the shards ``keys``: a second run started on the same data (same encoders,
    same share) waits for the first instead of encoding everything again beside it. A lock file per share, not per
    cache, so a run's processes encode their own shares side by side; the kernel drops it if its holder dies."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".encoding-{hashlib.sha256('|'.join(keys).encode()).hexdigest()[:16]}.lock"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        note(f"latent cache: another run is encoding the same shards (lock {path}); waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _encode_shards(vae, prompt_encoder, source, todo: dict, batch_size: int, workers: int, progress: bool) -> None:
    """Encode the shards ``todo`` (index -> (path, key)) and write each as it completes."""
    parts: dict[int, dict] = {}
    bar = tqdm(total=len(todo), desc=f"encode {source.name} shards", unit="shard", disable=not progress,
               dynamic_ncols=True)
    for chunk in read_shards(source, sorted(todo), batch_size, workers):
        acc = parts.setdefault(chunk.shard, {"mean": [], "std": [], "captions": [], "sizes": [], "skipped": []})
        if len(chunk.captions):
            dist = vae.encode(chunk.images.to(vae.device, torch.float32)).latent_dist
            # the VAE's convolutions may hand back channels-last memory; a fresh encode and a cache read must give
            # the UNet the same layout, or its convolutions round differently and a resumed run drifts
            acc["mean"].append(dist.mean.float().cpu().contiguous())
            acc["std"].append(dist.std.float().cpu().contiguous())
            acc["captions"] += chunk.captions
            acc["sizes"].append(chunk.sizes)
        acc["skipped"] += chunk.skipped
        if chunk.last:
            path, key = todo[chunk.shard]
            _write_shard(path, key, parts.pop(chunk.shard), prompt_encoder, batch_size, source_size(source))
            bar.update()
    bar.close()


def _write_shard(path: Path, key: str, acc: dict, prompt_encoder, batch_size: int, size: tuple[int, int]) -> None:
    meta = {CACHE_KEY: key, "rows": str(len(acc["captions"])), "skipped": json.dumps(acc["skipped"])}
    tensors = {}
    if acc["captions"]:
        distinct = sorted(set(acc["captions"]))
        row = {c: i for i, c in enumerate(distinct)}
        embeds = _embed_captions(prompt_encoder, distinct, batch_size)
        tensors = {"mean": torch.cat(acc["mean"]), "std": torch.cat(acc["std"]),
                   "caption_index": torch.tensor([row[c] for c in acc["captions"]], dtype=torch.long),
                   **{f"embeds.{k}": v.contiguous() for k, v in embeds.items()}}
        if "add_time_ids" in embeds:  # SDXL: each image's own original size and crop, at the training size
            sizes = torch.cat(acc["sizes"])
            target = torch.tensor([int(size[0]), int(size[1])]).expand(len(sizes), 2)  # (height, width)
            tensors["add_time_ids"] = torch.cat([sizes, target], 1).contiguous()
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"encoding gave non-finite values in {', '.join(bad)} (a VAE or text encoder in fp16 "
                             "overflowing?); nothing was cached: encode in float32")
        meta["captions"] = json.dumps(distinct)
    cache_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def expected_latent(vae, size: tuple[int, int], frames: int = 0) -> tuple[int | None, ...] | None:
    """The latent shape ``vae`` gives an image of ``size`` (height, width), or with ``frames`` a clip of that many
    frames; None where its config does not say. An image's: a diffusers ``AutoencoderKL``'s (``latent_channels``;
    each block of ``block_out_channels`` after the first halves the size). A clip's: the same, the spatial factor
    ``spatial_compression_ratio`` where the config has one (``z_dim`` for channels, ``dim_mult`` for blocks where it
    has those), and ``1 + (F - 1) // t`` latent frames for a ``temporal_compression_ratio`` /
    ``scale_factor_temporal`` t, else None (the frame count unchecked rather than guessed)."""
    config = getattr(vae, "config", None) or {}
    channels, blocks = config.get("latent_channels"), config.get("block_out_channels")
    if not frames:
        if not all(size) or not channels or not blocks:
            return None
        return (int(channels), *(int(side) // 2 ** (len(blocks) - 1) for side in size))
    channels, blocks = channels or config.get("z_dim"), blocks or config.get("dim_mult")
    factor = config.get("spatial_compression_ratio") or (2 ** (len(blocks) - 1) if blocks else None)
    if not all(size) or not channels or not factor:
        return None
    t = config.get("temporal_compression_ratio") or config.get("scale_factor_temporal")
    return (int(channels), 1 + (int(frames) - 1) // int(t) if t else None,
            *(int(side) // int(factor) for side in size))


def _shape(shape) -> str:
    return "x".join("?" if d is None else str(int(d)) for d in shape)


def _fits(shape, latent) -> bool:
    """Whether a stored latent ``shape`` is ``latent`` (None entries: any size, a clip's unknown frame count)."""
    return len(shape) == len(latent) and all(want is None or int(d) == want for d, want in zip(shape, latent,
                                                                                               strict=True))


SCAN_BYTES = 1 << 24  # the chunk a shard's check reads at a time: memory stays at 16 MB whatever the shard's size


def scan(tensor) -> tuple[float, float] | None:
    """``(smallest, largest)`` value of a floating-point ``StoredTensor`` over every row, None if any is NaN or inf:
    read in ``SCAN_BYTES`` chunks into one buffer (plain reads, not a memory map, so nothing stays resident), one
    vectorised ``aminmax`` per chunk."""
    count, item = int(np.prod(tensor.shape, dtype=np.int64)), tensor.np_dtype.itemsize
    buf = np.empty(min(count, max(1, SCAN_BYTES // item)), tensor.np_dtype)
    low, high = float("inf"), float("-inf")
    with open(tensor.path, "rb") as f:
        f.seek(tensor.offset)
        for start in range(0, count, len(buf)):
            part = buf[: min(len(buf), count - start)]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise ValueError(f"{tensor.path}: cut short (truncated?)")
            lo, hi = torch.aminmax(tensor._torch(part).float())
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                return None
            low, high = min(low, lo.item()), max(high, hi.item())
    return low, high


def doubtful(shard: CacheShard, latent: tuple[int, ...] | None) -> str | None:
    """Why a shard whose key is right still cannot be what this run's encoders wrote, else None: latents of another
    dtype or shape than ``latent`` (another image size's; a None entry matches any), or any row of its
    floating-point tensors (every row is read: ``scan``) holding non-finite values, or latents with a negative std or
    values no VAE gives."""
    if not shard.rows:
        return None
    mean, std = shard.t["mean"], shard.t["std"]
    if mean.dtype != torch.float32 or std.dtype != torch.float32:
        return f"latents of dtype {str(mean.dtype).removeprefix('torch.')}, not the float32 this cache writes"
    if latent is not None and not _fits(mean.shape[1:], latent):
        return (f"latents of shape {_shape(mean.shape[1:])}, not the {_shape(latent)} its VAE gives this run's "
                "images (another image size's?)")
    tensors = {"mean": mean, "std": std, **{f"embeds.{k}": shard.t[f"embeds.{k}"] for k in shard.embed_keys}}
    for name, tensor in tensors.items():
        if not tensor.dtype.is_floating_point or not len(tensor):
            continue
        span = scan(tensor)
        if span is None:
            return f"non-finite values (NaN or inf) in {name}"
        low, high = span
        if name in ("mean", "std") and (max(-low, high) > MAX_LATENT or (name == "std" and low < 0)):
            return f"absurd values in {name} (beyond +-{MAX_LATENT:g}, or a negative std), which no VAE gives"
    return None


def open_shard(path: Path, key: str, quiet: bool = False,
               latent: tuple[int, ...] | None = None) -> CacheShard | None:
    """The cached shard at ``path`` if it is the encoding of key ``key`` (and, checked over every row, what
    this run expects: latents of shape ``latent``, float32, finite, in range: ``doubtful``); None where it is
    missing, or (with a one-line note unless ``quiet``) unreadable or holding something else."""
    if not path.is_file():
        return None
    try:
        tensors, meta = open_safetensors(path)
        shard = CacheShard(path, tensors, meta)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        if not quiet:
            note(f"latent cache {path} is unreadable ({str(e).removeprefix(f'{path}: ').splitlines()[0][:120]}); "
                 "encoding it again")
        return None
    stored = meta.get(CACHE_KEY)
    n = shard.rows
    fits = (n == 0 or (all(k in tensors for k in IMAGE_KEYS) and len(tensors["mean"]) == len(tensors["std"]) == n
                       and tensors["caption_index"].shape == (n,) and shard.embed_keys
                       and all(len(tensors[f"embeds.{k}"]) == len(shard.captions) for k in shard.embed_keys
                               if not k.startswith("negative_"))))
    if stored != key or not fits:
        why = (f"the key {stored}" if stored else "no key") if stored != key else "tensors of other shapes"
        if not quiet:
            note(f"latent cache {path} holds {why}, not the encoding of this data and these encoders "
                 "(swapped or copied from elsewhere); encoding it again")
        return None
    try:
        why = doubtful(shard, latent)
    except (ValueError, OSError) as e:
        why = f"rows that cannot be read ({str(e).removeprefix(f'{path}: ')[:120]})"
    if why is not None:
        if not quiet:
            note(f"latent cache {path} holds {why}; encoding it again")
        return None
    return shard


def encode_set(vae, prompt_encoder, images: torch.Tensor, captions: list[str], batch_size: int = 256,
               progress: bool = True, shard_size: int = 4096) -> EncodedSet:
    """Encode ``images`` (in [-1, 1], held in memory) and ``captions`` (one per image), or read them from the
    cache."""
    return encode_source(vae, prompt_encoder, ArraySource(images, captions, shard_size=shard_size), batch_size,
                         progress=progress)


def caption_encoder(data, batch_size: int = 256, workers: int = 0):
    """What the job layer hands a latent kind (``BuildContext.encode_captions``): ``(vae, prompt_encoder) ->
    EncodedSet``, the captioned images of ``data`` (a ``Dataset`` or ``StreamedCaptions``) encoded by the encoders
    it is handed, through the cache (``encode_source``, ``batch_size`` images a batch, ``workers`` reading the
    source); None for data without captions. The objective brings the encoders and never sees a file."""
    source = data.caption_source() if hasattr(data, "caption_source") else None
    if source is None:
        return None

    def encode(vae, prompt_encoder) -> EncodedSet:
        return encode_source(vae, prompt_encoder, source, batch_size, workers)
    return encode
