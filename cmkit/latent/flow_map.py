"""Flow-map students of flow-matching teachers (SD3, Flux, Wan, ...): a network ``u(z_t, r, t)`` for the average
velocity of the teacher's guided flow over ``[r, t]`` (flow time, t = 1 noise), so one jump
``z_r = z_t - (t - r) u(z_t, r, t)`` goes from any time to any earlier one and one checkpoint samples at 1, 2, 4, 8
steps (AnyFlow, arXiv 2605.13724; MeanFlow's identity, ``objectives.flow_map``).

The network starts as the teacher, ``u(z, t, t) = v(z, t)``, with a second time input for ``r``; a family picks it
(``PipelineFamily.flow_map_network``):

- ``AnyFlowNetwork``: a Wan teacher's ``WanTransformer3DModel`` carried over, weight for weight, into diffusers'
  ``AnyFlowTransformer3DModel`` (the same blocks, rotary embedding and output layout; the condition embedder mixes
  ``(1 - g) temb(t) + g delta_embedder(r)``, ``delta_embedder`` a copy of ``time_embedder`` and ``deltatime_type =
  "r"``, so at r = t the mix is the teacher's embedding). Exported as an ``AnyFlowPipeline`` folder
  (``FlowMapEulerDiscreteScheduler`` over the teacher's flow shift) with ``cmkit.json``.
- ``REmbeddedNetwork``: any other flow transformer (SD3, Flux) with an r-embedding added to its time embedding's
  output through a forward hook: a zero-initialised MLP of the sinusoidal embedding of ``1000 (t - r)``. Saved as
  the teacher's pipeline class (the trained transformer) with the r-embedding's weights and ``cmkit.json``: a cmkit
  folder, sampled through cmkit and ``cmkit generate``.

Sampling: the jumps over ``FlowMapEulerDiscreteScheduler``'s grid of n steps (``linspace(1, 0, n + 1)`` shifted by the
teacher's shift: Wan's ``flow_shift``, SD3's ``shift``, ``exp(mu)`` at the distilled size for a resolution-dependent
one), one network pass per jump; guidance is folded in (the student samples at guidance 1).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..core import Registry
from ..core.checks import check_guidance, in_range, positive_int
from ..core.files import atomic_dir
from ..models.folder import META_FILE, MODEL_KINDS, read_meta
from .denoiser import TextToImageModel
from .students import SharedPartsStudent, check_kind, restore_size, size_meta

FLOW_MAP_NETWORKS: Registry = Registry("flow-map network")
R_EMBEDDING_FILE = "flow_map_r_embedding.safetensors"
TIMESTEP_SCALE = 1000.0  # the networks' time input is 1000 t, as the pipelines pass it
TRAINED_BESIDE_ADAPTER = ("r_embed.", "delta_embedder.")  # what a LoRA flow-map student trains in full


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


def _times(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, device=like.device)
    return x.expand(like.shape[0]) if x.ndim == 0 else x


def merged(transformer: nn.Module) -> nn.Module:
    """``transformer`` with any peft adapter merged into its weights, as a plain module of its class (what a folder
    holds: a flow-map LoRA student is exported whole); ``transformer`` itself where it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in transformer.modules()):
        return transformer
    work = copy.deepcopy(transformer)
    for m in work.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    state = {k.replace(".base_layer.", "."): v for k, v in work.state_dict().items() if "lora_" not in k}
    plain = type(transformer).from_config(transformer.config)
    plain.load_state_dict(state, strict=True)
    return plain.to(transformer.dtype).eval()


