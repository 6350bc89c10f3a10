"""Backbones ``F(x_in, t, **cond)``: a time-conditioned MLP for vector data and diffusers UNets, two registries
(class name -> class, for model folders; recipe name -> builder, for ``model.backbone``), and the one probe that finds
the trainable network inside any wrapper.

Backbones are diffusers ``ModelMixin`` + ``ConfigMixin`` modules, so ``save_pretrained`` /
``from_pretrained`` write and read the usual ``config.json`` + ``diffusion_pytorch_model.safetensors`` folder.
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..core import Registry


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' sinusoidal timestep embedding (``flip_sin_to_cos``, no frequency shift: ``[cos, sin]`` of ``t``
    times ``10000^(-i / (dim / 2))``), with the same operations in the same order, but in ``t``'s own dtype (diffusers'
    helper always rounds to float32, which would make float64 derivative checks meaningless). An odd ``dim`` gets a
    zero column, as diffusers pads it."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=t.dtype, device=t.device) / half
    args = t[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TimeMLP(ModelMixin, ConfigMixin):
    """Residual MLP for ``(batch, dim)`` data, conditioned on a scalar time ``t`` (and optional class labels).

    ``t`` is whatever the wrapper passes as c_noise (in cmkit ``250 log sigma``, about -1600 to 1100), embedded
    sinusoidally the way diffusers' UNets embed their timesteps. With ``second_time`` it takes a second time input
    ``t2`` (MeanFlow's ``t - r``), embedded the same way by its own layers and added.
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, time_embed_dim: int = 64,
                 num_classes: int | None = None, dropout: float = 0.0, second_time: bool = False):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.time2 = (nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                      if second_time else None)
        self.label = nn.Embedding(num_classes, hidden) if num_classes else None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm": nn.LayerNorm(hidden),
                "emb": nn.Linear(hidden, hidden),
                "fc1": nn.Linear(hidden, hidden),
                "fc2": nn.Linear(hidden, hidden),
                "drop": nn.Dropout(dropout),
            })
            for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def _embed(self, t, x: torch.Tensor, layers: nn.Module) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, device=x.device, dtype=dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return layers(sinusoidal_embedding(t, self.config.time_embed_dim).to(x.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                t2: torch.Tensor | None = None) -> torch.Tensor:
        emb = self._embed(t, x, self.time)
        if self.time2 is not None:
            if t2 is None:
                raise ValueError("this network takes two times: pass t2=")
            emb = emb + self._embed(t2, x, self.time2)
        if self.label is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels=")
            emb = emb + self.label(class_labels)
        h = self.inp(x)
        for b in self.blocks:
            y = b["fc1"](torch.nn.functional.silu(b["norm"](h)) + b["emb"](emb))
            h = h + b["fc2"](b["drop"](torch.nn.functional.silu(y)))
        return self.out(torch.nn.functional.silu(self.out_norm(h)))


def small_unet(sample_size: int = 8, channels: int = 1, base: int = 32, levels: int = 2, layers_per_block: int = 1,
               attention: bool = True, num_classes: int | None = None, dropout: float = 0.0,
               second_time: bool = False) -> UNet2DModel:
    """A small diffusers ``UNet2DModel``: ``levels`` resolutions with ``base * 2^i`` channels, self-attention at
    the lowest one when ``attention``. ``second_time`` gives it a second timestep embedding (diffusers'
    ``class_embed_type="timestep"``: the second time goes in as ``class_labels``)."""
    if second_time and num_classes:
        raise ValueError("a UNet2DModel takes a second time input through its class embedding, so it cannot also be "
                         "class-conditional; set model.class_conditional = false or model.times = 1")
    if levels < 1:
        raise ValueError(f"model.levels must be >= 1, got {levels}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    chans = tuple(base * 2**i for i in range(levels))
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=chans,
        layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=min(8, base), num_class_embeds=num_classes, dropout=dropout,
        class_embed_type="timestep" if second_time else None,
    )


def backbone_forward(net: nn.Module, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Call any supported backbone with the same signature; diffusers UNets return an output object."""
    out = net(x, t, **cond)
    return out.sample if hasattr(out, "sample") else out


def takes_second_time(net: nn.Module) -> bool:
    """Whether a backbone has a second time input (MeanFlow's two-time networks)."""
    net = network_of(net)
    if isinstance(net, TimeMLP):
        return bool(net.config.get("second_time"))
    return getattr(net, "config", {}).get("class_embed_type") == "timestep"


def two_time_forward(net: nn.Module, x: torch.Tensor, t: torch.Tensor, t2: torch.Tensor, **cond) -> torch.Tensor:
    """Call a two-time backbone: a ``TimeMLP`` takes ``t2=``, a diffusers UNet takes it as ``class_labels``."""
    if isinstance(net, TimeMLP):
        return net(x, t, t2=t2, **cond)
    return backbone_forward(net, x, t, class_labels=t2, **cond)


# class name (as model folders record it) -> class
BACKBONE_CLASSES: Registry = Registry("backbone class")
BACKBONE_CLASSES.register("TimeMLP", TimeMLP)
BACKBONE_CLASSES.register("UNet2DModel", UNet2DModel)


def backbone_class(name: str):
    return BACKBONE_CLASSES[name]


# model.backbone (a recipe's name) -> builder(sample_shape, num_classes, section) -> a fresh backbone; ``section`` is
# any object with the recipe's model keys as attributes
BACKBONES: Registry = Registry("model.backbone")


@BACKBONES.register("mlp")
def build_mlp(shape: tuple[int, ...], num_classes: int | None, m) -> TimeMLP:
    if len(shape) != 1:
        raise ValueError(f"model.backbone 'mlp' needs vector data, got samples of shape {shape}; use 'unet'")
    if min(m.hidden, m.depth, m.time_embed_dim) < 1:
        raise ValueError("model.hidden, model.depth and model.time_embed_dim must be >= 1")
    return TimeMLP(dim=shape[0], hidden=m.hidden, depth=m.depth, time_embed_dim=m.time_embed_dim,
                   num_classes=num_classes, dropout=m.dropout, second_time=_times(m) == 2)


@BACKBONES.register("unet")
def build_unet(shape: tuple[int, ...], num_classes: int | None, m) -> UNet2DModel:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"model.backbone 'unet' needs square images (C, H, H), got samples of shape {shape}")
    return small_unet(shape[1], shape[0], m.base, m.levels, m.layers_per_block, m.attention, num_classes, m.dropout,
                      second_time=_times(m) == 2)


def _times(m) -> int:
    times = getattr(m, "times", 1)
    if times not in (1, 2):
        raise ValueError(f"model.times must be 1 or 2 (a second time input, for MeanFlow), got {times}")
    return times


def network_of(model) -> nn.Module:
    """The trainable network inside a wrapper, however deep: a consistency model's or EDM denoiser's ``backbone``,
    a diffusers denoiser's ``unet``. A bare network is its own."""
    net = model
    for _ in range(4):
        inner = getattr(net, "backbone", None)
        inner = getattr(net, "unet", None) if inner is None else inner
        if inner is None:
            return net
        net = inner
    return net


def sample_shape(net: nn.Module) -> tuple[int, ...]:
    """The shape of one sample the backbone takes: ``(dim,)`` for an MLP, ``(C, H, W)`` for a UNet."""
    net = network_of(net)
    cfg = net.config
    if isinstance(net, TimeMLP):
        return (cfg.dim,)
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, h, w)


def num_classes_of(model) -> int | None:
    """The number of classes a teacher or consistency model is conditioned on (None: unconditional)."""
    cfg = getattr(network_of(model), "config", {})
    return cfg.get("num_class_embeds") or cfg.get("num_classes") or None
