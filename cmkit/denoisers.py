"""Denoisers ``D(x, sigma, **cond) -> estimate of x_0`` in sigma space, whatever the teacher's native form.

Layer 2. Every teacher is wrapped here once; everything above (ODE, objectives, samplers) sees only a denoiser with
``sigma_min``, ``sigma_max`` and ``sample_shape`` attributes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from . import sigmas as S
from .artefacts import read_meta, read_model_folder, write_model_folder
from .nets import backbone_forward, sample_shape


@runtime_checkable
class Denoiser(Protocol):
    """What every teacher looks like to cmkit."""

    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor: ...


class EDMDenoiser(nn.Module):
    """EDM preconditioning around any backbone: ``D = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022)."""

    kind = "edm_denoiser"

    def __init__(self, backbone: nn.Module, sigma_data: float = S.SIGMA_DATA, sigma_min: float = S.SIGMA_MIN,
                 sigma_max: float = S.SIGMA_MAX):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.backbone)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = S.as_batch_sigma(sigma, x)
        c_skip, c_out, c_in = (S.append_dims(c, x.ndim) for c in S.edm_scalings(sigma, self.sigma_data))
        f = backbone_forward(self.backbone, c_in * x, S.c_noise(sigma), **cond)
        return c_skip * x + c_out * f

    def save_pretrained(self, folder) -> Path:
        return write_model_folder(folder, self.backbone, {"kind": self.kind, "sigma_data": self.sigma_data,
                                                          "sigma_min": self.sigma_min, "sigma_max": self.sigma_max})

    @classmethod
    def from_pretrained(cls, folder) -> "EDMDenoiser":
        backbone, meta = read_model_folder(folder, cls.kind)
        return cls(backbone, meta["sigma_data"], meta["sigma_min"], meta["sigma_max"])


class DiffusersDenoiser(nn.Module):
    """A diffusers VP / DDPM-family UNet as a sigma-space denoiser.

    With ``abar`` the scheduler's ``alphas_cumprod``: ``sigma = sqrt((1 - abar) / abar)``, the UNet sees
    ``x / sqrt(1 + sigma^2)`` (the VP sample) at the continuous timestep found by interpolating ``log sigma`` over the
    table, and its output (epsilon, v or x_0) is converted to x_0.
    """

    def __init__(self, unet: nn.Module, scheduler, prediction_type: str | None = None, clip_x0: float | None = None):
        super().__init__()
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod; "
                             "use a DDPM-family scheduler (DDPMScheduler, DDIMScheduler, ...)")
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; "
                             "expected epsilon, v_prediction or sample")
        self.clip_x0 = clip_x0
        abar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        table = ((1 - abar) / abar).sqrt()
        self.register_buffer("log_sigmas", table.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-1])
        self.sigma_data = S.SIGMA_DATA

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.unet)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep: linear interpolation of ``log sigma`` between table entries (clamped to the table)."""
        ls = self.log_sigmas
        log_s = sigma.to(torch.float64).log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo = hi - 1
        frac = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return lo + frac

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = S.as_batch_sigma(sigma, x)
        s = S.append_dims(sigma, x.ndim)
        scale = 1 / (1 + s**2).sqrt()  # sqrt(abar)
        out = backbone_forward(self.unet, x * scale, self.sigma_to_t(sigma).to(x.dtype), **cond)
        if out.shape[1] == 2 * x.shape[1]:  # learned-variance UNets: the mean part comes first
            out = out[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            x0 = x - s * out
        elif self.prediction_type == "v_prediction":
            # x_t = a x0 + b eps, v = a eps - b x0  =>  x0 = a x_t - b v, with a = sqrt(abar), b = sqrt(1 - abar)
            x0 = scale * (x * scale) - (s * scale) * out
        else:
            x0 = out
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 else x0

    def save_pretrained(self, folder) -> Path:
        from diffusers import DDPMPipeline

        folder = Path(folder)
        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(folder, safe_serialization=True)
        return folder


def _load_diffusers(path: str, clip_x0: float | None = None) -> DiffusersDenoiser:
    import diffusers

    def load(sub: str):
        cfg_name = "config.json" if sub == "unet" else "scheduler_config.json"
        local = Path(path) / sub / cfg_name
        if local.is_file():
            name = json.loads(local.read_text())["_class_name"]
        else:  # hub id: ask the hub for the config through diffusers
            cls = diffusers.UNet2DModel if sub == "unet" else diffusers.DDPMScheduler
            name = cls.load_config(path, subfolder=sub)["_class_name"]
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"{path}: unknown diffusers class {name!r} in {sub}/")
        return cls.from_pretrained(path, subfolder=sub)

    return DiffusersDenoiser(load("unet"), load("scheduler"), clip_x0=clip_x0)


ASSET_PREFIX = "cmkit:"


def asset_path(name: str) -> Path:
    """A model folder shipped inside the cmkit package (``cmkit/assets/NAME``)."""
    root = Path(__file__).parent / "assets"
    path = root / name
    if not path.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"no shipped model {name!r} (shipped: {', '.join(known) or 'none'})")
    return path


def load_teacher(path_or_hub_id, clip_x0: float | None = None):
    """A teacher denoiser from a cmkit teacher folder, a diffusers pipeline folder (``unet/`` + ``scheduler/``), a
    shipped teacher (``"cmkit:digits-ddpm"``) or a hub id (the real ``from_pretrained`` call; needs network access)."""
    path = str(path_or_hub_id)
    if not path:
        raise ValueError("no teacher given: pass --teacher PATH or set teacher.path in the recipe")
    if path.startswith(ASSET_PREFIX):
        path = str(asset_path(path[len(ASSET_PREFIX):]))
    p = Path(path)
    if p.is_dir():
        meta = read_meta(p)
        if meta is not None:
            if meta.get("kind") != EDMDenoiser.kind:
                raise ValueError(f"{path!r} holds a {meta.get('kind')!r}, not a teacher; give a teacher folder")
            return EDMDenoiser.from_pretrained(p)
        if (p / "unet").is_dir() and (p / "scheduler").is_dir():
            return _load_diffusers(path, clip_x0)
        raise ValueError(f"{path!r} is neither a cmkit teacher folder (cmkit.json) nor a diffusers pipeline folder "
                         "(unet/ + scheduler/)")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not p.suffix
    if not looks_like_hub_id:
        raise FileNotFoundError(f"teacher folder {path!r} does not exist; train one with `cmkit train-teacher RECIPE` "
                                "or give a diffusers folder or hub id")
    try:
        return _load_diffusers(path, clip_x0)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"could not load teacher {path!r}: no such folder here, and as a hub id ({first}); "
                                "download it where there is network access and pass the local folder") from e
