"""DMD2 (Yin et al. 2024, arXiv 2405.14867): a few-step generator distilled from a latent text-to-image teacher (UNet
or flow) by distribution matching, with a GAN head and the two time-scale rule.

The generator is the student class the teacher's other students use (a flow teacher's ``FlowConsistencyModel``, a
UNet teacher's LCM student), initialised from the teacher, sampling in ``objective.steps`` (1-4) consistency steps
(denoise, re-noise) over its own grid, so it exports exactly as those do. Each optimiser step:

- **backward simulation**: ``k ~ U{0, .., steps - 1}`` steps of the generator's own sampling from pure noise (no
  gradient) give the state ``(x_k, sigma_k)`` it is trained at; ``G = G_theta(x_k, sigma_k)`` its sample.
- **fake score and head** (every step): ``G`` (no gradient) and a real latent ``z0`` noised at the same DMD level
  ``s`` (rCM's flow-shifted draw); one pass of the fake-score network on both; its loss is the denoising loss on the
  generated half (``objectives.dmd``) plus ``fake_gan_weight`` times the head's non-saturating classification loss
  ``softplus(-h(real)) + softplus(h(fake))``, the head ``h`` reading the fake network's middle block (a forward hook;
  a per-token MLP whose logits are averaged, as DMD2's convolutional head averages its map).
- **generator** (one step in ``fake_updates``: DMD2's ``dfake_gen_update_ratio``): ``x = G + s eps``; DMD's gradient
  ``(D_fake(x, s) - D_w(x, s)) / mean|G - D_w(x, s)|`` with ``D_w`` the teacher's guided prediction (``w ~ U[w_min,
  w_max]``, folded into the generator), plus ``gan_weight`` times ``softplus(-h(x))`` through the frozen fake
  network and head into ``G``.

The phase is the trainer's step number, so a resumed run trains exactly as an unbroken one. The fake score is a
trainable copy of the teacher's network (``dmd2``) or, for ``dmd2_lora``, a second peft adapter (``"fake"``) on the
teacher's own network, which the student's adapter shares: one copy of the base weights, the adapters switched per
pass. Fake score and head are this objective's (optimised at ``fake_lr_scale``, checkpointed, never exported).
``log_metrics`` adds the collapse signals to the log rows: the generator's sample diversity (mean per-element std
across the batch of ``G``), the fake score's denoising loss and the head's loss.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import append_dims
from ..core.checks import finite_number
from ..core.proposals import shifted_uniform_sigmas
from ..latent.denoiser import TextToImageModel
from ..latent.students import adapters_off
from .base import BuildContext, GuidedLatentBatches, ObjectiveConfig, encoded_captions, register_objective, unwrapped
from .dmd import dmd_loss, fake_denoising_loss, student_sample
from .flow_cd import flow_student
from .lcm import lcm_student
from .students import LoRAKeys, latent_teacher, lora_spec

FAKE = "fake"  # the fake score's peft adapter name (dmd2_lora); the student's is peft's "default"


@dataclass
class DMD2Config(ObjectiveConfig):
    kind: str = "dmd2"
    steps: int = 1                     # the generator's sampling steps (1-4), trained by backward simulation
    w_min: float = 4.5                 # the real score's guidance w ~ U[w_min, w_max] (pipeline convention)
    w_max: float = 4.5
    fake_updates: int = 5              # fake-score / head updates per generator update (DMD2: 5)
    gan_weight: float = 5e-3           # the generator's GAN term (DMD2 SDXL: gen_cls_loss_weight 5e-3)
    fake_gan_weight: float = 1e-2      # the head's classification loss beside the fake score's (DMD2: 1e-2)
    fake_lr_scale: float = 1.0         # the fake score's and head's learning rate over the generator's (DMD2: same)
    head_width: int = 256              # the GAN head's hidden width
    dmd_shift: float = 3.0             # DMD / GAN noise: flow time s = shift u / (1 + (shift - 1) u)
    sigma_min: float = 0.002           # the DMD levels' range, cut to the teacher's
    sigma_max: float = 80.0
    sigma_data: float = 1.0            # the fake score's loss weighting (1 / sin^2 t)
    timestep_scaling: float = 10.0     # a UNet generator's LCM boundary scalings
    num_ddim_timesteps: int = 50       # a UNet generator's LCMScheduler grid
    teacher_pipeline: str = "any"      # the pipeline class the recipe was written for (checked), or "any"


@dataclass
class DMD2LoRAConfig(LoRAKeys, DMD2Config):
    kind: str = "dmd2_lora"
    fake_lora_rank: int = 0            # the fake score's adapter (0: the student's rank and alpha)


class GANHead(nn.Module):
    """One logit per sample from a feature map: a per-position MLP (channels-first maps ``(B, C, ...)`` or token
    sequences ``(B, L, C)``) whose logits are averaged."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        f = feats.float()
        f = f.flatten(2).transpose(1, 2) if f.ndim >= 4 else f
        return self.net(f).squeeze(-1).mean(1)


