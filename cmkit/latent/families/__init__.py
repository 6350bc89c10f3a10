"""The pipeline families cmkit has adapters for, one file each; importing this package registers them all."""

from . import flux, sd, sd3, sdxl  # noqa: F401  (each registers its pipeline class)
