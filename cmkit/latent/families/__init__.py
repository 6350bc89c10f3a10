"""The pipeline families cmkit has adapters for, one file each; importing this package registers them all."""

from ..family import FAMILIES
from . import flux, sd, sd3, sdxl  # noqa: F401  (each registers its pipeline class)


def tiny_of_class(pipeline: str, texts: list[str] | None = None, image_size: int = 32, seed: int = 0):
    """A tiny random model of a registered pipeline class (``"any"``: SD3), as dry runs stand it in for weights
    not here: the family's own ``tiny``."""
    if pipeline not in FAMILIES and pipeline != "any":
        raise ValueError(f"no tiny stand-in for pipeline class {pipeline!r} (known: {', '.join(FAMILIES.names())})")
    return FAMILIES["StableDiffusion3Pipeline" if pipeline == "any" else pipeline].tiny(texts, image_size, seed)