@FLOW_MAP_NETWORKS.register("anyflow")
class AnyFlowNetwork(nn.Module):
    """A Wan teacher's transformer as diffusers' ``AnyFlowTransformer3DModel`` (module docstring), called on cmkit's
    ``(B, C, F, H, W)`` latents (the model's own layout is ``(B, F, C, H, W)``, one timestep per latent frame)."""

    name = "anyflow"

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @classmethod
    def from_wan(cls, wan: nn.Module, gate_value: float = 0.25, tied: bool = False) -> AnyFlowNetwork:
        """The Wan 2.1 text-to-video transformer's weights in an ``AnyFlowTransformer3DModel`` (the same key names;
        ``delta_embedder`` copied from ``time_embedder``), in float32; ``tied``: holding the Wan transformer's own
        parameters (frozen, in their dtype; a LoRA student's base), the ``delta_embedder`` its own."""
        from diffusers import AnyFlowTransformer3DModel

        c = wan.config
        if tuple(c.patch_size)[0] != 1 or c.get("qk_norm") != "rms_norm_across_heads" or c.get("added_kv_proj_dim") \
                or c.get("image_dim") or c.get("pos_embed_seq_len"):
            raise ValueError("an AnyFlow flow-map student takes a Wan 2.1 text-to-video transformer (patch (1, p, p), "
                             "rms_norm_across_heads q/k norm, no image conditioning); this transformer is not one")
        in_range(gate_value, "objective.gate_value", 0, 1, low_open=True, fix="AnyFlow's is 0.25")
        af = AnyFlowTransformer3DModel(
            patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim, in_channels=c.in_channels, out_channels=c.out_channels,
            text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
            cross_attn_norm=c.cross_attn_norm, eps=c.eps, rope_max_seq_len=c.rope_max_seq_len,
            gate_value=float(gate_value), deltatime_type="r")
        state = {k: v.float() for k, v in wan.state_dict().items()}
        prefix = "condition_embedder.time_embedder."
        state.update({k.replace(prefix, "condition_embedder.delta_embedder."): v.clone()
                      for k, v in state.items() if k.startswith(prefix)})
        af.load_state_dict(state, strict=True)
        af.float().train()
        if tied:
            for name, p in wan.named_parameters():
                owner, _, attr = name.rpartition(".")
                setattr(af.get_submodule(owner), attr, p)
        return cls(af)

    def forward(self, z, r, t, prompt_embeds=None, **_):
        b, f = z.shape[0], z.shape[2]
        dt = self.transformer.dtype
        ts, rs = ((_times(v, z) * TIMESTEP_SCALE).float()[:, None].expand(b, f) for v in (t, r))
        u = self.transformer(hidden_states=z.permute(0, 2, 1, 3, 4).to(dt), timestep=ts, r_timestep=rs,
                             encoder_hidden_states=prompt_embeds.to(z.device, dt), return_dict=False)[0]
        self._drop_traced_rope()
        return u.permute(0, 2, 1, 3, 4).to(z.dtype)

    def _drop_traced_rope(self) -> None:
        """The rotary table the model caches on first use: one built inside a JVP (``torch.func``) is a wrapped
        tensor that outlives its transform (a later copy or pass fails on it), so it is dropped, rebuilt next call."""
        rope = self.transformer.rope
        cache = getattr(rope, "_freqs_cache", None)
        if cache is not None and torch._C._functorch.is_functorch_wrapped_tensor(cache[1]):
            rope._freqs_cache = None

    def pipeline(self, parts, scheduler):
        import diffusers

        pe = parts.prompt_encoder
        return diffusers.AnyFlowPipeline(tokenizer=pe.tokenizers[0], text_encoder=pe.text_encoder,
                                         transformer=merged(self.transformer), vae=parts.vae.vae, scheduler=scheduler)

    def write(self, parts, folder: Path, shift: float) -> None:
        from diffusers import FlowMapEulerDiscreteScheduler

        n = int(parts.scheduler.config.num_train_timesteps)
        self.pipeline(parts, FlowMapEulerDiscreteScheduler(num_train_timesteps=n, shift=shift)).save_pretrained(
            folder, safe_serialization=True)

    @classmethod
    def read(cls, folder: Path, meta: dict):
        """``(network, parts)`` of an ``AnyFlowPipeline`` folder: the parts a Wan teacher's sampling needs (its
        prompt encoder, VAE, latent shape) around the flow-map transformer."""
        import diffusers

        from .families.wan import PIPELINE, WanDenoiser, WanPromptEncoder, WanVAE

        pipe = diffusers.AnyFlowPipeline.from_pretrained(str(folder), use_safetensors=True)
        n = int(pipe.scheduler.config.num_train_timesteps)
        grid = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=n, shift=float(meta["shift"]))
        den = WanDenoiser(pipe.transformer.float(), grid)  # never called: the parts' latent shape and scheduler
        prompts = WanPromptEncoder(pipe.text_encoder.eval(), pipe.tokenizer)
        parts = TextToImageModel(den, WanVAE(pipe.vae.float().eval()), prompts.eval(), {"pipeline": PIPELINE})
        return cls(pipe.transformer), parts


