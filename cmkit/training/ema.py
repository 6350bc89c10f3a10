"""Exponential moving averages of a network's weights (output EMAs and the target network)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    c = copy.deepcopy(model)
    c.requires_grad_(False)
    return c


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, rate: float) -> None:
    """``ema <- rate * ema + (1 - rate) * online`` for parameters; buffers are copied."""
    EMA(ema, online).update(rate)


class EMA:
    """An EMA copy bound to its online network: the parameter and buffer lists are gathered once, so each update is
    one fused ``_foreach_lerp_`` (plus buffer copies), with no per-step module walks."""

    def __init__(self, ema: nn.Module, online: nn.Module):
        self.module = ema
        self._e = list(ema.parameters())
        self._o = [p.detach() for p in online.parameters()]
        self._buffers = [(eb, ob) for eb, ob in zip(ema.buffers(), online.buffers(), strict=True)]

    @torch.no_grad()
    def update(self, rate: float) -> None:
        torch._foreach_lerp_(self._e, self._o, 1.0 - rate)
        for eb, ob in self._buffers:
            eb.copy_(ob)
