"""Pipeline families: one adapter per diffusers text-to-image pipeline class, registered under the class name a
folder's ``model_index.json`` gives (``_class_name``).

An adapter owns everything that differs between pipelines: reading the folder's components into a denoiser of
latents in sigma space (the network call, the schedule), a prompt encoder that encodes exactly as the pipeline does,
its scheduler's own grid (``grid``: step for step what the pipeline runs), writing a model back as a folder of the
same pipeline class (``pipeline``), and its LoRA layout (``lora_targets``, ``network``: the component a LoRA
adapts). Everything above sees only ``D(z, sigma, **cond)``. Adding a family is one file in ``families/`` with a
``@register_family`` class, plus its import in ``families/__init__.py``.
"""

from __future__ import annotations

from ..core import Registry
from .components import read_model_index

FAMILIES: Registry = Registry("text-to-image pipeline class")


class PipelineFamily:
    """The hooks one pipeline class provides (see the module docstring)."""

    name: str = ""                      # the diffusers pipeline class, as model_index.json's _class_name
    network: str = "unet"               # the component that denoises: "unet" or "transformer"
    encoders: tuple[str, ...] = ()      # text-encoder components, in the pipeline's order
    lora_targets: tuple[str, ...] = ()  # module names a LoRA adapts by default

    def load(self, path: str, index: dict, dtype, clip_x0, load_kw: dict):
        """A ``TextToImageModel`` of the folder at ``path``."""
        raise NotImplementedError

    def pipeline(self, model):
        """The diffusers pipeline object of this class holding ``model``'s components (for ``save_pretrained``)."""
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

    def pipeline_latents(self, model, latents):
        """Latents of ``model.sample_shape`` as the pipeline's ``latents=`` takes them."""
        return latents

    def latent_shape(self, model, image_size: int) -> tuple[int, ...]:
        """The latent shape of one image of ``image_size`` pixels (a one-line error where patching cannot take
        it)."""
        raise NotImplementedError


def register_family(cls):
    """Register a ``PipelineFamily`` subclass under its ``name``."""
    FAMILIES.register(cls.name, cls())
    return cls


def family_of(class_name: str | None, path="") -> PipelineFamily:
    if class_name not in FAMILIES:
        raise ValueError(f"{path}: cmkit has no adapter for the pipeline class {class_name!r} (it has: "
                         f"{', '.join(FAMILIES.names())}); a new family is one file in cmkit/latent/families/")
    return FAMILIES[class_name]
