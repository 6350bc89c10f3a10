"""Layer 1: noise levels in EDM units (``x_sigma = x_0 + sigma * z``): sigma grids, every set of scalings, noise-level
samplers (``proposals``), and the two small utilities every layer shares (registries, atomic file writes). Depends on
torch only."""

from .grids import (
                    RHO,
                    SIGMA_MAX,
                    SIGMA_MIN,
                    check_sigmas,
                    karras_ascending,
                    karras_index,
                    karras_sigmas,
                    karras_steps,
                    log_spaced,
)
from .registry import Registry
from .scalings import (
                    C_NOISE_SCALE,
                    SIGMA_DATA,
                    append_dims,
                    as_batch_sigma,
                    boundary_scalings,
                    c_noise,
                    edm_loss_weight,
                    edm_scalings,
)
from .schedules import (
                    EDMSchedule,
                    FlowMatchSchedule,
                    NoiseSchedule,
                    TrigFlowSchedule,
                    VPSchedule,
                    flux_mu,
                    mu_shift_times,
                    schedule_of,
                    shift_times,
)
from .trigflow import (
                    check_trig_times,
                    flow_to_sigma,
                    sigma_to_flow,
                    sigma_to_trig,
                    trig_scalings,
                    trig_to_sigma,
                    trig_velocity_from_x0,
)

__all__ = [
    "RHO", "SIGMA_MAX", "SIGMA_MIN", "SIGMA_DATA", "C_NOISE_SCALE", "Registry", "append_dims", "as_batch_sigma",
    "boundary_scalings", "c_noise", "check_sigmas", "edm_loss_weight", "edm_scalings", "karras_ascending",
    "karras_index", "karras_sigmas", "karras_steps", "log_spaced", "check_trig_times", "flow_to_sigma",
    "sigma_to_flow", "sigma_to_trig", "trig_scalings", "trig_to_sigma", "trig_velocity_from_x0", "EDMSchedule",
    "FlowMatchSchedule", "NoiseSchedule", "TrigFlowSchedule", "VPSchedule", "flux_mu", "mu_shift_times", "schedule_of",
    "shift_times",
]