def middle_block(network: nn.Module) -> tuple[nn.Module, int]:
    """The block whose output the GAN head reads, and its channel count: a UNet's ``mid_block``, else the middle of
    a transformer's block list."""
    cfg = network.config
    if getattr(network, "mid_block", None) is not None:
        return network.mid_block, int(cfg.block_out_channels[-1])
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(network, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks[len(blocks) // 2], int(cfg.num_attention_heads * cfg.attention_head_dim)
    raise ValueError(f"objective.kind 'dmd2': no middle block found in a {type(network).__name__} for the GAN head")


def gan_losses(real_logits: torch.Tensor | None, fake_logits: torch.Tensor) -> torch.Tensor:
    """The head's non-saturating loss per sample: ``softplus(-h(real)) + softplus(h(fake))``."""
    loss = F.softplus(fake_logits)
    return loss if real_logits is None else loss + F.softplus(-real_logits)


class DMD2(GuidedLatentBatches, nn.Module):
    """DMD2 (module docstring). ``fake`` is the fake-score denoiser: a trainable copy (a submodule), or for a LoRA
    student the teacher's own denoiser with the ``"fake"`` adapter (not a submodule: its adapter's parameters are
    the student network's, claimed here through ``lr_groups``)."""

    def __init__(self, teacher: TextToImageModel, encoded, cfg: DMD2Config, student, fake, lora: bool = False):
        nn.Module.__init__(self)
        self.hold_teacher(teacher, encoded, cfg, lora)
        if lora:
            self.__dict__["fake"] = fake
        else:
            self.fake = fake
        block, channels = middle_block(fake.network)
        self.head = GANHead(channels, cfg.head_width)
        self._feats: list = []
        self._capture = False
        # a plain function (copies of the network, such as the trainer's export copy of a LoRA student, share it
        # rather than copying this objective along with a bound method)
        block.register_forward_hook(lambda module, args, out, own=self: own._hook(out))
        self.grid, self.start_scale = generator_grid(student, cfg.steps)
        self._metrics: dict = {}

    def _hook(self, out):
        if self._capture:
            self._feats.append(out[-1] if isinstance(out, tuple) else out)

    def target_ema(self, step: int) -> float:
        return 0.0  # no target network

    # --- what the trainer asks
    def fake_parameters(self) -> list:
        if self.lora:
            return [p for n, p in self.fake.network.named_parameters() if f".{FAKE}." in n]
        return [p for p in self.fake.parameters() if p.requires_grad]

    def trained_networks(self) -> list[nn.Module]:
        return [] if self.lora else [self.fake]

    def lr_groups(self) -> list[tuple[list, float]]:
        return [(self.fake_parameters() + list(self.head.parameters()), self.cfg.fake_lr_scale)]

    def log_metrics(self) -> dict:
        """The collapse signals since the last log row (means over the steps that computed them); then reset."""
        out = {k: (v / n).item() for k, (v, n) in self._metrics.items() if n}
        self._metrics = {}
        return out

    def _tally(self, name: str, value: torch.Tensor) -> None:
        total, n = self._metrics.get(name, (0.0, 0))
        self._metrics[name] = (total + value.detach().float(), n + 1)

    # --- phases and draws
    def generator_phase(self, step: int) -> bool:
        return step % self.cfg.fake_updates == 0

    def dmd_sigmas(self, n: int, device, dtype) -> torch.Tensor:
        return shifted_uniform_sigmas(n, self.cfg.dmd_shift, self.sigma_lo, self.sigma_hi, device=device).to(dtype)

    def simulate(self, student, z0: torch.Tensor, pos: dict, k: int):
        """Backward simulation: the state after ``k`` steps of the generator's own sampling, from pure noise."""
        grid = [torch.full((z0.shape[0],), s, device=z0.device, dtype=z0.dtype) for s in self.grid]
        return student_sample(student, z0, pos, k, self.grid[0], lambda i, s: grid[i + 1], self.start_scale)

    # --- the networks' passes
    def _real(self, x, sigma, w, cond):
        with torch.no_grad(), (adapters_off(self.teacher.network) if self.lora else contextlib.nullcontext()):
            out = self.teacher(x, sigma, guidance_scale=w, **cond)
        self._student_adapter()
        return out

    @contextlib.contextmanager
    def _fake_pass(self, trainable: bool):
        """The fake network (its adapter switched on for a LoRA student) with the hook capturing; ``trainable``
        False: its and the head's parameters take no gradient from this pass (the generator's GAN term)."""
        params = self.fake_parameters() + list(self.head.parameters())
        net = self.fake.network
        # gradient checkpointing recomputes a block in the backward pass under the adapter active then (the
        # student's): the fake adapter's passes keep their activations instead
        recompute = self.lora and getattr(net, "is_gradient_checkpointing", False)
        if self.lora:
            net.set_adapter(FAKE)
        if recompute:
            net.disable_gradient_checkpointing()
        for p in params:
            p.requires_grad_(trainable)
        self._feats, self._capture = [], True
        try:
            yield
        finally:
            self._capture, self._feats = False, []
            for p in params:
                p.requires_grad_(True)
            if recompute:
                net.enable_gradient_checkpointing()
            self._student_adapter()

    def _student_adapter(self) -> None:
        """A LoRA student's adapter active again, and every adapter's weights trainable (peft's ``set_adapter``
        freezes the inactive ones)."""
        if not self.lora:
            return
        self.fake.network.set_adapter("default")
        for n, p in self.fake.network.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)

    def _fake_and_logits(self, x, s, pos, trainable: bool):
        with self._fake_pass(trainable):
            out = self.fake(x, s, **pos)
            logits = self.head(self._feats[-1])
        return out, logits

    # --- the losses
    def forward(self, model, z0: torch.Tensor, target=None, step: int = 0, **cond) -> torch.Tensor:
        c, n = self.cfg, z0.shape[0]
        w = c.w_min + (c.w_max - c.w_min) * torch.rand(n, device=z0.device)
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        student = unwrapped(model)
        k = int(torch.randint(c.steps, ()).item())
        x_k, s_k = self.simulate(student, z0, pos, k)
        if self.generator_phase(step):
            g_x0 = model(x_k, s_k, **pos)
            loss = self.generator_loss(g_x0, w, pos, cond)
            sample = g_x0.detach()
        else:
            with torch.no_grad():
                sample = student(x_k, s_k, **pos)
            loss = 0.0
        return (loss + self.fake_loss(sample, z0, pos)).mean()

    def generator_loss(self, g_x0: torch.Tensor, w, pos: dict, cond: dict) -> torch.Tensor:
        """DMD's term plus ``gan_weight`` times ``softplus(-h(G + s eps))``, per sample."""
        s = self.dmd_sigmas(g_x0.shape[0], g_x0.device, g_x0.dtype)
        x = g_x0 + append_dims(s, g_x0.ndim) * torch.randn_like(g_x0)
        if self.cfg.gan_weight > 0:
            x_fake, logits = self._fake_and_logits(x, s, pos, trainable=False)
            gan = F.softplus(-logits)
        else:
            with torch.no_grad():
                x_fake, _ = self._fake_and_logits(x, s, pos, trainable=False)
            gan = torch.zeros_like(s)
        loss = dmd_loss(g_x0, x_fake.detach(), self._real(x.detach(), s, w, cond))
        self._tally("generator_gan", gan.mean())
        return loss + self.cfg.gan_weight * gan

    def fake_loss(self, g_x0: torch.Tensor, z0: torch.Tensor, pos: dict) -> torch.Tensor:
        """The fake score's denoising loss on the generator's samples plus ``fake_gan_weight`` times the head's
        classification of real vs generated latents noised at the same level, per sample."""
        n = z0.shape[0]
        s = self.dmd_sigmas(n, z0.device, z0.dtype)
        se = append_dims(s, z0.ndim)
        x_gen = g_x0 + se * torch.randn_like(z0)
        if self.cfg.fake_gan_weight > 0:
            x_real = z0 + se * torch.randn_like(z0)
            twice = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v
                     for k, v in pos.items()}
            out, logits = self._fake_and_logits(torch.cat([x_gen, x_real]), torch.cat([s, s]), twice, True)
            fake_x0, (fake_logits, real_logits) = out[:n], logits.chunk(2)
            head = gan_losses(real_logits, fake_logits)
        else:
            fake_x0, _ = self._fake_and_logits(x_gen, s, pos, True)
            head = torch.zeros_like(s)
        denoise = fake_denoising_loss(fake_x0, g_x0, s, self.sd)
        self._tally("gen_diversity", g_x0.float().std(0).mean() if n > 1 else torch.zeros(()))
        self._tally("fake_loss", denoise.mean())
        self._tally("head_loss", head.mean())
        return denoise + self.cfg.fake_gan_weight * head


