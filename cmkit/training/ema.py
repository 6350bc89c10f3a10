"""Exponential moving averages of a network's weights (output EMAs and the target network)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .sharding import local


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
    one fused ``_foreach_lerp_`` (plus buffer copies), with no per-step module walks.

    An EMA held on another device than the online network (``train.ema_device = "cpu"``, which frees a network's
    worth of accelerator memory) is updated through a pinned staging copy: the online weights are copied over
    asynchronously, then one wait, then the same lerp on the EMA's side."""

    def __init__(self, ema: nn.Module, online: nn.Module):
        self.module = ema
        # a sharded EMA (train.fsdp) is updated on each process's own shards of it and of the online weights
        self._e = [local(p) for p in ema.parameters()]
        self._o = [local(p.detach()) for p in online.parameters()]
        self._buffers = [(eb, ob) for eb, ob in zip(ema.buffers(), online.buffers(), strict=True)]
        apart = bool(self._e) and self._e[0].device != self._o[0].device
        pin = apart and self._o[0].device.type == "cuda"
        self._stage = [torch.empty_like(e, pin_memory=pin) for e in self._e] if apart else None

    @torch.no_grad()
    def update(self, rate: float) -> None:
        online = self._o
        if self._stage is not None:
            for s, o in zip(self._stage, self._o, strict=True):
                s.copy_(o, non_blocking=True)
            if self._o[0].device.type == "cuda":
                torch.cuda.current_stream(self._o[0].device).synchronize()
            online = self._stage
        torch._foreach_lerp_(self._e, online, 1.0 - rate)
        for eb, ob in self._buffers:
            eb.copy_(ob)
