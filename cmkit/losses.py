"""Per-sample distances between two batches and the loss weightings over noise levels.

Layer 4. Every distance maps two ``(batch, ...)`` tensors to a ``(batch,)`` tensor.
"""

from __future__ import annotations

import math

import torch

DISTANCES = ("l2", "l1", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_gap")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def pseudo_huber_c(dim: int) -> float:
    """iCT's default ``c = 0.00054 sqrt(d)`` for data scaled to about [-1, 1]."""
    return 0.00054 * math.sqrt(dim)


def distance(name: str, x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """``l2``: mean squared error; ``l1``: mean absolute error; ``pseudo_huber``: ``sqrt(||x - y||^2 + c^2) - c``
    over the whole sample (c defaults to ``0.00054 sqrt(d)``)."""
    diff = _flat(x) - _flat(y)
    if name == "l2":
        return diff.pow(2).mean(1)
    if name == "l1":
        return diff.abs().mean(1)
    if name == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[1]) if c is None else c
        return (diff.pow(2).sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")


def weighting(name: str, sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    """``uniform``: 1; ``inverse_gap``: ``1 / (sigma_{n+1} - sigma_n)`` (iCT's lambda)."""
    if name == "uniform":
        return torch.ones_like(sigma_hi)
    if name == "inverse_gap":
        return 1 / (sigma_hi - sigma_lo)
    raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
