"""TOML recipes into dataclasses, with ``--set key=value`` overrides and one-line errors for unknown keys.

Layer 6. A recipe file holds any subset of the keys below; everything else takes its default.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .training import TrainSettings


@dataclass
class DataSection:
    name: str = "s_curve"
    path: str = ""                      # a .npy file or a folder of images instead of a named set
    image_size: int = 0                 # image folders: resize to this size (0 = keep)
    channels: int = 0                   # image folders: 1 or 3 (0 = as the first image)
    hflip: bool = False                 # random horizontal flips of training images


@dataclass
class ModelSection:
    backbone: str = "mlp"               # mlp (vector data) | unet (images, a diffusers UNet2DModel)
    hidden: int = 256                   # mlp width
    depth: int = 4                      # mlp residual blocks
    time_embed_dim: int = 64            # mlp time embedding
    base: int = 32                      # unet channels at full resolution
    levels: int = 2                     # unet resolutions (channels base * 2^i)
    layers_per_block: int = 1
    attention: bool = True              # unet self-attention at the lowest resolution
    class_conditional: bool = False     # condition on the dataset's class labels
    dropout: float = 0.0
    # cd from a VP (diffusers DDPM) teacher: "edm" copies its UNet into the EDM consistency parameterisation
    # (exportable to diffusers' ConsistencyModelPipeline); "teacher" wraps the whole teacher denoiser, so the student
    # starts out as the teacher (cmkit.DenoiserConsistencyModel). ect from a VP teacher always wraps.
    student: str = "edm"


@dataclass
class TeacherSection:
    path: str = ""                      # teacher folder or hub id (distillation only)
    clip_x0: float = 0.0                # 0 = no clipping of the teacher's x0 estimate


@dataclass
class ObjectiveSection:
    kind: str = "edm"                   # teachers: edm | ddpm;  distillation: cd;  no teacher: ct | ict;  tuning: ect
    p_mean: float = -1.2                # edm: lognormal sigma
    p_std: float = 1.2
    num_train_timesteps: int = 1000     # ddpm: the DDPMScheduler the teacher is saved with
    beta_schedule: str = "linear"       # ddpm: linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"    # ddpm: epsilon | v_prediction | sample
    n_points: int = 18                  # cd: N of the Karras grid
    solver: str = "heun"                # cd: teacher step, heun | euler
    distance: str = ""                  # l2 | l1 | pseudo_huber | l2-32 | lpips[-vgg|-alex]; "" = the kind's default
                                        # (cd, ct: l2; ict, ect: pseudo_huber)
    huber_c: float = 0.0                # 0 = 0.00054 sqrt(d)
    weighting: str = ""                 # uniform | inverse_gap; "" = the kind's default (ict: inverse_gap)
    target_mu: float = 0.95             # cd: target EMA rate; 0 = stop-gradient online network
    s0: int = 0                         # ct / ict curriculum start (0 = the variant's default: ct 2, ict 10)
    s1: int = 0                         # ct / ict curriculum end (0 = default: ct 150, ict 1280)
    mu0: float = 0.9                    # ct: target EMA at the start
    mu_variant: str = "openai"          # ct: mu(k) divides by N(k) - 1 ("openai", default) or N(k) ("paper")
    ct_p_mean: float = -1.1             # ict / ect: lognormal noise levels
    ct_p_std: float = 2.0
    ect_q: float = 2.0                  # ect: the gap t - r shrinks by q each stage
    ect_stage_steps: int = 1000         # ect: steps per stage (d)
    total_steps: int = 0                # ct / ict: K of the curriculum (0 = train.steps of the first run)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5


@dataclass
class EvalSection:
    num_samples: int = 4000             # samples per method and seed
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_solvers: list[str] = field(default_factory=lambda: ["euler", "heun"])
    teacher_nfe: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 8, 9, 16, 17, 35, 79])
    cm_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    schedule_max_steps: int = 4         # after distillation/training, search few-step sigmas up to this many steps
    schedule_candidates: int = 16       # candidate sigmas tried per step (log-spaced)
    schedule_num_samples: int = 2000    # samples drawn to score each candidate
    dopri5: bool = True                 # include the adaptive dopri5 teacher reference in the benchmark


@dataclass
class Recipe:
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def all_keys(cls=Recipe, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str) -> ValueError:
    hint = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return ValueError(f"unknown recipe key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _coerce(key: str, value, t):
    origin = typing.get_origin(t)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t in (int, float, str, bool):
        if type(value) is not t:
            raise ValueError(f"recipe key {key!r} wants a {t.__name__}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"recipe key {key!r} wants a list, got {value!r}")
        (inner,) = set(typing.get_args(t)) or {object}
        items = [_coerce(key, v, inner) if inner in (int, float, str, bool) else v for v in value]
        return tuple(items) if origin is tuple else items
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + k
        if k not in names:
            raise _unknown(key)
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ValueError(f"recipe key {key!r} is a section; write [{key}] with keys under it")
            kwargs[k] = _build(t, v, key + ".")
        else:
            if isinstance(v, dict):
                raise _unknown(key + "." + next(iter(v), ""))
            kwargs[k] = _coerce(key, v, t)
    return cls(**kwargs)


def parse_value(text: str):
    """A ``--set`` value: TOML syntax when it parses (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set wants key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in all_keys():
            raise _unknown(key)
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parse_value(text.strip())
    return data


def resolve_recipe_path(name_or_path) -> Path:
    """A recipe path, or the bare name of a recipe shipped with cmkit (e.g. ``s_curve-cd``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("cmkit.shipped_recipes")
    for cand in (p.name, p.name + ".toml"):
        f = shipped / cand
        if f.is_file():
            return Path(str(f))
    known = sorted(x.name for x in shipped.iterdir() if x.name.endswith(".toml"))
    raise FileNotFoundError(f"recipe {str(name_or_path)!r} not found (shipped recipes: {', '.join(known)})")


def load_recipe(path=None, overrides: list[str] | None = None) -> Recipe:
    data: dict = {}
    if path is not None:
        p = resolve_recipe_path(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML ({e})") from None
    return _build(Recipe, apply_overrides(data, overrides or []))