@FLOW_MAP_NETWORKS.register("r_embedded")
class REmbeddedNetwork(nn.Module):
    """A flow teacher's transformer (its family's ``FlowDenoiser``, whose ``_velocity`` makes the network call) with
    an r-embedding added to the output of its time-embedding module (``family.flow_map_time_module``) by a forward
    hook: ``MLP(sinusoid(1000 (t - r)))``, its last layer zero so the fresh network is the teacher for every r."""

    name = "r_embedded"

    def __init__(self, denoiser, module: str, freq_dim: int = 256):
        super().__init__()
        self.denoiser, self.module, self.freq_dim = denoiser, module, int(freq_dim)
        try:
            target = denoiser.transformer.get_submodule(module)
        except AttributeError:
            raise ValueError(f"the teacher's transformer has no time-embedding module {module!r} for a flow-map "
                             "student's r-embedding") from None
        try:
            dim = target.timestep_embedder.linear_2.out_features
        except AttributeError:
            raise ValueError(f"the teacher's {module!r} has no timestep_embedder.linear_2 to size a flow-map student's "
                             "r-embedding; this family takes no flow-map student yet") from None
        self.r_embed = nn.Sequential(nn.Linear(self.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.r_embed[2].weight)
        nn.init.zeros_(self.r_embed[2].bias)
        self.__dict__["_delta"] = None
        target.register_forward_hook(self._add_r)

    def _add_r(self, module, args, out):
        delta = self.__dict__.get("_delta")
        if delta is None:  # the transformer called by itself (its pipeline): the teacher's embedding
            return out
        from diffusers.models.embeddings import get_timestep_embedding

        emb = get_timestep_embedding(delta * TIMESTEP_SCALE, self.freq_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)
        return out + self.r_embed(emb.to(self.r_embed[0].weight.dtype)).to(out.dtype)

    def forward(self, z, r, t, **cond):
        t, r = _times(t, z), _times(r, z)
        dt = self.denoiser.transformer.dtype
        cond = {k: v.to(z.device, dt) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in cond.items() if not k.startswith("negative_")}
        self.__dict__["_delta"] = (t - r).float()
        try:
            u = self.denoiser._velocity(z.to(dt), (t * self.denoiser.timestep_scale).float(), torch.ones_like(t), cond)
        finally:
            self.__dict__["_delta"] = None
        return u.to(z.dtype)

    def write(self, parts, folder: Path, shift: float) -> None:
        from safetensors.torch import save_file

        den = copy.copy(parts.denoiser)
        den.transformer = merged(self.denoiser.transformer)
        TextToImageModel(den, parts.vae, parts.prompt_encoder, parts.config).save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.r_embed.state_dict().items()}, str(folder / R_EMBEDDING_FILE))

    @classmethod
    def read(cls, folder: Path, meta: dict):
        from safetensors.torch import load_file

        from ..core.checks import finite_tensors

        parts = TextToImageModel.from_pretrained(str(folder))
        net = cls(parts.denoiser, meta.get("time_module", parts.family.flow_map_time_module),
                  int(meta.get("freq_dim", 256)))
        state = load_file(str(Path(folder) / R_EMBEDDING_FILE))
        finite_tensors(state, f"{folder}: the r-embedding", "export the flow-map student again")
        net.r_embed.load_state_dict(state)
        return net, parts


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
        t, r = _times(t, z).double(), _times(r, z).double()
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
