"""sCD (Lu & Song 2024) and rCM (Zheng et al. 2026) on latent text-to-image teachers, UNet and flow alike.

Any teacher's schedule is mapped to TrigFlow by matching signal-to-noise ratios: cmkit's sigma-space state
``x = x0 + sigma eps`` at ``sigma = sd tan t`` is the TrigFlow state ``x_t = cos(t) x``. The student keeps the
parameterisation its teacher's pipeline samples (a flow student ``x_t - t v``, an LCM's boundary scalings) and is
read in TrigFlow through its sigma-space consistency function ``D_theta``:

    F_theta(x_t, t) = (cos(t) x_t - D_theta(x_t / cos t, sd tan t)) / (sd sin t),   so f = cos t x_t - sd sin t F.

The tangent is sCM's (``objectives.scm``): the teacher's guided PF-ODE velocity
``dx_t/dt = (cos t x_t - D_w(x_t / cos t, sd tan t)) / sin t`` (classifier-free guidance with ``w ~ U[w_min, w_max]``
folded into the student; Flux-dev's guidance embedding in one pass), one JVP of ``F^-`` through the student (math
attention kernel) or a central finite difference, ``g / (||g|| + c)``, ``||F_theta - F^- - g||^2`` with the learnt
weighting ``w_phi(t)`` or none.

rCM adds the reverse divergence (DMD) on the student's own samples. After ``tangent_warmup`` steps, one step in
``student_update_every`` updates the student, the others a fake-score network (a trainable copy of the teacher,
this objective's own module: optimised, checkpointed, all-reduced) by denoising score matching on the student's
samples. The student's sample ``G`` comes from 1-``dmd_max_steps`` steps (the last with gradients) from pure noise;
noised to ``x = G + s eps`` at ``s`` from the flow-shifted proposal, the regulariser is

    grad = (D_fake(x, s) - D_w(x, s)) / mean|G - D_w(x, s)|,      loss_dmd = ||G - sg(G - grad)||^2 / D,

whose gradient in ``G`` is ``2 grad / D`` (the KL's: fake score minus real score, DMD's normalisation), weighted
``dmd_weight`` against the sCM term (rCM's 1 : 100); the fake score's loss is ``||G - D_fake(x, s)||^2 / sin^2 t``.
These pieces live in ``objectives.dmd``, shared with DMD2.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core import append_dims
from ..core.checks import finite_number
from ..core.proposals import shifted_uniform_sigmas, trigflow_times
from ..latent.denoiser import TextToImageModel
from ..latent.students import adapters_off
from .base import (
    BuildContext,
    GuidedLatentBatches,
    ObjectiveConfig,
    encoded_captions,
    register_objective,
    replaying_draws,
    unwrapped,
)
from .dmd import dmd_loss, fake_denoising_loss, student_sample
from .flow_cd import flow_student
from .lcm import lcm_student
from .scm import AdaptiveWeight, adaptive_weighted_loss, normalise_tangent, scm_tangent
from .students import LoRAKeys, latent_teacher, lora_spec
from .tangents import check_tangent_method


@dataclass
class LatentSCDConfig(ObjectiveConfig):
    kind: str = "latent_scd"
    sigma_data: float = 1.0            # the VAE-normalised latents' scale (rCM's 1.0)
    sigma_min: float = 0.002           # the TrigFlow times' range, cut to the teacher's
    sigma_max: float = 80.0
    p_mean: float = -0.8               # sCD's proposal: log(sd tan t) ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    tangent_warmup: int = 1000         # steps over which the tangent's second term is ramped in (0: none)
    tangent_norm_c: float = 0.1
    adaptive_weight: bool = True       # sCM's learnt w_phi(t)
    weight_embed_dim: int = 128
    tangent: str = "jvp"               # jvp | jvp_math | finite_difference
    fd_step: float = 1e-3
    w_min: float = 4.0                 # the teacher's guidance scale w ~ U[w_min, w_max] (pipeline convention)
    w_max: float = 4.0
    sample_steps: int = 4              # a flow student's recorded default step count
    sampler: str = "consistency"       # a flow student's export: consistency (re-noising, as sCM samples) | euler
    w_embedding_dim: int = 256         # a full UNet student's guidance embedding (0: guidance folded in)
    timestep_scaling: float = 10.0     # a UNet student's LCM boundary scalings
    num_ddim_timesteps: int = 50       # a UNet student's LCMScheduler grid
    teacher_pipeline: str = "any"      # the pipeline class the recipe was written for (checked), or "any"


@dataclass
class SCMLoRAKeys(LoRAKeys):
    """A LoRA student's keys (sCD and rCM alike)."""
    w_embedding_dim: int = 0           # the adapter leaves the teacher's inputs as they are


