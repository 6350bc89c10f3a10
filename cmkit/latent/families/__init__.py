"""The pipeline families cmkit has adapters for, one file each; importing this package registers them all."""

from ..family import FAMILIES
from . import (  # noqa: F401  (each registers its pipeline class)
    flux,
    flux2,
    qwen_image,
    sana,
    sd,
    sd3,
    sdxl,
    wan,
    z_image,
)

ANY = {"": "StableDiffusion3Pipeline", "lcm": "StableDiffusionPipeline"}  # "any" stands in as, by student kind


def tiny_of_class(pipeline: str, texts: list[str] | None = None, image_size: int = 32, seed: int = 0,
                  student: str = ""):
    """A tiny random model of a registered pipeline class, or of a family's ``layout`` ("sd", "sdxl"); ``"any"``:
    SD3, or SD where the run's ``student`` kind is an LCM. As dry runs stand it in for weights not here: the
    family's own ``tiny``."""
    layouts = {FAMILIES[n].layout: n for n in FAMILIES if FAMILIES[n].layout}
    name = ANY[student if student in ANY else ""] if pipeline == "any" else layouts.get(pipeline, pipeline)
    if name not in FAMILIES:
        raise ValueError(f"no tiny stand-in for pipeline class {pipeline!r} (known: {', '.join(FAMILIES.names())})")
    return FAMILIES[name].tiny(texts, image_size, seed)
