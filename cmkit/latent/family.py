"""Pipeline families: one adapter per diffusers text-to-image pipeline class, registered under the class name a
folder's ``model_index.json`` gives (``_class_name``).

An adapter is the only place that knows its pipeline: reading the folder's components into a denoiser of latents in
sigma space (the network call, the schedule) with a prompt encoder that encodes exactly as the pipeline does
(``load``), its scheduler's own grid (``grid``), its default image size and patching (``default_image_size``,
``latent_shape`` of any height and width it can patch, ``resized`` where the conditioning describes the size), the
longest prompt its encoder takes (``max_sequence_length``), the kind of few-step student it distils into
(``student``), its LoRA layout (``network``: the component a LoRA adapts, ``lora_targets``: its modules,
``write_lora``: the file ``load_lora_weights`` reads, ``lora_state``: other layouts such as kohya's), a
tiny random stand-in of itself (``tiny``: dry runs and tests), and writing a model back as a folder of its pipeline
class (``pipeline``, ``write``). Everything above sees only ``D(z, sigma, **cond)`` and these hooks. Adding a family
is one file in ``families/`` with a ``@register_family`` class, plus its import in ``families/__init__.py``.
"""

from __future__ import annotations

import logging

from ..core import Registry
from .components import read_model_index

FAMILIES: Registry = Registry("text-to-image pipeline class")


def _absent_parts(record: logging.LogRecord) -> bool:
    """Drop diffusers' "text_encoder_3=None of type <class 'NoneType'> cannot be saved" (an absent part)."""
    return "of type <class 'NoneType'> cannot be saved" not in record.getMessage()


