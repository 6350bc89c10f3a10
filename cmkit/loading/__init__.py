"""Layer 4, above ``cmkit.models`` and ``cmkit.latent``: opening models by name (``load_teacher``: any teacher,
pixel or text-to-image; ``load_model``: any model folder cmkit writes)."""

from ..core.assets import asset_path, resolve
from .open import load_model, load_teacher

__all__ = ["asset_path", "load_model", "load_teacher", "resolve"]
