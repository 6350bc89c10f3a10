"""What the flow-matching transformer families (SD3, Flux) share: a transformer that predicts the flow velocity
``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``, as a guided denoiser in sigma space (``x0 = x_t - t v``), and the
grid of the folder's ``FlowMatchEulerDiscreteScheduler`` exactly as the pipeline sets it (static shift, or the
resolution-dependent ``mu`` shift), starting at t = 1 (sigma = inf)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core import FlowMatchSchedule, append_dims, flux_mu
from ..denoiser import GuidedDenoiser, time_dtype
from ..family import PipelineFamily
from ..flow_map_networks import REmbeddedNetwork

FLOW_SPACINGS = (None, "trailing")  # the pipeline's own grid already starts at the last training time


class FlowDenoiser(GuidedDenoiser, nn.Module):
    """A flow-matching transformer as a guided denoiser of latents. A family subclass says how the network is
    called (``_velocity``); the timestep the network sees is ``t * timestep_scale``."""

    timestep_scale = 1000.0

    def __init__(self, transformer: nn.Module, scheduler, clip_x0: float | None = None):
        super().__init__()
        self.transformer, self.scheduler, self.clip_x0 = transformer, scheduler, clip_x0
        self.schedule = FlowMatchSchedule()
        self.prediction_type = "flow"
        self.sigma_data = 1.0  # flow matching's data are normalised to unit variance by the VAE's scale
        t_min = torch.tensor(float(getattr(scheduler, "sigma_min", 1e-3)), dtype=torch.float64)
        self.sigma_min, self.sigma_max = float(self.schedule.sigma(t_min)), math.inf

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def _denoise(self, z, sigma, w, cond: dict) -> torch.Tensor:
        s = append_dims(sigma, z.ndim)
        x_n = self.schedule.to_native(z, s)
        # the time in float64 from sigma, then float32 as the pipelines pass it (float64 in a float64 run: a tangent
        # through the time input would lose its digits in the cast)
        t = (self.schedule.time(sigma.double()) * self.timestep_scale).to(time_dtype(z))
        dt = self.transformer.dtype
        cond = {k: v.to(z.device, dt) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        v = self._velocity(x_n.to(dt), t, w, cond).to(z.dtype)
        return self.schedule.to_x0("flow", x_n, s, v)

    def _velocity(self, x_t, timestep, w, cond: dict) -> torch.Tensor:
        raise NotImplementedError


class FlowFamily(PipelineFamily):
    """Pipelines over a ``FlowMatchEulerDiscreteScheduler``: the grid as the pipeline sets it."""

    network = "transformer"
    # the joint blocks' image and text attention and feed-forwards (Flux's single blocks share the attention names)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    student = "flow_cm"
    flow_map_time_module = "time_text_embed"  # where a flow-map student's r-embedding joins the time embedding
    mu_defaults = (256, 4096, 0.5, 1.15)  # base / max image tokens, base / max shift, as the pipeline reads them

    def flow_map_network(self, teacher, gate_value: float = 0.25, lora: dict | None = None) -> nn.Module:
        """A flow-map student's network ``u(z, r, t)``, starting as the teacher's velocity at r = t
        (``latent.flow_map``): the teacher's transformer (a float32 copy; ``lora``: rank, alpha, targets, an adapter
        on the teacher's own) with an r-embedding on its time embedding."""
        import copy

        from ..flow_student import add_transformer_lora

        if lora is None:
            return REmbeddedNetwork(copy.deepcopy(teacher.denoiser).float().requires_grad_(True),
                                    self.flow_map_time_module)
        add_transformer_lora(teacher.network, lora["rank"], lora["alpha"], lora["targets"])
        return REmbeddedNetwork(teacher.denoiser, self.flow_map_time_module)

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing not in FLOW_SPACINGS:
            raise ValueError(f"spacing {spacing!r} is a DDPM-table spacing; a {self.name} runs its scheduler's own "
                             "grid (spacing=None)")
        sched = type(model.scheduler).from_config(model.scheduler.config)
        kw = self.set_timesteps_kwargs(model, int(steps))
        mu = self.grid_mu(model, sched, int(steps))
        sched.set_timesteps(**kw, **({} if mu is None else {"mu": mu}))
        t = sched.sigmas.to(torch.float64)
        return model.schedule.sigma(t).tolist()

    def grid_mu(self, model, scheduler, steps: int) -> float | None:
        """The ``mu`` the pipeline passes ``set_timesteps`` for a ``steps``-step solve: the resolution-dependent
        shift where the scheduler shifts dynamically, else none."""
        return self.mu(model) if scheduler.config.get("use_dynamic_shifting") else None

    def set_timesteps_kwargs(self, model, steps: int) -> dict:
        return {"num_inference_steps": steps}

    def checked_scheduler(self, path, scheduler):
        """``scheduler``, after one-line errors naming the ``scheduler_config.json`` key whose value would give a
        NaN, empty or reversed grid: a static ``shift`` that is not a finite number > 0, a ``base_shift`` /
        ``max_shift`` that is not finite, and image-sequence lengths that are not integers with base < max."""
        from pathlib import Path

        from ...core.checks import finite_number, in_range, positive_int

        c, where = scheduler.config, Path(path) / "scheduler" / "scheduler_config.json"
        if not type(scheduler).__name__.startswith("FlowMatch"):  # the grid and the time maps are flow matching's
            raise ValueError(f"{where}: a {self.name} samples with a flow-matching scheduler (FlowMatch"
                             f"EulerDiscreteScheduler), not a {type(scheduler).__name__}; restore the folder's "
                             "scheduler")
        fix = "give the value the pipeline was trained with"
        base, top, lo, hi = self.mu_defaults
        in_range(c.get("shift", 1.0), f"{where}: shift", 0, low_open=True, fix=fix)
        for key, default in (("base_shift", lo), ("max_shift", hi)):
            finite_number(c.get(key, default), f"{where}: {key}", fix)
        seq = [positive_int(c.get(k, d), f"{where}: {k}", fix)
               for k, d in (("base_image_seq_len", base), ("max_image_seq_len", top))]
        if c.get("use_dynamic_shifting") and seq[0] >= seq[1]:
            raise ValueError(f"{where}: base_image_seq_len ({seq[0]}) must be below max_image_seq_len ({seq[1]}) for "
                             f"the resolution-dependent shift; {fix}")
        return scheduler

    def mu(self, model) -> float:
        c = model.scheduler.config
        base, top, lo, hi = self.mu_defaults
        return flux_mu(self.image_tokens(model), c.get("base_image_seq_len", base), c.get("max_image_seq_len", top),
                       c.get("base_shift", lo), c.get("max_shift", hi))

    def image_tokens(self, model) -> int:
        raise NotImplementedError
