"""Layer 4: training objectives, one module per family, each with its own config dataclass, registered by
``objective.kind`` (``OBJECTIVES``); distances and weightings (registries too). Importing this package registers
every kind; a new kind is a new module here plus its line below."""

from . import (  # noqa: F401  (each registers its kinds)
    cd,
    ct,
    ddpm,
    dmd2,
    ect,
    edm,
    flow_cd,
    flow_map,
    flow_matching,
    latent_ddpm,
    latent_scm,
    lcm,
    meanflow,
    scm,
    vae,
    wan_vae,
)
from .base import OBJECTIVES, BuildContext, LevelsConfig, ObjectiveConfig, kinds_for, paired_passes, register_objective
from .cd import ConsistencyDistillation
from .ct import ConsistencyTraining, ImprovedConsistencyTraining
from .ddpm import DDPMLoss
from .distances import DISTANCES, WEIGHTINGS, LPIPSDistance, distance, make_distance
from .ect import EasyConsistencyTuning
from .edm import EDMLoss

__all__ = [
    "DISTANCES", "OBJECTIVES", "WEIGHTINGS", "BuildContext", "ConsistencyDistillation", "ConsistencyTraining",
    "DDPMLoss", "EDMLoss", "EasyConsistencyTuning", "ImprovedConsistencyTraining", "LPIPSDistance", "LevelsConfig",
    "ObjectiveConfig", "distance", "kinds_for", "make_distance", "paired_passes", "register_objective",
]
