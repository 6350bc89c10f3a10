"""Fully sharded data parallel training (``train.fsdp = true``) for students that do not fit one device: torch's
FSDP2 (``fully_shard``) over every process, each diffusers block (the classes a network lists in
``_no_split_modules``, else each child that holds weights) sharded on its own and the network's root last, so a
forward pass gathers one block at a time.

cmkit shards with torch's ``fully_shard`` itself rather than accelerate's FSDP plugin: on CPU processes accelerate
ignores the plugin and wraps the model in DDP (measured with accelerate 1.15), so the plugin's path could not be
tested here, while ``fully_shard`` runs the same on gloo (CPU) and NCCL (GPU).

The online network, its output EMAs, the target network and the objective's own trained networks (rCM's fake score,
``objective.trained_networks()``) are sharded alike, so an EMA update is the same lerp on each process's own shards
and FSDP reduces every sharded gradient itself. A checkpoint holds the gathered full weights (the same files an
unsharded run writes, so the model exports and loads as ever) and each process's optimiser shard
(``optimizer-rank-R.safetensors``): a run resumes on as many processes as it was saved with."""

from __future__ import annotations

import torch
from torch import nn


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(net: nn.Module) -> bool:
    DTensor = _dtensor()  # noqa: N806 - a class
    return any(isinstance(p, DTensor) for p in net.parameters())


def is_sharded_tensor(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """A process's own part of a (possibly sharded) tensor."""
    return t.to_local() if is_sharded_tensor(t) else t


def _children_units(net: nn.Module) -> list[nn.Module]:
    out = []
    for child in net.children():  # containers have no forward of their own: their members are the units
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            out += _children_units(child)
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


def _units(net: nn.Module) -> list[nn.Module]:
    """What ``net`` is sharded in, innermost first: every block whose class some diffusers network inside it names
    in ``_no_split_modules`` (each once, though a UNet's transformer blocks sit in two such networks), else the
    weighted children."""
    names = {n for m in net.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in net.modules() if type(m).__name__ in names and m is not net]
    return blocks[::-1] if blocks else _children_units(net)  # modules() lists outer blocks before inner ones


def shard_network(net: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``net`` in place over every process (its blocks, then the root); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for unit in _units(net):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The whole network's weights gathered to the main process, on the CPU (every process must call it; the
    others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full weights (as ``full_state`` gives them, read by every process) into the sharded ``net``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))


def local_optimizer_state(optimizer) -> dict:
    """The optimiser's state dict with each process's own shards as plain tensors."""
    state = optimizer.state_dict()
    return {"state": {pid: {k: local(v).detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                      for pid, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def gathered_optimizer_states(optimizer) -> list[dict] | None:
    """Every process's optimiser shard, on the main process (None on the others)."""
    dist = torch.distributed
    mine = local_optimizer_state(optimizer)
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def reshard_optimizer_state(optimizer) -> None:
    """After ``load_state_dict`` of a process's shard: make each moment a DTensor laid out as its parameter."""
    DTensor = _dtensor()  # noqa: N806 - a class
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape and v.ndim:
                    optimizer.state[p][k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                                               shape=p.shape, stride=p.stride())


def all_agree(flag: torch.Tensor) -> torch.Tensor:
    """A boolean device flag that holds on every process (a non-finite shard anywhere skips the step everywhere)."""
    f = flag.to(torch.int32)
    torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MIN)
    return f.bool()
