"""Training checkpoints: safetensors for every network and the optimiser, JSON for the rest, written atomically,
each with a manifest (size and SHA-256 of every file) that says whether it is intact.

Layout under ``OUT/checkpoints/``: ``step-00000200/`` folders and a ``latest`` file naming the newest one written.
A folder is written under a temporary name and renamed into place, read back against its manifest, and only then
is ``latest`` replaced (``os.replace``) and are older checkpoints pruned, so a crash or a bad disk at any moment
leaves an intact checkpoint behind. Resuming takes the newest folder that verifies and loads (``latest`` is only a
hint); a newer one that does not is reported in one line and skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..core.files import DiskFull, atomic_dir, atomic_write_text, clean_partial_writes, sha256_of
from ..core.processes import rank_world

KEEP = 2
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
_VERIFIED: set[tuple] = set()  # (folder, its files' names, sizes and times) read back in full by this process


class CheckpointError(ValueError):
    """No usable checkpoint where a run's checkpoints should be (a ValueError: the command line reports it in one
    line)."""


def warn(message: str) -> None:
    print(f"cmkit: {message}", file=sys.stderr, flush=True)


def _optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into safetensors-able tensors and a JSON-able rest. Nested state (bitsandbytes
    keeps its quantisation state in a dict per parameter) is flattened with ``/`` between the levels. A tensor that
    shares its storage with one already taken (8-bit Adam's quantisation maps are one tensor for every parameter,
    which safetensors refuses to write twice) is saved as a copy of its own; loading gives each parameter its own."""
    tensors, plain, storages = {}, {}, set()

    def put(key: str, v) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                put(f"{key}/{k}", sub)
        elif torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[key] = t.clone() if ptr in storages and t.numel() else t
            storages.add(ptr)
        else:
            plain[key] = v
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            put(f"{pid}.{k}", v)
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(rest["plain"].items()):
        pid, path = key.split(".", 1)
        *parents, leaf = path.split("/")
        node = state.setdefault(int(pid), {})
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_files(tmp: Path, nets: dict, optimizer, state: dict) -> None:
    """Every file of a checkpoint, then its manifest: the hashes are of the bytes in memory, so reading the folder
    back checks what reached the disk. ``nets`` values are modules or (a sharded run's gathered) state dicts;
    ``optimizer`` an optimiser, or a sharded run's list of every process's optimiser shard."""
    blobs = {f"{key}.safetensors": save(_weights(net) if isinstance(net, torch.nn.Module) else net)
             for key, net in nets.items()}
    shards = optimizer if isinstance(optimizer, list) else [optimizer.state_dict()]
    for rank, opt_state in enumerate(shards):
        name = "optimizer" if len(shards) == 1 else f"optimizer-rank-{rank}-of-{len(shards)}"
        opt_tensors, opt_rest = _optimizer_to_flat(opt_state)
        blobs[f"{name}.safetensors"] = save(opt_tensors)
        blobs[f"{name}.json"] = json.dumps(opt_rest).encode()
    blobs["state.json"] = json.dumps(state, indent=2).encode()
    for name, data in blobs.items():
        (tmp / name).write_bytes(data)
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in blobs.items()}
    (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=2))


def verify_checkpoint(path) -> str | None:
    """None when ``path`` is a checkpoint whose files all match its manifest; else what is wrong, in a few words.
    A folder from before manifests (no ``manifest.json`` but a ``state.json``) passes: loading it is its check."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    man = path / MANIFEST
    if not man.is_file():
        return None if (path / "state.json").is_file() else "incomplete (no manifest.json)"
    key = (str(path), *sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()))
    if key in _VERIFIED:
        return None
    try:
        files = json.loads(man.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is unreadable"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['size']}"
        if sha256_of(f) != want["sha256"]:
            return f"{name} fails its SHA-256 check"
    _VERIFIED.add(key)
    return None


def step_folders(root) -> list[Path]:
    """The ``step-NNNNNNNN`` folders under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), reverse=True)


def clean_checkpoints(root) -> list[str]:
    """Remove temporary entries a killed checkpoint write left under ``root``."""
    return clean_partial_writes(root, lambda name: name == "latest" or STEP_DIR.match(name) is not None)


