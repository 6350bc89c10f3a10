"""What every distilled student of a latent teacher shares (LCM, flow students): the teacher's parts (VAE, prompt
encoder) held beside the trainable function and never copied or checkpointed, and a LoRA student's checkpoints
holding its adapter alone; and the teacher pass of a LoRA student, its own network with the adapter switched off."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from ..core.checks import finite_tensors, in_range, positive_int
from ..core.digests import weights_digest
from ..core.files import note
from .denoiser import delegate


class SharedPartsStudent:
    """A mixin for an ``nn.Module`` student with ``self.parts`` (set through ``__dict__``, so it is no submodule)
    and ``self.lora``."""

    lora = False

    # --- the rest of the teacher's pipeline, as the student samples in it
    family = delegate("parts.family")
    vae = delegate("parts.vae")
    height = delegate("parts.height")
    width = delegate("parts.width")
    num_frames = delegate("parts.num_frames")
    image_size = delegate("parts.image_size")
    sampling_at = delegate("parts.sampling_at")
    sample_shape = delegate("parts.sample_shape")
    image_shape = delegate("parts.image_shape")
    vae_scale_factor = delegate("parts.vae_scale_factor")

    def __deepcopy__(self, memo):
        """Copies (EMAs, the target network, the exported copy) share the teacher's parts instead of copying them.
        A LoRA student lives in the teacher's own network, so its copies share that too: it keeps no EMA or target
        network (its builds refuse them)."""
        memo[id(self.parts)] = self.parts
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if "lora_" in k} if self.lora else full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.lora:
            return super().load_state_dict(state_dict, strict, assign)
        if set(state_dict) != set(self.state_dict()):
            raise ValueError("the LoRA weights do not fit this adapter (other rank, targets or base network)")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


@contextlib.contextmanager
def adapters_off(network):
    """The network with its peft adapters disabled for the block (a LoRA student's teacher pass)."""
    network.disable_adapters()
    try:
        yield network
    finally:
        network.enable_adapters()


def read_lora_file(path: Path, prefix: str) -> dict:
    """The ``prefix`` network's tensors of a LoRA file (``unet.`` / ``transformer.`` keys, the prefix dropped), with
    one-line errors for a missing, unreadable or truncated file, tensors for other parts and non-finite values."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a LoRA student's folder holds its adapter there; export it again")
    try:
        state = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for a damaged file, OSError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {first}); it is truncated "
                         "or not a LoRA file: export the LoRA student again") from None
    others = sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix + ".")})
    if others:
        n = sum(not k.startswith(prefix + ".") for k in state)
        raise ValueError(f"{path} holds {n} tensors for {', '.join(others)} (e.g. a text-encoder LoRA), which cmkit "
                         f"does not apply, so sampling would silently differ; use a LoRA of the {prefix} alone "
                         "(as cmkit writes)")
    finite_tensors(state, f"{path}: the adapter's tensors", "the adapter is damaged: export it again, or train "
                   "again with a lower train.lr")
    return {k[len(prefix) + 1:]: v for k, v in state.items()}


def check_lora_config(path, cfg: dict) -> None:
    """A LoRA student's recorded ``lora_config`` (its ``cmkit.json``): a rank that is an integer >= 1 and an alpha
    that is a finite number > 0 (a NaN alpha scales every update to NaN)."""
    positive_int(cfg["r"], f"{path}: lora_config's r", fix="export the LoRA student again")
    in_range(cfg["lora_alpha"], f"{path}: lora_config's lora_alpha", 0, low_open=True,
             fix="export the LoRA student again")


def check_lora_fits(path: Path, state: dict, own: dict, what: str) -> None:
    """Refuse a LoRA state that does not fit the adapter (``own``: its tensors' shapes) or holds only part of it
    (only the A or the B matrices, some layers)."""
    misfit = [k for k, v in state.items() if k not in own or own[k] != v.shape]
    if misfit or not state:
        raise ValueError(f"{path} does not fit this base {what} ({len(misfit)} of its {len(state)} tensors have no "
                         "place here); it was trained on another base")
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{path} holds {len(state)} of the adapter's {len(own)} tensors (missing {missing[0]} and "
                         f"{len(missing) - 1} more): the file is partial; export the LoRA student again")


def check_base_hash(folder, meta: dict, base, given: bool, what: str) -> None:
    """Refuse (or, for a base the caller chose, note) a base whose weights are not those the adapter was trained
    on (same shapes, other values: the teacher folder was retrained or replaced since)."""
    recorded = meta.get("base_hash")
    if not recorded:
        return
    now = weights_digest(base)
    if now == recorded:
        return
    if given:
        note(f"{folder}: applying the {what} to a base other than the one it was trained on (weights hash {now}, "
             f"trained on {recorded})")
        return
    raise ValueError(f"{folder}: its base teacher {meta.get('base')} has changed since the {what} was trained on "
                     f"it (weights hash {now}, recorded {recorded}); restore that teacher, or pass base= to apply the "
                     "adapter to another one deliberately")


def check_kind(folder, meta: dict, kind: str) -> None:
    """A student class opens only folders of its own kind (a flow student's class re-saved an LCM folder as a flow
    student before): a one-line error naming what the folder holds."""
    if meta.get("kind") not in (None, kind):
        raise ValueError(f"{folder} holds a {meta['kind']!r} model, not a {kind!r} one; open it with cmkit.load_model")


LORA_FILE = "pytorch_lora_weights.safetensors"  # what a pipeline's load_lora_weights reads


def size_meta(parts) -> dict:
    """What a student's ``cmkit.json`` records of the size it was distilled at, its default sampling size (a video
    student's frame count too), and the prompt length its prompts were encoded at where its family has one (a
    teacher trained at 32 tokens whose student sampled at its pipeline's 512 would attend to 480 zero tokens it never
    saw)."""
    frames = getattr(parts, "num_frames", None)
    tokens = getattr(parts, "max_sequence_length", None)
    return {"height": int(parts.height), "width": int(parts.width), **({"num_frames": int(frames)} if frames else {}),
            **({"max_sequence_length": int(tokens)} if tokens else {})}


def restore_size(folder, meta: dict, parts) -> None:
    """Sample at the size the student was distilled at (its ``cmkit.json``; a folder without it keeps the
    pipeline's default), refused in one line where the value cannot be a size."""
    if "height" in meta and "width" in meta:
        where = Path(folder) / "cmkit.json"
        frames = meta.get("num_frames")
        h, w, *f = (positive_int(meta[k], f"{where}: {k}", "export the student again")
                    for k in ("height", "width", *(("num_frames",) if frames is not None else ())))
        parts.resize(h, w, *f)
    if meta.get("max_sequence_length") is not None and getattr(parts, "max_sequence_length", None) is not None:
        where = Path(folder) / "cmkit.json"
        # the encoder's own setting as it was at export (the public setter also caps it at what the encoder reads,
        # which the pipeline's default can exceed: Z-Image asks 512 of an encoder that reads fewer)
        parts.prompt_encoder.max_sequence_length = positive_int(
            meta["max_sequence_length"], f"{where}: max_sequence_length", "export the student again")


def write_lora_student(parts, network, folder: Path, meta: dict) -> None:
    """A LoRA student's adapter on ``network`` (``parts``' family's network) written into ``folder`` as the file the
    family's pipeline's ``load_lora_weights`` reads, its shape and scale recorded in ``meta["lora_config"]``."""
    from peft.utils import get_peft_model_state_dict

    adapter = network.peft_config["default"]
    meta["lora_config"] = {"r": adapter.r, "lora_alpha": adapter.lora_alpha,
                           "target_modules": sorted(adapter.target_modules)}
    parts.family.write_lora(parts, folder, get_peft_model_state_dict(network), adapter)


def export_lora(student, path, layout: str = "diffusers") -> Path:
    """One ``.safetensors`` file of a LoRA student's adapter, for the tools people sample in: ``layout="diffusers"``
    (what ``load_lora_weights`` reads, the adapter's alpha included, as the student folder holds it) or ``"kohya"``
    (the ``lora_unet_...`` / ``lora_down`` / ``lora_up`` / ``alpha`` keys ComfyUI, AUTOMATIC1111 and diffusers' own
    loader read; for the families whose layout diffusers converts, ``family.lora_layouts``). Written atomically."""
    import os
    import tempfile

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..core.files import atomic_write

    path = Path(path)
    if not getattr(student, "lora", False):
        raise ValueError(f"a {type(student).__name__} without an adapter has no LoRA file; export_lora takes a "
                         "LoRA student (lcm_lora, flow_cd_lora, latent_scd_lora, ...)")
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is written as .safetensors, got {path.name!r}")
    parts, network = student.parts, student.network
    state, config = get_peft_model_state_dict(network), network.peft_config["default"]
    if layout == "diffusers":
        def write(tmp: Path) -> None:  # the pipeline's own writer (it records the alpha), then moved into place
            with tempfile.TemporaryDirectory(dir=tmp.parent) as d:
                parts.family.write_lora(parts, d, state, config)
                os.replace(Path(d) / LORA_FILE, tmp)
    else:
        keyed = parts.family.lora_state(parts, state, config, layout)

        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in keyed.items()}, str(tmp), metadata={"format": "pt"})
    return atomic_write(path, write)


def load_adapter(network, folder, part: str, what: str) -> None:
    """Read a LoRA student's ``LORA_FILE`` into ``network``'s adapter: refused in one line where the file cannot be
    read, holds other parts' tensors (``part``: the prefix its keys carry, "unet" / "transformer"), non-finite
    values, tensors that do not fit ``what`` (the network, as messages name it), or only part of the adapter."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(folder) / LORA_FILE
    state = read_lora_file(path, part)
    check_lora_fits(path, state, {k: v.shape for k, v in get_peft_model_state_dict(network).items()}, what)
    set_peft_model_state_dict(network, state)
