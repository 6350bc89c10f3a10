"""The consistency model ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 log sigma)``.

The boundary scalings make ``f(x, sigma_min) = x`` exactly (c_skip = 1, c_out = 0 in floating point).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    boundary_scalings,
    c_noise,
    edm_scalings,
    karras_index,
    karras_steps,
)
from ..core.assets import resolve
from ..core.files import atomic_dir, refuse_pickles
from .backbones import network_of
from .denoisers import DiffusersDenoiser
from .folder import MODEL_KINDS, read_meta, read_model_folder, write_model_folder
from .precond import Preconditioned

# editing's default: this many points of the Karras grid from sigma_max (what benchmarks/editing_digits.py measures)
EDITING_STEPS = 18


@MODEL_KINDS.register("consistency_model")
class ConsistencyModel(Preconditioned):
    kind = "consistency_model"

    def __init__(self, backbone: nn.Module, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 sigma_data: float = SIGMA_DATA, default_sigmas: dict | None = None, *,
                 editing_sigmas=None):
        super().__init__(backbone, sigma_min, sigma_max, sigma_data)
        # steps -> the sigma list `sample(steps=n)` uses; filled by schedule searches, else a Karras default.
        self.default_sigmas = {int(k): [float(s) for s in v] for k, v in (default_sigmas or {}).items()}
        # the sigma list inpaint / colorize / superres use when given neither steps nor sigmas (None: derived)
        self.editing_sigmas = [float(s) for s in editing_sigmas] if editing_sigmas else None

    def scalings(self, sigma):
        return (*boundary_scalings(sigma, self.sigma_min, self.sigma_data), c_noise(sigma))

    def sigmas_for_steps(self, steps: int) -> list[float]:
        """The descending sigma list used for ``steps``-step sampling (first = sigma_max)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps in self.default_sigmas:
            return list(self.default_sigmas[steps])
        return self.karras_schedule(steps)

    def editing_schedule(self) -> list[float]:
        """The sigmas zero-shot editing uses by default: the folder's stored ``editing_sigmas``, else
        ``EDITING_STEPS`` (18) points of the Karras grid from sigma_max. One step is one denoise with the known
        pixels pasted back, where the missing pixels never see the known ones; many steps let them agree."""
        return list(self.editing_sigmas) if self.editing_sigmas else self.karras_schedule(EDITING_STEPS)

    def karras_schedule(self, steps: int) -> list[float]:
        """Karras spacing over steps + 1 points, dropping the last (a denoise at sigma_min is the identity)."""
        return karras_steps(steps, self.sigma_min, self.sigma_max)

    @classmethod
    def from_teacher(cls, teacher, **kwargs) -> ConsistencyModel:
        """A student whose backbone starts as a copy of the teacher's (same architecture, so the shapes agree)."""
        backbone = network_of(teacher)
        if backbone is teacher:
            raise ValueError(f"cannot copy a backbone out of {type(teacher).__name__}")
        kwargs.setdefault("sigma_min", teacher.sigma_min)
        kwargs.setdefault("sigma_max", teacher.sigma_max)
        return cls(copy.deepcopy(backbone).requires_grad_(True), **kwargs)

    def config_dict(self) -> dict:
        meta = {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "default_sigmas": {str(k): v for k, v in self.default_sigmas.items()}}
        if len(self.sample_shape) == 3:  # image models: the editing schedule travels with the weights
            meta["editing_sigmas"] = self.editing_schedule()
        return meta

    def save_pretrained(self, folder) -> Path:
        return write_model_folder(folder, network_of(self), self.config_dict())

    @classmethod
    def from_pretrained(cls, folder) -> ConsistencyModel:
        """A cmkit consistency-model folder (any kind), or a diffusers ``ConsistencyModelPipeline`` folder
        (``unet/`` + ``scheduler/``, e.g. one written by ``to_diffusers`` or openai's released checkpoints), or a
        shipped one by name (``"cmkit:digits-cd"``)."""
        folder = Path(resolve(folder))
        if (folder / "model_index.json").is_file() and not (folder / "cmkit.json").is_file():
            return cls._from_diffusers_pipeline(folder)
        meta = read_meta(folder)
        if meta is not None and meta.get("kind") != cls.kind and meta.get("kind") in MODEL_KINDS:
            other = MODEL_KINDS[meta["kind"]]
            if issubclass(other, cls):
                return other.from_pretrained(folder)
        backbone, meta = read_model_folder(folder, cls.kind)
        return cls(backbone, meta["sigma_min"], meta["sigma_max"], meta["sigma_data"],
                   meta.get("default_sigmas")).with_editing_sigmas(meta)

    def with_editing_sigmas(self, meta: dict):
        """Take a folder's stored editing schedule (checked against the model's sigma range when used)."""
        stored = meta.get("editing_sigmas")
        if stored is not None and not (isinstance(stored, list) and all(isinstance(v, (int, float)) for v in stored)):
            raise ValueError(f"editing_sigmas in cmkit.json must be a list of numbers, got {stored!r}")
        self.editing_sigmas = [float(v) for v in stored] if stored else None
        return self

    @classmethod
    def _from_diffusers_pipeline(cls, folder: Path) -> ConsistencyModel:
        from diffusers import CMStochasticIterativeScheduler, UNet2DModel

        index = json.loads((folder / "model_index.json").read_text())
        if index.get("_class_name") != "ConsistencyModelPipeline":
            raise ValueError(f"{str(folder)!r} holds a {index.get('_class_name')}, not a ConsistencyModelPipeline")
        sched = CMStochasticIterativeScheduler.from_pretrained(folder, subfolder="scheduler")
        refuse_pickles(folder / "unet", "the unet")
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        c = sched.config
        return cls(unet, c.sigma_min, c.sigma_max, c.sigma_data)

    def to_diffusers(self, folder, num_train_timesteps: int = 40) -> Path:
        """Write a ``ConsistencyModelPipeline`` folder (``UNet2DModel`` + ``CMStochasticIterativeScheduler`` with
        this model's sigma range and sigma_data; no clipping, as ``cmkit.sample``).

        The pipeline picks multistep sigmas from a Karras grid of ``num_train_timesteps`` points (its integer
        ``timesteps`` index that grid); ``pipeline_timesteps(steps)`` gives the timesteps nearest this model's
        own schedule."""
        from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

        if not isinstance(self.backbone, UNet2DModel):
            raise ValueError(f"diffusers' ConsistencyModelPipeline runs UNet2DModel backbones, this model has a "
                             f"{type(self.backbone).__name__}; use save_pretrained instead")
        sched = CMStochasticIterativeScheduler(num_train_timesteps=num_train_timesteps, sigma_min=self.sigma_min,
                                               sigma_max=self.sigma_max, sigma_data=self.sigma_data, rho=RHO,
                                               clip_denoised=False)
        folder = Path(folder)
        with atomic_dir(folder) as tmp:  # a full disk names the folder and leaves the previous one intact
            ConsistencyModelPipeline(unet=self.backbone, scheduler=sched).save_pretrained(tmp, safe_serialization=True)
        return folder

    def pipeline_timesteps(self, steps: int, num_train_timesteps: int = 40) -> list[int]:
        """Integer ``timesteps`` for ``ConsistencyModelPipeline(timesteps=...)`` nearest to ``sigmas_for_steps``.

        The scheduler reverses the (descending) timesteps and reads each as the index, counted from sigma_max, of
        a point on its Karras grid of ``num_train_timesteps`` points; so the first sigma comes from the last
        timestep."""
        index = [karras_index(s, num_train_timesteps, self.sigma_min, self.sigma_max)
                 for s in self.sigmas_for_steps(steps)]
        if len(set(index)) < len(index):
            raise ValueError(f"{num_train_timesteps} grid points are too coarse for this {steps}-step schedule; "
                             "export with a larger num_train_timesteps")
        return index[::-1]


