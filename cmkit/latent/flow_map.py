"""Flow-map students of flow-matching teachers (SD3, Flux, Wan, ...): a network ``u(z_t, r, t)`` for the average
velocity of the teacher's guided flow over ``[r, t]`` (flow time, t = 1 noise), so one jump
``z_r = z_t - (t - r) u(z_t, r, t)`` goes from any time to any earlier one and one checkpoint samples at 1, 2, 4, 8
steps (AnyFlow, arXiv 2605.13724; MeanFlow's identity, ``objectives.flow_map``).

The network starts as the teacher, ``u(z, t, t) = v(z, t)``, with a second time input for ``r``; a family picks it
(``PipelineFamily.flow_map_network``):

- ``AnyFlowNetwork`` (``families/wan.py``): a Wan teacher's ``WanTransformer3DModel`` carried over, weight for
  weight, into diffusers' ``AnyFlowTransformer3DModel`` (the same blocks, rotary embedding and output layout; the
  condition embedder mixes ``(1 - g) temb(t) + g delta_embedder(r)``, ``delta_embedder`` a copy of
  ``time_embedder`` and ``deltatime_type = "r"``, so at r = t the mix is the teacher's embedding). Exported as an
  ``AnyFlowPipeline`` folder (``FlowMapEulerDiscreteScheduler`` over the teacher's flow shift) with ``cmkit.json``.
- ``REmbeddedNetwork`` (``flow_map_networks.py``): any other flow transformer (SD3, Flux) with an r-embedding added
  to its time embedding's output through a forward hook: a zero-initialised MLP of the sinusoidal embedding of
  ``1000 (t - r)``. Saved as the teacher's pipeline class (the trained transformer) with the r-embedding's weights
  and ``cmkit.json``: a cmkit folder, sampled through cmkit and ``cmkit generate``.

Sampling: the jumps over ``FlowMapEulerDiscreteScheduler``'s grid of n steps (``linspace(1, 0, n + 1)`` shifted by the
teacher's shift: Wan's ``flow_shift``, SD3's ``shift``, ``exp(mu)`` at the distilled size for a resolution-dependent
one), one network pass per jump; guidance is folded in (the student samples at guidance 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core.checks import check_guidance, in_range, positive_int
from ..core.files import atomic_dir
from ..models.folder import META_FILE, MODEL_KINDS, read_meta
from .denoiser import TextToImageModel
from .flow_map_networks import FLOW_MAP_NETWORKS, TRAINED_BESIDE_ADAPTER, REmbeddedNetwork, batch_times
from .students import SharedPartsStudent, check_kind, restore_size, size_meta


def flow_map_times(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The descending flow times of an n-step flow-map sample, ``FlowMapEulerDiscreteScheduler``'s own grid (its
    ``sigmas``: ``linspace(1, 0, n + 1)[:-1]`` shifted, then 0), in float64."""
    from diffusers import FlowMapEulerDiscreteScheduler

    steps = positive_int(steps, "steps")
    sched = FlowMapEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
    sched.set_timesteps(steps)
    return sched.sigmas.to(torch.float64).tolist()


def teacher_shift(teacher: TextToImageModel) -> float:
    """The static shift of the teacher's Euler grid its students sample over: the scheduler's ``shift`` (Wan's
    ``flow_shift``), or ``exp(mu)`` at the teacher's size where the shift is resolution-dependent (the exponential
    time shift with ``sigma = 1`` is the static shift ``e^mu``)."""
    sched = teacher.family.student_scheduler(teacher, teacher.denoiser.scheduler)
    c = sched.config
    if c.get("use_dynamic_shifting"):
        return float(math.exp(teacher.family.mu(teacher)))
    return float(c.get("shift", 1.0))