def save_checkpoint(root, step: int, nets: dict[str, torch.nn.Module], optimizer, extra: dict) -> Path:
    """Write ``nets`` (name -> module), the optimiser and ``extra`` for ``step``, read it back against its manifest,
    point ``latest`` at it and only then prune older checkpoints (the newest older one that verifies is kept)."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    if verify_checkpoint(final) is not None:  # else this step is saved already (its state is the same)
        try:
            with atomic_dir(final, model=False) as tmp:
                _write_files(tmp, nets, optimizer, {"step": step, **extra})
        except DiskFull as e:
            raise DiskFull(e.path, last_intact(root)) from e
        problem = verify_checkpoint(final)
        if problem is not None:
            raise OSError(f"checkpoint {final} does not read back intact ({problem}); the older checkpoints are "
                          "kept: check the disk and rerun the same command")
    try:
        atomic_write_text(root / "latest", final.name)
    except DiskFull as e:
        raise DiskFull(e.path, f"the checkpoint {final} is written and intact (the same command resumes from it)"
                       ) from e
    kept = 1
    for old in step_folders(root):
        if old.name >= final.name:
            continue
        if kept < KEEP and verify_checkpoint(old) is None:
            kept += 1
        else:
            shutil.rmtree(old, ignore_errors=True)
    return final


def last_intact(root, then: str = "resumes from it") -> str:
    """What a run stopped now would resume from, for a message: the newest intact checkpoint, or nothing."""
    last = latest_checkpoint(root)
    return (f"the last checkpoint, {last}, is intact (the same command {then})" if last is not None else
            f"{root} holds no checkpoint yet (the run starts again from step 0)")


def latest_checkpoint(root) -> Path | None:
    """The newest checkpoint folder under ``root`` that verifies against its manifest (None: there is none)."""
    return next((p for p in step_folders(root) if verify_checkpoint(p) is None), None)


def _optimizer_file(path: Path, rank: int, world: int) -> str:
    """The optimiser file of process ``rank`` of ``world``: one for every process of a sharded run, else one."""
    sharded = sorted(path.glob("optimizer-rank-*-of-*.safetensors"))
    if not sharded:
        return "optimizer"
    saved = int(sharded[0].stem.rsplit("-", 1)[1])
    if saved != world:
        raise ValueError(f"checkpoint {path} holds the optimiser sharded over {saved} processes (train.fsdp); "
                         f"resume it on {saved} processes, not {world}")
    return f"optimizer-rank-{rank}-of-{world}"


def load_checkpoint(path, nets: dict[str, torch.nn.Module], optimizer) -> dict:
    """Load weights into ``nets`` (sharded ones from the full weights) and the optimiser (a sharded run: this
    process's shard) in place; returns the state dict (with ``step``)."""
    from .sharding import is_sharded, load_full_state, reshard_optimizer_state

    path = Path(path)
    for key, net in nets.items():
        file = path / f"{key}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {file.name}; it was written by a different recipe")
        load_full_state(net, load_file(file)) if is_sharded(net) else net.load_state_dict(load_file(file))
    rank, world = rank_world()
    name = _optimizer_file(path, rank, world)
    rest = json.loads((path / f"{name}.json").read_text())
    optimizer.load_state_dict(_optimizer_from_flat(load_file(path / f"{name}.safetensors"), rest))
    if name != "optimizer":
        reshard_optimizer_state(optimizer)
    return json.loads((path / "state.json").read_text())


def shard_changes(before, now: dict | None) -> str | None:
    """One line naming the shards added, removed and changed between ``before`` (what a checkpoint's state records
    of the data: ``{"source": name, "shards": [[label, digest], ...]}``, ``data.latent_cache.shard_record``) and
    ``now``, else None (the same shards, or nothing to compare: other data, or a checkpoint from before records)."""
    if not isinstance(before, dict) or not isinstance(before.get("shards"), list) or not now:
        return None
    old = {(str(s[0]), str(s[1])) for s in before["shards"] if isinstance(s, list) and len(s) == 2}
    new = {(str(s[0]), str(s[1])) for s in now["shards"]}
    if old == new:
        return None
    added, removed = sorted(n for n, _ in new - old), sorted(n for n, _ in old - new)
    changed = sorted(set(added) & set(removed))
    added, removed = [n for n in added if n not in changed], [n for n in removed if n not in changed]

    def names(label: str, items: list[str]) -> str:
        shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        return f"{len(items)} {label}" + (f" ({shown})" if items else "")
    parts = [names("added", added), names("removed", removed)] + ([names("changed", changed)] if changed else [])
    return (f"the shards of {now['source']} changed since this run's checkpoint: {'; '.join(parts)} "
            f"({len(new)} now); the run goes on over the shards there now")


def _pointer(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def resume_newest(root, load: Callable[[Path], dict], report: Callable[[str], None] = warn) -> dict | None:
    """``load(folder)`` the newest checkpoint under ``root`` that verifies and loads, reporting in one line each
    newer one skipped and a ``latest`` pointer that names another; None when ``root`` holds no checkpoint at all.
    Raises ``CheckpointError`` when it holds checkpoints (or a ``latest`` pointer) and none can be used."""
    root = Path(root)
    pointer, problems = _pointer(root), []
    for folder in step_folders(root):
        problem = verify_checkpoint(folder)
        if problem is None:
            try:
                state = load(folder)
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
                problem = f"does not load ({' '.join(str(e).split())[:160]})"
            else:
                for skipped in problems:
                    report(f"skipping checkpoint {skipped}; resuming from {folder.name}")
                if (root / "latest").exists() and pointer != folder.name:
                    report(f"{root / 'latest'} names {pointer!r}; the newest intact checkpoint is {folder.name}")
                return state
        problems.append(f"{folder}: {problem}")
    if problems or (root / "latest").exists():
        found = "; ".join(problems) if problems else f"only a 'latest' pointer naming {pointer!r}"
        raise CheckpointError(f"{root} holds no usable checkpoint ({found}); rather than start again from step 0 "
                              "unasked, the run stops: pass --restart to start from step 0")
    return None