@MODEL_KINDS.register("denoiser_consistency_model")
class DenoiserConsistencyModel(ConsistencyModel):
    """A consistency model around a trainable diffusion denoiser ``D`` kept in its own parameterisation (a diffusers
    DDPM-family UNet: VP inputs, epsilon / v / x0 outputs), so that ECT can start from such a teacher as it is:

        f(x, sigma) = c_skip(sigma) x + c_out(sigma) / c_out^EDM(sigma) (D(x, sigma) - c_skip^EDM(sigma) x)
                    = c_skip(sigma) x + (1 - sigma_min / sigma) (D(x, sigma) - c_skip^EDM(sigma) x)

    with the boundary scalings (c_skip, c_out) and EDM's (c_skip^EDM, c_out^EDM). For an EDM denoiser, where
    ``D = c_skip^EDM x + c_out^EDM F``, this is exactly ``ConsistencyModel``'s f. For any denoiser,
    ``f(x, sigma_min) = x`` exactly, and f = D + O(sigma_min / sigma) elsewhere, so at initialisation one step of f is
    one step of the teacher: the premise ECT fine-tunes from. (Copying a VP UNet into the EDM parameterisation
    instead gives a network that means nothing at first, since its inputs, time input and output units all change.)
    """

    kind = "denoiser_consistency_model"

    def __init__(self, denoiser: DiffusersDenoiser, sigma_min: float | None = None, sigma_max: float | None = None,
                 sigma_data: float = SIGMA_DATA, default_sigmas: dict | None = None):
        if not isinstance(denoiser, DiffusersDenoiser):
            raise ValueError(f"DenoiserConsistencyModel wraps a DiffusersDenoiser, got {type(denoiser).__name__}; "
                             "for an EDM teacher use ConsistencyModel.from_teacher")
        # the "backbone" F is the whole denoiser D (its UNet is what trains and what the folder stores)
        super().__init__(denoiser, max(sigma_min or 0.0, denoiser.sigma_min),
                         min(sigma_max or float("inf"), denoiser.sigma_max), sigma_data, default_sigmas)

    @property
    def denoiser(self) -> DiffusersDenoiser:
        return self.backbone

    def scalings(self, sigma):
        """f = c_skip x + r (D(x, sigma) - c_skip^EDM x), r = c_out / c_out^EDM = 1 - sigma_min / sigma, written in the
        shared form with F = D: c_skip' = c_skip - r c_skip^EDM, c_out' = r, c_in' = 1 and D's own time input sigma.
        At sigma_min r is exactly 0, so c_skip' = 1 and c_out' = 0 in floating point."""
        c_skip = boundary_scalings(sigma, self.sigma_min, self.sigma_data)[0]
        ratio = 1 - self.sigma_min / sigma
        return c_skip - ratio * edm_scalings(sigma, self.sigma_data)[0], ratio, torch.ones_like(sigma), sigma

    @classmethod
    def from_teacher(cls, teacher, **kwargs) -> DenoiserConsistencyModel:
        """A student that starts as a trainable copy of the whole teacher denoiser (UNet and noise schedule)."""
        return cls(copy.deepcopy(teacher).requires_grad_(True), **kwargs)

    def config_dict(self) -> dict:
        sched = self.denoiser.scheduler
        # diffusers' own serialisation of the scheduler config (with its _class_name), as scheduler_config.json holds
        return {**super().config_dict(), "prediction_type": self.denoiser.prediction_type,
                "clip_x0": self.denoiser.clip_x0, "scheduler": json.loads(sched.to_json_string())}

    @classmethod
    def from_pretrained(cls, folder) -> DenoiserConsistencyModel:
        import diffusers

        backbone, meta = read_model_folder(folder, cls.kind)
        name = meta["scheduler"].get("_class_name")
        sched_cls = getattr(diffusers, str(name), None)
        if sched_cls is None:
            raise ValueError(f"{str(folder)!r}: unknown diffusers scheduler {name!r}")
        denoiser = DiffusersDenoiser(backbone, sched_cls.from_config(meta["scheduler"]),
                                     meta["prediction_type"], meta.get("clip_x0"))
        return cls(denoiser, meta["sigma_min"], meta["sigma_max"], meta["sigma_data"],
                   meta.get("default_sigmas")).with_editing_sigmas(meta)

    def to_diffusers(self, folder, num_train_timesteps: int = 40) -> Path:
        raise ValueError("diffusers' ConsistencyModelPipeline runs EDM-parameterised consistency models; this one "
                         "keeps its teacher's VP parameterisation, so save it with save_pretrained instead")