@MODEL_KINDS.register("flow_map")
class FlowMapModel(SharedPartsStudent, nn.Module):
    """A flow-map student (module docstring): ``forward(z, r, t, **cond)`` is the average velocity ``u`` over
    ``[r, t]``; ``jump`` one step of it; ``grid(n)`` the flow times of an n-step sample. ``steps``: its default step
    count; ``guidance_scale``: the teacher guidance folded in (recorded); ``shift``: the grid's."""

    kind = "flow_map"

    def __init__(self, network: nn.Module, parts: TextToImageModel, steps: int = 4, guidance_scale: float = 1.0,
                 shift: float = 1.0, base: str | None = None, lora: bool = False):
        super().__init__()
        self.network = network
        self.__dict__["parts"] = parts
        self.steps, self.guidance_scale, self.shift, self.base = int(steps), float(guidance_scale), float(shift), base
        self.lora = bool(lora)

    def state_dict(self, *args, **kwargs):
        """A LoRA student's checkpoint: the adapter and the r-embedding it trains beside it (the base is the
        teacher's)."""
        full = nn.Module.state_dict(self, *args, **kwargs)
        if not self.lora:
            return full
        return {k: v for k, v in full.items() if "lora_" in k or any(s in k for s in TRAINED_BESIDE_ADAPTER)}

    def forward(self, z, r, t, **cond):
        return self.network(z, r, t, **{k: v for k, v in cond.items() if not k.startswith("negative_")})

    def jump(self, z, t, r, **cond) -> torch.Tensor:
        """``z_r = z_t - (t - r) u(z_t, r, t)``, the difference taken in float64 as ``FlowMapEulerDiscreteScheduler``
        takes it; a one-line error for r >= t."""
        t, r = batch_times(t, z).double(), batch_times(r, z).double()
        if not bool((r < t).all()):
            raise ValueError(f"a flow-map jump goes back in time (r < t); got r = {r.max().item():g} >= t = "
                             f"{t.min().item():g}")
        u = self(z, r, t, **cond)
        shape = (-1,) + (1,) * (z.ndim - 1)
        return (z.double() - (t - r).view(shape) * u.double()).to(u.dtype)

    def passes(self, **cond) -> int:
        return 1

    def grid(self, steps: int, spacing=None) -> list[float]:
        """The flow times (descending, t = 1 to 0) of a ``steps``-step sample."""
        return flow_map_times(steps, self.shift, int(self.parts.scheduler.config.num_train_timesteps))

    # --- the rest of the teacher's pipeline

    @property
    def denoiser(self) -> nn.Module:
        """The trained network (what the samplers read the device and dtype from)."""
        return self.network

    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale: float = 1.0) -> dict:
        if negative_prompts is not None:
            raise ValueError("a flow-map student folds guidance in and takes no negative prompt (it samples at "
                             "guidance_scale=1)")
        return self.parts.encode_prompt(prompts, None, 1.0)

    def decode(self, latents):
        return self.parts.decode(latents)

    def encode(self, images):
        return self.parts.encode(images)

    # --- files
    def meta(self) -> dict:
        return {"kind": self.kind, "network": self.network.name, "steps": self.steps, "merged_lora": self.lora,
                "guidance_scale": self.guidance_scale, "sample_at_guidance_scale": 1.0, "shift": self.shift,
                "base": self.base, "pipeline": self.parts.config["pipeline"], **size_meta(self.parts),
                **({"time_module": self.network.module, "freq_dim": self.network.freq_dim}
                   if isinstance(self.network, REmbeddedNetwork) else {})}

    def save_pretrained(self, folder) -> Path:
        meta = self.meta()
        with atomic_dir(folder) as tmp:
            self.network.write(self.parts, tmp, self.shift)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder) -> FlowMapModel:
        meta = read_meta(folder) or {}
        check_kind(folder, meta, cls.kind)
        where = Path(folder) / META_FILE
        if meta.get("network") not in FLOW_MAP_NETWORKS:
            raise ValueError(f"{where}: network {meta.get('network')!r} is not a flow-map network cmkit reads "
                             f"({', '.join(FLOW_MAP_NETWORKS.names())}); export the student again")
        steps = positive_int(meta.get("steps", 4), f"{where}: steps", "export the student again")
        w = check_guidance(meta.get("guidance_scale", 1.0), f"{where}: guidance_scale")
        shift = in_range(meta.get("shift", 1.0), f"{where}: shift", 0, low_open=True, fix="export the student again")
        network, parts = FLOW_MAP_NETWORKS[meta["network"]].read(Path(folder), meta)
        restore_size(folder, meta, parts)
        return cls(network, parts, steps=steps, guidance_scale=w, shift=shift, base=meta.get("base"))