def generator_grid(student, steps: int) -> tuple[list[float], float | None]:
    """The sigmas of the generator's own ``steps``-step sampling (the states backward simulation visits) and the
    pure noise's scale at the first: a flow student's grid (from inf: the unit noise), or an LCM's
    ``LCMScheduler`` timesteps (its noise scaled by ``sqrt(1 + sigma^2)``, the VP sample in sigma space)."""
    if hasattr(student, "lcm_scheduler"):
        sched = student.lcm_scheduler()
        sched.set_timesteps(int(steps))
        sig = student.denoiser.t_to_sigma(sched.timesteps.to(torch.float64)).tolist()
        return sig, math.sqrt(1 + sig[0] ** 2)
    return [float(s) for s in student.grid(int(steps))[:steps]], None


def check_config(cfg: DMD2Config) -> None:
    """One-line errors for values DMD2 cannot train with, before anything is loaded (NaN fails every check)."""
    finite_number(cfg.w_max, "objective.w_max", "the largest guidance scale drawn")
    if not 1 <= cfg.w_min <= cfg.w_max:
        raise ValueError(f"objective.w_min ({cfg.w_min}) must be >= 1 and <= objective.w_max ({cfg.w_max})")
    if not 1 <= cfg.steps <= 4:
        raise ValueError(f"objective.steps must be 1, 2, 3 or 4 (the generator's sampling steps), got {cfg.steps}")
    if not cfg.fake_updates >= 1:
        raise ValueError(f"objective.fake_updates must be >= 1 (fake-score updates per generator update; DMD2's 5), "
                         f"got {cfg.fake_updates}")
    for key in ("gan_weight", "fake_gan_weight"):
        v = getattr(cfg, key)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"objective.{key} must be a finite number >= 0 (DMD2's 5e-3 / 1e-2), got {v}")
    if not (math.isfinite(cfg.fake_lr_scale) and cfg.fake_lr_scale > 0):
        raise ValueError(f"objective.fake_lr_scale must be a finite number > 0 (the fake score's learning rate over "
                         f"the generator's; DMD2's 1), got {cfg.fake_lr_scale}")
    if not (cfg.dmd_shift > 0 and 0 < cfg.sigma_min < cfg.sigma_max and cfg.sigma_data > 0 and cfg.head_width >= 1):
        raise ValueError("objective.dmd_shift > 0, 0 < sigma_min < sigma_max, sigma_data > 0 and head_width >= 1 are "
                         f"needed, got {cfg.dmd_shift}, {cfg.sigma_min}, {cfg.sigma_max}, {cfg.sigma_data}, "
                         f"{cfg.head_width}")
    if isinstance(cfg, DMD2LoRAConfig) and cfg.fake_lora_rank < 0:
        raise ValueError(f"objective.fake_lora_rank must be >= 0 (0: the student's rank), got {cfg.fake_lora_rank}")


