"""Where this process stands among a run's processes (torch.distributed, as accelerate and torchrun set it up): one
place for the rank / world lookup the latent cache's encode split and the checkpoints' optimiser shards both need."""

from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for in a single-process run)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()
