"""Layer 1: noise levels in EDM units (``x_sigma = x_0 + sigma * z``): sigma grids, every set of scalings, noise-level
samplers (``proposals``), and the small utilities every layer shares (registries, atomic file writes, value checks).
Depends on torch only. The names below load their module on first use (PEP 562), so a torch-free submodule
(``core.checks``' scalar checks, which the command line's argument parsing uses) imports without torch."""

from __future__ import annotations

from .lazy import lazy_exports

_HOME = {
    "RHO": "grids", "SIGMA_MAX": "grids", "SIGMA_MIN": "grids", "check_sigmas": "grids", "karras_ascending": "grids",
    "karras_index": "grids", "karras_sigmas": "grids", "karras_steps": "grids", "log_spaced": "grids",
    "Registry": "registry", "C_NOISE_SCALE": "scalings", "SIGMA_DATA": "scalings", "append_dims": "scalings",
    "as_batch_sigma": "scalings", "boundary_scalings": "scalings", "c_noise": "scalings", "edm_loss_weight": "scalings",
    "edm_scalings": "scalings", "EDMSchedule": "schedules", "FlowMatchSchedule": "schedules",
    "NoiseSchedule": "schedules", "TrigFlowSchedule": "schedules", "VPSchedule": "schedules", "flux_mu": "schedules",
    "mu_shift_times": "schedules", "schedule_of": "schedules", "shift_times": "schedules",
    "check_trig_times": "trigflow", "flow_to_sigma": "trigflow", "sigma_to_flow": "trigflow",
    "sigma_to_trig": "trigflow", "trig_scalings": "trigflow", "trig_to_sigma": "trigflow",
    "trig_velocity_from_x0": "trigflow",
}

__all__ = [
    "RHO", "SIGMA_MAX", "SIGMA_MIN", "SIGMA_DATA", "C_NOISE_SCALE", "Registry", "append_dims", "as_batch_sigma",
    "boundary_scalings", "c_noise", "check_sigmas", "edm_loss_weight", "edm_scalings", "karras_ascending",
    "karras_index", "karras_sigmas", "karras_steps", "log_spaced", "check_trig_times", "flow_to_sigma",
    "sigma_to_flow", "sigma_to_trig", "trig_scalings", "trig_to_sigma", "trig_velocity_from_x0", "EDMSchedule",
    "FlowMatchSchedule", "NoiseSchedule", "TrigFlowSchedule", "VPSchedule", "flux_mu", "mu_shift_times", "schedule_of",
    "shift_times",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _HOME)
