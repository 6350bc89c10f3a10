"""Where named models live: shipped ``cmkit:NAME`` folders inside the package, and whether a name is a hub id and
the hub answers (so an offline machine fails in seconds instead of after the hub client's retries)."""

from __future__ import annotations

import os
from pathlib import Path

ASSET_PREFIX = "cmkit:"
# a name ending in one of these is a file, not a hub id ("org/model-v1.0" is a hub id)
FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".npy", ".json", ".toml", ".onnx"}


def asset_path(name: str) -> Path:
    """A model folder shipped inside the cmkit package (``cmkit/assets/NAME``)."""
    root = Path(__file__).resolve().parents[1] / "assets"
    path = root / name
    if not path.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"no shipped model {name!r} (shipped: {', '.join(known) or 'none'})")
    return path


def resolve(path_or_name) -> str:
    path = str(path_or_name)
    return str(asset_path(path[len(ASSET_PREFIX):])) if path.startswith(ASSET_PREFIX) else path


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (``HF_HUB_OFFLINE=1``: no); checked once so an offline
    machine fails in seconds instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path or a file name ("org/model-v1.0" is a hub id)."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and Path(path).suffix.lower() not in \
        FILE_SUFFIXES


def hub_load_kw() -> dict:
    """What a ``from_pretrained`` of a hub id gets: offline, only the local hub cache can answer, at once."""
    return {} if hub_reachable() else {"local_files_only": True}


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A small file of a hub repository (a ``config.json``) as a local path, so a network can be sized before its
    weights are fetched: the local hub cache's copy (offline, all there is), else the hub's where it answers; None
    where neither has it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed id or cache: no file to size from
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    if not hub_reachable():
        return None
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception:  # noqa: BLE001 - missing file, gated repository, network error: from_pretrained names it
        return None