@dataclass
class LatentSCDLoRAConfig(SCMLoRAKeys, LatentSCDConfig):
    kind: str = "latent_scd_lora"


@dataclass
class LatentRCMConfig(LatentSCDConfig):
    kind: str = "latent_rcm"
    adaptive_weight: bool = False      # rCM trains with a fixed weighting
    dmd_weight: float = 0.01           # the DMD term against the sCM term (rCM: 1 against 100)
    student_update_every: int = 5      # after the warm-up, one student step in this many; the rest train the fake score
    fake_lr_scale: float = 0.2         # the fake score's learning rate over the student's (rCM: 4e-7 / 2e-6)
    dmd_max_steps: int = 4             # the student's DMD samples take 1..this many steps
    dmd_shift: float = 5.0             # DMD noise: flow time s = shift u / (1 + (shift - 1) u), sigma = s / (1 - s)


@dataclass
class LatentRCMLoRAConfig(SCMLoRAKeys, LatentRCMConfig):
    kind: str = "latent_rcm_lora"


class TrigFlowView:
    """``F(x_t / sd, t)`` of a sigma-space consistency function (module docstring), the call ``scm_tangent`` takes."""

    def __init__(self, fn, sigma_data: float):
        self.fn, self.sd = fn, sigma_data

    def __call__(self, x_scaled: torch.Tensor, raw_time: torch.Tensor, **cond) -> torch.Tensor:
        x_t = x_scaled * self.sd
        cos, sin = (append_dims(v, x_t.ndim) for v in (torch.cos(raw_time), torch.sin(raw_time)))
        d = self.fn(x_t / cos, self.sd * torch.tan(raw_time), **cond)
        return (cos * x_t - d) / (self.sd * sin)


def _twice(cond: dict, n: int) -> dict:
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in cond.items()}