def add_fake_adapter(network: nn.Module, cfg: DMD2LoRAConfig, spec: dict) -> None:
    """The fake score's adapter beside the student's on the teacher's network (zero-initialised: it starts as the
    teacher), trained in float32; the student's adapter is left active."""
    from peft import LoraConfig

    rank = cfg.fake_lora_rank or spec["rank"]
    alpha = float(rank) if cfg.fake_lora_rank else spec["alpha"]
    network.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec["targets"]),
                                   init_lora_weights="gaussian"), adapter_name=FAKE)
    network.set_adapter("default")
    for n, p in network.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            p.data = p.data.float()


def _build(cfg: DMD2Config, ctx: BuildContext, lora: bool):
    check_config(cfg)
    teacher = latent_teacher(cfg, ctx)
    encoded = encoded_captions(cfg.kind, ctx, teacher)
    flow = teacher.family.student == "flow_cm"
    # a full kind's fake score starts as the teacher, copied before anything is added to the teacher's network
    fake = None if lora else copy.deepcopy(teacher.denoiser).float().requires_grad_(True)
    spec = lora_spec(cfg, teacher) if lora else None
    if flow:
        model = flow_student(teacher, ctx, cfg.steps, (cfg.w_min + cfg.w_max) / 2, spec, "consistency")
    else:
        model = lcm_student(teacher, ctx, cfg.num_ddim_timesteps, cfg.timestep_scaling, 0, spec)
    if lora:
        add_fake_adapter(teacher.network, cfg, spec)
        fake = teacher.denoiser
    return model, DMD2(teacher, encoded, cfg, model, fake, lora=lora)


@register_objective("dmd2", DMD2Config, job="distill", teacher="required")
def build(cfg: DMD2Config, ctx: BuildContext):
    """DMD2: a few-step generator (a full copy of the teacher's network) and a fake-score copy with a GAN head."""
    return _build(cfg, ctx, lora=False)


@register_objective("dmd2_lora", DMD2LoRAConfig, job="distill", teacher="required")
def build_lora(cfg: DMD2LoRAConfig, ctx: BuildContext):
    """DMD2 with the generator and the fake score as two LoRA adapters on the teacher's own network."""
    return _build(cfg, ctx, lora=True)
