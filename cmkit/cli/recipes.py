"""TOML recipes into dataclasses, with ``--set key=value`` overrides and one-line errors for unknown keys.

A recipe file holds any subset of the keys below; everything else takes its default. The ``[objective]`` section is
the config dataclass of its ``kind`` (``cmkit.objectives.OBJECTIVES``): a key that kind does not have is an error
naming the keys it has.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.checks import finite_number, in_range
from ..data.formats import target_size
from ..eval import EvalSettings
from ..objectives import OBJECTIVES, ObjectiveConfig
from ..training import TrainSettings


@dataclass
class DataSection:
    name: str = "s_curve"
    path: str = ""                      # a .npy file or a folder of images instead of a named set
    follow_links: bool = False          # read sample files (images, captions, shards) linked from outside data.path
    image_size: int = 0                 # image folders: resize to this size (0 = keep)
    # captioned images (caption folders, webdataset shards, hf_dataset): a non-square training size, both or neither
    # (0 = data.image_size's square); each image resized to cover height x width keeping its aspect, then cropped
    height: int = 0
    width: int = 0
    channels: int = 0                   # image folders: 1 or 3 (0 = as the first image)
    hflip: bool = False                 # random horizontal flips of training images
    # captioned sets streamed from shards (text-to-image kinds): data.path a folder of webdataset .tar files or a
    # pattern such as "shards/{00000..00099}.tar", or data.hf_dataset ("imagefolder" reads data.path through
    # datasets' image-folder builder; else a hub name or a local dataset folder)
    hf_dataset: str = ""
    split: str = "train"                # hf_dataset's split
    image_column: str = "image"         # hf_dataset's columns
    caption_column: str = "text"
    streaming: bool = False             # hf_dataset read as it streams (large sets), in its own file shards
    shard_size: int = 10000             # hf_dataset held on disk: rows a latent-cache shard takes
    crop: str = "center"                # streamed images: resized to cover the size, then a "center" / "random" crop
    workers: int = 0                    # dataloader workers reading (decoding, cropping) streamed shards
    encode_batch_size: int = 256        # latent kinds: images per VAE / text-encoder batch when building the cache
    # captioned video (a folder of .mp4 / .webm clips, or webdataset shards of them): frames a clip is sampled to
    # (0 = images), taken at data.fps (0 = each clip's own rate) from the start (data.crop = "random": a random start)
    num_frames: int = 0
    fps: float = 0.0

    def check(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        for key in ("shard_size", "encode_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.num_frames < 0:
            raise ValueError(f"data.num_frames must be >= 1 for video clips (0 = images), got {self.num_frames}")
        if self.fps < 0:
            raise ValueError(f"data.fps must be >= 0 (0 = each clip's own rate), got {self.fps:g}")
        if self.fps and not self.num_frames:
            raise ValueError(f"data.fps = {self.fps:g} samples video clips; set data.num_frames too (the frames a "
                             "clip is sampled to), or remove data.fps for images")
        target_size(self)  # height and width both or neither, positive, agreeing with image_size


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
    times: int = 1                      # time inputs: 2 for MeanFlow's u(z, r, t) (a second timestep embedding)
    # cd from a VP (diffusers DDPM) teacher: "edm" copies its UNet into the EDM consistency parameterisation
    # (exportable to diffusers' ConsistencyModelPipeline); "teacher" wraps the whole teacher denoiser, so the student
    # starts out as the teacher (cmkit.DenoiserConsistencyModel). ect from a VP teacher always wraps.
    student: str = "edm"


@dataclass
class TeacherSection:
    path: str = ""                      # teacher folder, hub id or cmkit:NAME (distillation, tuning)
    clip_x0: float | None = None        # clip the teacher's x0 estimate to [-c, c] (default: no clipping)
    # LoRA kinds of latent teachers: the frozen teacher (the adapter's base) with weight-only int8 / int4 linear
    # layers (torchao); its one-step denoising error against the unquantised teacher is printed at start
    quantize: str = ""


@dataclass
class Recipe:
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    objective: ObjectiveConfig = field(default_factory=lambda: OBJECTIVES["edm"].config())
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        keys += _keys(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [prefix + f.name]
    return keys


def all_keys(kind: str | None = None) -> list[str]:
    """Every recipe key; the objective's are those of ``kind`` (default: every kind's)."""
    keys = [k for k in _keys(Recipe) if not k.startswith("objective.")]
    kinds = [kind] if kind else OBJECTIVES.names()
    return keys + sorted({f"objective.{k}" for kd in kinds for k in _keys(OBJECTIVES[kd].config)})


def _unknown(key: str, kind: str | None = None) -> ValueError:
    if key.startswith("objective.") and kind:
        own = [k.split(".", 1)[1] for k in all_keys(kind) if k.startswith("objective.")]
        return ValueError(f"objective.kind {kind!r} has no key {key.split('.', 1)[1]!r}; its keys: {', '.join(own)}")
    hint = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return ValueError(f"unknown recipe key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _coerce(key: str, value, t):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so a value is always an X
        (t,) = [a for a in typing.get_args(t) if a is not type(None)]
        origin = typing.get_origin(t)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t in (int, float, str, bool):
        if type(value) is not t:
            raise ValueError(f"recipe key {key!r} wants a {t.__name__}, got {value!r}")
        return _checked_float(key, value) if t is float else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"recipe key {key!r} wants a list, got {value!r}")
        (inner,) = set(typing.get_args(t)) or {object}
        items = [_coerce(key, v, inner) if inner in (int, float, str, bool) else v for v in value]
        return tuple(items) if origin is tuple else items
    return value


# sigma_data, the data's standard deviation in every kind's units (latents ~1, pixels 0.5): the scalings divide by
# it, so a value far outside this range (1e-30) turns every c_in / c_out into inf or 0
SIGMA_DATA_RANGE = (1e-3, 1e3)


def _checked_float(key: str, value: float) -> float:
    """Every float of every section is finite: NaN and infinities are refused here for every key, before any kind
    sees them (a kind's range check such as "> 0" lets inf through, and one that no kind checks let NaN reach the
    first step). ``sigma_data`` must lie in a sensible range for any kind."""
    if key.rsplit(".", 1)[-1] == "sigma_data":
        return in_range(value, key, *SIGMA_DATA_RANGE, fix="it is the data's standard deviation (pixels 0.5, "
                        "normalised latents 1)")
    return finite_number(value, key, fix="give a finite value")


def _build(cls, data: dict, prefix: str = "", kind: str | None = None):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + k
        if k not in names:
            raise _unknown(key, kind)
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ValueError(f"recipe key {key!r} is a section; write [{key}] with keys under it")
            kwargs[k] = _build_objective(v) if k == "objective" and cls is Recipe else _build(t, v, key + ".")
        else:
            if isinstance(v, dict):
                raise _unknown(key + "." + next(iter(v), ""), kind)
            kwargs[k] = _coerce(key, v, t)
    return cls(**kwargs)


def _build_objective(data: dict) -> ObjectiveConfig:
    kind = data.get("kind", "edm")
    if not isinstance(kind, str) or kind not in OBJECTIVES:
        raise ValueError(f"unknown objective.kind {kind!r}; choose one of {', '.join(OBJECTIVES.names())}")
    return _build(OBJECTIVES[kind].config, data, "objective.", kind)


def parse_value(text: str):
    """A ``--set`` value: TOML syntax when it parses (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key=value`` in the raw recipe; keys are checked when the recipe is built (the objective's keys
    depend on its kind, which an override may change)."""
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
            if not isinstance(node, dict):
                raise ValueError(f"recipe key {p!r} is not a section")
        node[last] = parse_value(text.strip())
    return data


def resolve_recipe_path(name_or_path) -> Path:
    """A recipe path, or the bare name of a recipe shipped with cmkit (e.g. ``s_curve-ict``)."""
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
        except UnicodeDecodeError:
            raise ValueError(f"{p}: not a text file; a recipe is TOML") from None
    return _build(Recipe, apply_overrides(data, overrides or []))
