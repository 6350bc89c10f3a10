"""Short digests of a network's weights: what a model trained on a base records of it (so a base whose weights
changed since is noticed), what a resumed run checks its teacher against, and part of the latent cache's key."""

from __future__ import annotations

import hashlib

import torch


def weights_hash(h, module: torch.nn.Module) -> None:
    """Feed ``module``'s weights to the hash ``h``. A LoRA adapter's tensors are left out and peft's ``base_layer``
    names read as the plain ones, so a base network with an adapter on it hashes as the base alone."""
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
        weights_hash(h, module)
    return h.hexdigest()[:24]
