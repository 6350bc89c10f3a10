"""Training checkpoints: safetensors for every network and the optimiser, JSON for the rest, written atomically.

Layout under ``OUT/checkpoints/``: ``step-00000200/`` folders and a ``latest`` file naming the newest complete one.
A folder is written under a temporary name and renamed into place, then ``latest`` is replaced (``os.replace``), so
a crash at any moment leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.files import atomic_dir, atomic_write_text

KEEP = 2


def _optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into safetensors-able tensors and a JSON-able rest."""
    tensors, plain = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(rest["plain"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(root, step: int, nets: dict[str, torch.nn.Module], optimizer, extra: dict) -> Path:
    """Write ``nets`` (name -> module), the optimiser and ``extra`` for ``step``; prune older checkpoints."""
    root = Path(root)
    name = f"step-{step:08d}"
    final = root / name
    if not (final / "state.json").is_file():  # else this step is saved already (its state is the same)
        with atomic_dir(final) as tmp:
            for key, net in nets.items():
                save_file(_weights(net), tmp / f"{key}.safetensors")
            opt_tensors, opt_rest = _optimizer_to_flat(optimizer.state_dict())
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
            (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path, nets: dict[str, torch.nn.Module], optimizer) -> dict:
    """Load weights into ``nets`` and the optimiser in place; returns the state dict (with ``step``)."""
    path = Path(path)
    for key, net in nets.items():
        file = path / f"{key}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {file.name}; it was written by a different recipe")
        net.load_state_dict(load_file(file))
    rest = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_flat(load_file(path / "optimizer.safetensors"), rest))
    return json.loads((path / "state.json").read_text())
