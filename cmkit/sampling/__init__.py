"""Layer 5: samplers (consistency-model one-step and multistep, teacher ODE baselines), zero-shot editing and the
few-step schedule search, text-to-image sampling of latent teachers."""

from .editing import colorize, denoise, edit, inpaint, interpolate, sdedit, superres
from .kinds import text_to_image, text_to_video
from .samplers import class_condition, eval_mode, multistep, per_sample_noise, resolve_sigmas, sample, sample_teacher
from .schedules import search_schedule
from .text2image import lcm_sample, timestep_sigmas

__all__ = ["class_condition", "colorize", "denoise", "edit", "eval_mode", "inpaint", "interpolate", "multistep",
           "per_sample_noise", "resolve_sigmas", "sample", "sample_teacher", "sdedit", "search_schedule", "superres",
           "text_to_image", "text_to_video", "timestep_sigmas", "lcm_sample"]
