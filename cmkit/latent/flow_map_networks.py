"""The networks of flow-map students (``latent.flow_map``): what a family's ``flow_map_network`` hook builds, the
registry ``FlowMapModel`` reads a saved one back through (``FLOW_MAP_NETWORKS``, by the name in its ``cmkit.json``),
and what they share. ``REmbeddedNetwork`` serves any flow transformer (SD3, Flux); a family with a network of its own
registers it from its file (Wan's ``AnyFlowNetwork``, ``families/wan.py``). Below the families: nothing here knows a
pipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..core import Registry
from .denoiser import TextToImageModel

FLOW_MAP_NETWORKS: Registry = Registry("flow-map network")
R_EMBEDDING_FILE = "flow_map_r_embedding.safetensors"
TIMESTEP_SCALE = 1000.0  # the networks' time input is 1000 t, as the pipelines pass it
TRAINED_BESIDE_ADAPTER = ("r_embed.", "delta_embedder.")  # what a LoRA flow-map student trains in full


def batch_times(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` (a number or a tensor of times) as one time per sample of ``like``'s batch, on its device."""
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
        t, r = batch_times(t, z), batch_times(r, z)
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