class PipelineFamily:
    """The hooks one pipeline class provides (see the module docstring)."""

    name: str = ""                      # the diffusers pipeline class, as model_index.json's _class_name
    network: str = "unet"               # the component that denoises and that a LoRA adapts: "unet" / "transformer"
    encoders: tuple[str, ...] = ()      # text-encoder components, in the pipeline's order
    lora_targets: tuple[str, ...] = ()  # module names (suffixes) of the network a LoRA adapts by default
    student: str = ""                   # the model kind (MODEL_KINDS) of its few-step students: "lcm", "flow_cm"
    layout: str = ""                    # its short name in recipes (an LCM's objective.teacher_layout: sd, sdxl)

    def load(self, path: str, index: dict, dtype, clip_x0, load_kw: dict):
        """A ``TextToImageModel`` of the folder at ``path``."""
        raise NotImplementedError

    def needed_parts(self, path, index: dict, needed: list[str], load_kw: dict, why: str = "") -> dict:
        """The folder's components ``needed``, read through their own ``from_pretrained``, after one line naming
        every one the folder's ``model_index.json`` lacks (``why``: what makes one of them needed)."""
        from .components import load_parts, present

        missing = [c for c in needed if not present(index, c)]
        if missing:
            raise ValueError(f"{path} is a {self.name} folder without {', '.join(missing)}{why}; it needs "
                             f"{', '.join(needed)}")
        return load_parts(path, index, needed, load_kw)

    def pipeline(self, model):
        """The diffusers pipeline object of this class holding ``model``'s components (for ``save_pretrained``;
        ``model.config["guidance_folded"]``: a student that folds guidance in, for a pipeline with a flag for it)."""
        raise NotImplementedError

    def grid(self, model, steps: int, spacing: str | None) -> list[float]:
        """The descending sigma grid of a ``steps``-step solve as the pipeline runs it (``spacing=None``)."""
        raise NotImplementedError

    def default_image_size(self, model) -> int:
        raise NotImplementedError

    def open_pipeline(self, folder):
        """diffusers' own pipeline for ``folder`` (the reference a user would run), with every component the folder
        lists as absent passed as ``None`` (SD3 without T5: ``text_encoder_3=None, tokenizer_3=None``)."""
        import diffusers

        index = read_model_index(folder)
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}
        return diffusers.DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **absent)

    def student_scheduler(self, model, scheduler):
        """The scheduler a few-step student of ``model`` samples over and exports with (its grid; the class follows
        its sampler): the teacher's ``scheduler`` where that serves 1 to 8 steps, else a family's variant of it."""
        return scheduler

    def pipeline_latents(self, model, latents):
        """Latents of ``model.sample_shape`` as the pipeline's ``latents=`` takes them."""
        return latents

    def fresh_noise(self, model, like):
        """Unit noise shaped as ``like`` (latents as the network sees them) from torch's global generator, drawn in
        the layout the pipeline's scheduler draws it (packed tokens where it packs), so a re-noising sampler's noise
        is the exported pipeline's from the same seed."""
        import torch

        return torch.randn_like(like)

    def latent_shape(self, model, height: int, width: int) -> tuple[int, ...]:
        """The latent shape of one ``height`` x ``width`` image (a one-line error where patching cannot take it;
        ``patched_shape`` is the common case)."""
        raise NotImplementedError

    def default_num_frames(self, model) -> int | None:
        """A video family's default frame count (its pipeline's ``num_frames``); None for an image family. A video
        family's ``latent_shape`` reads ``model.num_frames`` and gives ``(C, F', H', W')``."""
        return None

    def resized(self, model) -> None:
        """Called after ``model.height`` / ``model.width`` change: conditioning that describes the image size (SDXL's
        time ids) follows it."""

    def max_sequence_length(self, model) -> int | None:
        """The most prompt tokens ``model``'s encoder can be asked for (as the pipeline's ``max_sequence_length``
        check), or None where the pipeline takes no ``max_sequence_length`` (CLIP-only families: 77 tokens)."""
        return None

    def tiny(self, texts: list[str] | None = None, image_size: int = 32, seed: int = 0):
        """A randomly initialised ``TextToImageModel`` of this class, small enough for a CPU (what ``--dry-run``
        stands in for weights that are not here, and what tests build)."""
        raise NotImplementedError(f"the {self.name} adapter has no tiny stand-in; dry runs need its weights")

    def write(self, model, folder) -> None:
        """Write ``model`` as a folder of this pipeline class (``folder`` exists and is empty). A component the
        pipeline holds as None (SD3 without its T5) is left out as the pipeline's own loader expects, without
        diffusers' warning about it, which would otherwise end every such run."""
        log = logging.getLogger("diffusers.pipelines.pipeline_utils")
        log.addFilter(_absent_parts)
        try:
            self.pipeline(model).save_pretrained(folder, safe_serialization=True)
        finally:
            log.removeFilter(_absent_parts)

    def write_lora(self, model, folder, state: dict, config=None) -> None:
        """Write a LoRA adapter's ``state`` (peft's key layout) on ``model``'s network as the file this pipeline's
        ``load_lora_weights`` reads. ``config``: the adapter's peft ``LoraConfig``, written beside the weights so the
        loader scales by ``lora_alpha / r`` as the adapter was trained (without it diffusers takes alpha = r)."""
        meta = {f"{self.network}_lora_adapter_metadata": config.to_dict()} if config is not None else {}
        type(self.pipeline(model)).save_lora_weights(folder, **{f"{self.network}_lora_layers": state},
                                                     safe_serialization=True, **meta)

    def check_lora(self, model) -> None:
        """A one-line error where a LoRA student of ``model`` cannot be trained (nothing by default)."""

    lora_layouts: tuple[str, ...] = ("diffusers",)  # the LoRA file layouts cmkit writes for this family

    def lora_state(self, model, state: dict, config, layout: str) -> dict:
        """A LoRA adapter's tensors keyed as a layout other than diffusers' (``write_lora``) lays them out, for the
        layouts in ``lora_layouts`` (kohya's, where diffusers converts it for the family)."""
        raise ValueError(f"cmkit writes {self.name} LoRA files in the {' / '.join(self.lora_layouts)} layout, not "
                         f"{layout!r}; use layout={self.lora_layouts[0]!r}")


def patched_shape(channels: int, height: int, width: int, factor: int, patch: int = 1,
                  why: str = "the VAE's factor") -> tuple[int, int, int]:
    """``(channels, height / factor, width / factor)``, after a one-line error for a side that is not a positive
    multiple of ``factor * patch`` (``why`` says where that multiple comes from)."""
    m = factor * patch
    for side, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < m or n % m:
            near = max(m, n - n % m) if isinstance(n, int) and not isinstance(n, bool) else m
            raise ValueError(f"image {side} {n} is not a positive multiple of {m} ({why}); try {near}")
    return (int(channels), height // factor, width // factor)


def register_family(cls):
    """Register a ``PipelineFamily`` subclass under its ``name``."""
    FAMILIES.register(cls.name, cls())
    return cls


def family_of(class_name: str | None, path="") -> PipelineFamily:
    if class_name not in FAMILIES:
        raise ValueError(f"{path}: cmkit has no adapter for the pipeline class {class_name!r} (it has: "
                         f"{', '.join(FAMILIES.names())}); a new family is one file in cmkit/latent/families/")
    return FAMILIES[class_name]
