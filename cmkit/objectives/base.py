"""What every objective shares: its registration, the context it is built from, its config's base, and the paired
online/target passes of the consistency objectives.

An objective is an object with ``__call__(model, x0, target=None, step=0, **cond) -> scalar loss`` (``model`` the
network being trained, ``target`` the target network or None for the stop-gradient online network, ``step`` the
optimiser step for curricula) and ``target_ema(step) -> mu`` (0: no separate target network is kept). Randomness
comes from torch's global generator, which the trainer seeds once per step, so a resumed run draws exactly what an
uninterrupted one would. An objective may expose ``run_constants`` (a dict of values fixed when a run starts, such
as a curriculum's length), which a resumed run gets back through ``BuildContext.resumed``, and ``batches(n, device)
-> (x0, cond)`` where it trains on something other than the dataset's samples as they are (latents of the images,
prompt embeddings of the captions).

A kind registers itself with ``@register_objective(kind, ConfigClass, job=..., teacher=...)`` on its build function
``build(cfg, ctx) -> (model, objective)``; recipes, ``cmkit distill`` / ``train`` / ``train-teacher`` and
``--dry-run`` find it from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, Registry

Job = Literal["train-teacher", "distill", "train"]


@dataclass
class ObjectiveConfig:
    """The base of every kind's ``[objective]`` section: each kind adds its own keys (and only those are accepted)."""
    kind: str = "edm"


@dataclass
class LevelsConfig(ObjectiveConfig):
    """Keys of every kind that trains in sigma space."""
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sigma_data: float = SIGMA_DATA


@dataclass
class BuildContext:
    """What a kind's build function may use; the job layer fills it from the recipe, the data and the teacher."""
    make_backbone: Callable[[], nn.Module]   # a fresh backbone from the recipe's model section, for the data
    train_steps: int                         # train.steps of this run
    teacher: nn.Module | None = None         # a loaded denoiser (distillation, tuning)
    student: str = "edm"                     # model.student: "edm" or "teacher" (see ModelSection)
    distance: Callable | None = None         # replaces the config's distance (dry runs' stand-in LPIPS)
    resumed: dict = field(default_factory=dict)  # run_constants saved by the run being resumed
    data: Any = None                         # the run's Dataset (kinds that build from the data itself)
    seed: int = 0                            # the recipe's seed (kinds that initialise parts deterministically)
    teacher_path: str | None = None          # where the teacher came from (recorded by models that need it later)
    # latent kinds: (vae, prompt_encoder) -> the data's captioned images as those encoders' latents and prompt
    # embeddings, read row by row from the latent cache (cmkit.data.latent_cache.caption_encoder, which the job layer
    # hands in: an objective brings the encoders and never sees a file); None for data without captions
    encode_captions: Callable[[nn.Module, nn.Module], Any] | None = None
    cache_ready: Callable[[nn.Module], None] | None = None  # latent kinds: called with the teacher once its latent
    # cache is there, before anything is copied from it (the job layer moves the teacher's parts for training then)


@dataclass(frozen=True)
class ObjectiveSpec:
    kind: str
    config: type
    build: Callable
    job: Job
    teacher: Literal["none", "required"] = "none"


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective.kind")


def register_objective(kind: str, config: type, job: Job, teacher: Literal["none", "required"] = "none"):
    """Decorator for ``build(cfg, ctx) -> (model, objective)``."""
    def add(build):
        OBJECTIVES.register(kind, ObjectiveSpec(kind, config, build, job, teacher))
        return build
    return add


def kinds_for(job: Job) -> list[str]:
    return [k for k, spec in OBJECTIVES.items() if spec.job == job]


def paired_passes(model, target, x_hi, s_hi, x_lo, s_lo, **cond):
    """``(f_online(x_hi, s_hi), f_target(x_lo, s_lo))``, the target pass under no_grad, both passes drawing the
    same dropout masks (iCT): see ``replaying_draws``."""
    tgt = model if target is None else target
    replay = replaying_draws(tgt, x_hi.device)
    with replay(), torch.no_grad():
        f_target = tgt(x_lo, s_lo, **cond)
    with replay():
        return model(x_hi, s_hi, **cond), f_target


def replaying_draws(net: nn.Module, device: torch.device):
    """A factory of contexts that each start from the random state of now: passes run in them draw the same dropout
    masks (the online pass and its target, JVP or finite-difference passes). The last one leaves the generator
    where an unpaired run of that pass would. A network without active dropout draws nothing, so the state copy
    (per step) is skipped there: the same numbers either way."""
    if not _draws_randomness(net):
        return contextlib.nullcontext
    devices = [device] if device.type == "cuda" else []
    cpu, gpu = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay():
        torch.set_rng_state(cpu)
        for d, state in zip(devices, gpu, strict=True):
            torch.cuda.set_rng_state(state, d)
        yield

    return replay


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``torch.func.jvp`` does not accept the wrapper)."""
    return getattr(model, "module", model)


def _draws_randomness(net: nn.Module) -> bool:
    """Whether a forward pass of ``net`` draws random numbers (a dropout layer with p > 0 in training mode); the
    module walk is done once and kept on the network."""
    if not net.training:
        return False
    flag = net.__dict__.get("_cmkit_has_dropout")
    if flag is None:
        flag = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())
        net.__dict__["_cmkit_has_dropout"] = flag
    return flag


class GuidedLatentBatches:
    """The batch source of a distillation from a guided latent teacher (LCM, flow CD): latents drawn from the cached
    VAE posteriors (``self.encoded``, normalised by ``self.normalisation``), their prompts' conditioning, and the
    negatives the teacher's guidance takes; the target EMA the config names."""

    def target_ema(self, step: int) -> float:
        return self.cfg.target_ema

    def hold_teacher(self, teacher, encoded, cfg, lora: bool) -> None:
        """What a continuous-time distillation (sCD / rCM, DMD2) keeps: the teacher and its latents outside the
        module (never optimised, never checkpointed), the latents' normalisation, and the sigma range both the
        config and the teacher cover."""
        from ..latent.autoencoder import latent_normalisation

        self.__dict__.update(teacher=teacher, encoded=encoded)
        self.cfg, self.lora, self.sd = cfg, lora, float(cfg.sigma_data)
        self.normalisation = latent_normalisation(teacher.vae)
        self.sigma_lo = max(cfg.sigma_min, float(teacher.sigma_min))
        self.sigma_hi = min(cfg.sigma_max, float(teacher.sigma_max))

    def batches(self, n: int, device):
        z, cond = self.encoded.batch(n, device, self.normalisation)
        return z, {**cond, **{k: v.to(device) for k, v in self.encoded.negatives(n).items()}}


def encoded_captions(kind: str, ctx: BuildContext, teacher):
    """The run's captioned images (held in memory or streamed from shards) as the teacher's VAE latents and prompt
    embeddings (``ctx.encode_captions``, handed the teacher's encoders), for a kind that distils a text-to-image
    teacher; a one-line error for data without captions."""
    if ctx.encode_captions is None:
        raise ValueError(f"objective.kind {kind!r} trains on captioned images: set data.name = "
                         "'fashion_colours', data.path to a caption folder or webdataset shards, or data.hf_dataset")
    encoded = ctx.encode_captions(teacher.vae, teacher.prompt_encoder)
    if ctx.cache_ready is not None:
        ctx.cache_ready(teacher)
    return encoded