class LatentSCM(GuidedLatentBatches, nn.Module):
    """sCD, or rCM when ``fake`` (the fake-score denoiser) is given (module docstring)."""

    def __init__(self, teacher: TextToImageModel, encoded, cfg: LatentSCDConfig, lora: bool = False, fake=None,
                 student_takes_w: bool = False):
        nn.Module.__init__(self)
        self.hold_teacher(teacher, encoded, cfg, lora)
        self.weight = AdaptiveWeight(cfg.weight_embed_dim) if cfg.adaptive_weight else None
        self.fake, self.student_takes_w = fake, student_takes_w
        self.sigma_start = float(teacher.sigma_max)  # the student samples from here (inf: the state is the noise)

    def target_ema(self, step: int) -> float:
        return 0.0  # sCM's target is the student itself under stop-gradient

    def trained_networks(self) -> list[nn.Module]:
        """The objective's own trained networks, sharded beside the student under ``train.fsdp`` (the fake score is
        a whole copy of the teacher's network: on Flux 190 GB of float32 weights, moments and gradients)."""
        return [self.fake] if self.fake is not None else []

    def lr_groups(self) -> list[tuple[list, float]]:
        """The objective's trainable parameters by learning-rate scale (the fake score trains slower)."""
        fake = [p for p in self.fake.parameters() if p.requires_grad] if self.fake is not None else []
        weight = list(self.weight.parameters()) if self.weight is not None else []
        return [(weight, 1.0), (fake, getattr(self.cfg, "fake_lr_scale", 1.0))]

    # --- what each step draws
    def times(self, n: int, device) -> torch.Tensor:
        return trigflow_times(n, self.cfg.p_mean, self.cfg.p_std, self.sd, self.sigma_lo, self.sigma_hi, device=device)

    def dmd_sigmas(self, n: int, device) -> torch.Tensor:
        return shifted_uniform_sigmas(n, self.cfg.dmd_shift, self.sigma_lo, self.sigma_hi, device=device)

    def student_cond(self, pos: dict, w: torch.Tensor) -> dict:
        """A student with a guidance embedding (a full LCM) is told ``w``; the rest have it folded in."""
        return {**pos, "guidance_scale": w} if self.student_takes_w else pos

    def _teacher_weights(self):
        return adapters_off(self.teacher.network) if self.lora else contextlib.nullcontext()

    def _real(self, x, sigma, w, cond):
        with torch.no_grad(), self._teacher_weights():
            return self.teacher(x, sigma, guidance_scale=w, **cond)

    # --- phases
    def student_phase(self, step: int) -> bool:
        c = self.cfg
        return self.fake is None or step < c.tangent_warmup or (step - c.tangent_warmup) % c.student_update_every == 0

    def _counts(self, step: int) -> tuple[int, int]:
        """(student updates, fake-score updates) before ``step``: they pick the DMD samples' step counts, as rCM."""
        c = self.cfg
        if step < c.tangent_warmup:
            return step, 0
        students = c.tangent_warmup + (step - c.tangent_warmup) // c.student_update_every
        return students, step - students - 1

    def student_sample(self, net, z0: torch.Tensor, scond: dict, no_grad_steps: int):
        """``(x, sigma)`` after ``no_grad_steps`` consistency steps from pure noise, re-noised at DMD times."""
        n = z0.shape[0]
        return student_sample(net, z0, scond, no_grad_steps, self.sigma_start,
                              lambda i, s: torch.minimum(self.dmd_sigmas(n, z0.device).to(z0.dtype), s))

    def forward(self, model, z0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        c, n = self.cfg, z0.shape[0]
        w = c.w_min + (c.w_max - c.w_min) * torch.rand(n, device=z0.device)
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        scond = self.student_cond(pos, w)
        if not self.student_phase(step):
            return self.fake_score_loss(unwrapped(model), z0, scond, pos, step)
        t = self.times(n, z0.device).to(z0.dtype)
        cos, sin = (append_dims(v, z0.ndim) for v in (torch.cos(t), torch.sin(t)))
        x_t = cos * z0 + sin * (self.sd * torch.randn_like(z0))
        sigma = self.sd * torch.tan(t)
        dxdt = (cos * x_t - self._real(x_t / cos, sigma, w, cond)) / sin
        net = TrigFlowView(unwrapped(model) if target is None else target, self.sd)
        replay = replaying_draws(unwrapped(model), z0.device)
        r = min(1.0, step / c.tangent_warmup) if c.tangent_warmup else 1.0
        f_minus, g = scm_tangent(net, x_t, t, dxdt, self.sd, r, c.tangent, c.fd_step, replay, **scond)
        g = normalise_tangent(g, c.tangent_norm_c).to(z0.dtype)
        dmd = self.fake is not None and step > c.tangent_warmup
        with replay():
            if dmd:  # the sCM pass and the DMD sample's last step in one batch (one pass through a DDP wrapper)
                x_g, s_g = self.student_sample(unwrapped(model), z0, scond, self._counts(step)[0] % c.dmd_max_steps)
                d_online, g_x0 = model(torch.cat([x_t / cos, x_g]), torch.cat([sigma, s_g]),
                                       **_twice(scond, n)).chunk(2)
            else:
                d_online = model(x_t / cos, sigma, **scond)
        f_online = (cos * x_t - d_online) / (self.sd * sin)
        sq = (f_online - f_minus.to(z0.dtype) - g).pow(2).flatten(1).sum(1)
        dim = z0[0].numel()
        loss = sq / dim if self.weight is None else adaptive_weighted_loss(sq, self.weight(t), dim)
        if dmd:
            loss = loss + c.dmd_weight * self.dmd_term(g_x0, w, pos, cond)
        return loss.mean()

    def dmd_term(self, g_x0: torch.Tensor, w, pos: dict, cond: dict) -> torch.Tensor:
        s = self.dmd_sigmas(g_x0.shape[0], g_x0.device).to(g_x0.dtype)
        x = (g_x0 + append_dims(s, g_x0.ndim) * torch.randn_like(g_x0)).detach()
        with torch.no_grad():
            x_fake = self.fake(x, s, **pos)
        return dmd_loss(g_x0, x_fake, self._real(x, s, w, cond))

    def fake_score_loss(self, student, z0: torch.Tensor, scond: dict, pos: dict, step: int) -> torch.Tensor:
        """Denoising score matching of the fake score on the student's own samples, ``1 / sin^2 t`` weighted."""
        with torch.no_grad():
            x_g, s_g = self.student_sample(student, z0, scond, self._counts(step)[1] % self.cfg.dmd_max_steps)
            g_x0 = student(x_g, s_g, **scond)
        s = self.dmd_sigmas(z0.shape[0], z0.device).to(z0.dtype)
        x = g_x0 + append_dims(s, z0.ndim) * torch.randn_like(z0)
        return fake_denoising_loss(self.fake(x, s, **pos), g_x0, s, self.sd).mean()


def _check(cfg: LatentSCDConfig) -> None:
    check_tangent_method(cfg.tangent, cfg.fd_step)
    finite_number(cfg.w_max, "objective.w_max", "the largest guidance scale drawn")
    finite_number(cfg.p_mean, "objective.p_mean", "sCD's is -0.8")
    if not 1 <= cfg.w_min <= cfg.w_max:
        raise ValueError(f"objective.w_min ({cfg.w_min}) must be >= 1 and <= objective.w_max ({cfg.w_max})")
    if not (0 < cfg.sigma_min < cfg.sigma_max and cfg.sigma_data > 0 and cfg.p_std > 0):
        raise ValueError("objective.sigma_min < sigma_max, sigma_data > 0 and p_std > 0 are needed, "
                         f"got {cfg.sigma_min}, {cfg.sigma_max}, {cfg.sigma_data}, {cfg.p_std}")
    if not (cfg.tangent_warmup >= 0 and cfg.tangent_norm_c >= 0 and cfg.sample_steps >= 1):
        raise ValueError("objective.tangent_warmup and tangent_norm_c must be >= 0 and sample_steps >= 1")
    if isinstance(cfg, LatentRCMConfig) and not (
            cfg.dmd_weight >= 0 and cfg.student_update_every >= 1 and cfg.fake_lr_scale > 0 and cfg.dmd_max_steps >= 1
            and cfg.dmd_shift > 0):
        raise ValueError("objective.dmd_weight >= 0, student_update_every >= 1, fake_lr_scale > 0, dmd_max_steps >= 1 "
                         f"and dmd_shift > 0 are needed, got {cfg.dmd_weight}, {cfg.student_update_every}, "
                         f"{cfg.fake_lr_scale}, {cfg.dmd_max_steps}, {cfg.dmd_shift}")


def _build(cfg: LatentSCDConfig, ctx: BuildContext, lora: bool, rcm: bool):
    _check(cfg)
    teacher = latent_teacher(cfg, ctx)
    encoded = encoded_captions(cfg.kind, ctx, teacher)
    flow = teacher.family.student == "flow_cm"
    # the fake score starts as the teacher, copied before a LoRA student's adapter goes onto the teacher's network
    fake = copy.deepcopy(teacher.denoiser).float().requires_grad_(True) if rcm else None
    spec = None
    if lora:
        spec = lora_spec(cfg, teacher)
    if flow:
        model = flow_student(teacher, ctx, cfg.sample_steps, (cfg.w_min + cfg.w_max) / 2, spec, cfg.sampler)
    else:
        model = lcm_student(teacher, ctx, cfg.num_ddim_timesteps, cfg.timestep_scaling,
                            0 if lora else cfg.w_embedding_dim, spec)
    takes_w = not flow and model.denoiser.embeds_guidance
    return model, LatentSCM(teacher, encoded, cfg, lora=lora, fake=fake, student_takes_w=takes_w)


def _builder(lora: bool, rcm: bool, doc: str):
    def build(cfg: LatentSCDConfig, ctx: BuildContext):
        return _build(cfg, ctx, lora=lora, rcm=rcm)
    build.__doc__ = doc
    return build


build = register_objective("latent_scd", LatentSCDConfig, job="distill", teacher="required")(_builder(
    False, False, "sCD of a latent text-to-image teacher (UNet or flow): a full student initialised from it."))
build_lora = register_objective("latent_scd_lora", LatentSCDLoRAConfig, job="distill", teacher="required")(_builder(
    True, False, "sCD into a LoRA adapter on the teacher's own network (the teacher's pass with the adapter off)."))
build_rcm = register_objective("latent_rcm", LatentRCMConfig, job="distill", teacher="required")(_builder(
    False, True, "rCM: sCD plus the DMD regulariser, with a fake-score network trained on the student's samples."))
build_rcm_lora = register_objective("latent_rcm_lora", LatentRCMLoRAConfig, job="distill", teacher="required")(
    _builder(True, True, "rCM with a LoRA student (the fake score is a full copy of the teacher's network)."))
