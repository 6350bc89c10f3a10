"""Refusing sizes that cannot fit: a rough estimate of the memory a batch needs, against what is available, checked
before the work starts (the kernel's OOM killer gives no message)."""

from __future__ import annotations

import math

import torch

FLOAT_BYTES = 4


def available_bytes(device=None) -> int | None:
    """Free memory where tensors on ``device`` live: the GPU's free memory, else the host's available memory (psutil,
    else ``/proc/meminfo``'s MemAvailable). None where it cannot be read."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"


@torch.no_grad()
def activation_floats(model, sample_shape, sigma: float = 1.0) -> int:
    """Floats one sample's forward pass produces (the sum of every submodule's outputs: what a training step keeps
    for its backward pass), measured on a batch of one; 0 where the model cannot be called as ``model(x, sigma)``.
    The count depends on the architecture alone, so it is measured once per model and sample shape and kept on the
    model (sampling checks it on every call)."""
    cache = model.__dict__.setdefault("_cmkit_activation_floats", {})
    key = tuple(sample_shape)
    if key not in cache:
        cache[key] = _measure_activation_floats(model, key, sigma)
    return cache[key]


def _measure_activation_floats(model, sample_shape, sigma: float) -> int:
    total = 0

    def count(_m, _inp, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            total += t.numel() if torch.is_tensor(t) else 0

    p = next(iter(model.parameters()), None)
    x = torch.zeros((1, *sample_shape), device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None)
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        model(x, sigma)
    except Exception:  # noqa: BLE001 - conditional or latent models: the estimate then counts the samples alone
        total = 0
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


class NotEnoughMemory(ValueError):
    """A size refused up front (a ``ValueError``: one line, naming what is too big and the key or file to change);
    its own type so loaders that reword their errors let it through unchanged."""


def check_fits(need: int, what: str, fix: str, device=None) -> None:
    """Raise a one-line ``NotEnoughMemory`` when ``need`` bytes exceed the memory available on ``device``."""
    avail = available_bytes(device)
    if avail is not None and need > avail:
        raise NotEnoughMemory(f"{what} needs about {human(need)} of memory, more than the {human(avail)} available; "
                              f"{fix}")


def sampling_bytes(model, num: int, draws: int) -> int:
    """A lower bound on the memory of ``num`` samples drawn in one batch with ``draws`` noise draws each: the noise,
    the samples and one forward pass's largest activations (a quarter of them, as a pass without gradients frees
    them as it goes)."""
    shape = tuple(model.sample_shape)
    per = math.prod(shape) * (draws + 2) + activation_floats(model, shape) / 4
    return int(num * per * FLOAT_BYTES)


def training_bytes(model, batch_size: int, passes: int = 3) -> int:
    """A lower bound on a training step's memory: the weights with their gradients and two Adam moments, and
    ``passes`` forward passes' activations per sample (online, target and teacher passes keep theirs until the
    backward pass in the worst case) beside a few copies of the batch."""
    shape = tuple(model.sample_shape)
    weights = sum(p.numel() for p in model.parameters()) * 4
    per = passes * activation_floats(model, shape) + 8 * math.prod(shape)
    return int((weights + batch_size * per) * FLOAT_BYTES)


# bytes a trained float32 parameter holds: the weight, its gradient and Adam's two moments
TRAINED_BYTES = 16


def meta_params(build) -> int:
    """The parameters of the module ``build()`` makes, built on torch's meta device: shapes only, nothing allocated,
    so a network of absurd size is counted in milliseconds."""
    with torch.device("meta"):
        net = build()
    return sum(p.numel() for p in net.parameters())


def lora_params(net, targets, rank: int) -> int:
    """The parameters a rank-``rank`` LoRA (peft) adds on the modules of ``net`` whose names end in one of
    ``targets``."""
    n = 0
    for name, m in net.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            n += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return n


def check_network_fits(params: int, per_param: int, what: str, fix: str, device=None) -> None:
    """Refuse a network of ``params`` parameters holding ``per_param`` bytes each (``TRAINED_BYTES`` for one that
    trains) before it is built; ``what`` names it and the keys or file its size comes from."""
    check_fits(params * per_param, f"{what} ({params / 1e6:,.1f} M parameters)", fix, device)


def check_parts_fit(parts: list[tuple[str, int]], what: str, fix: str, device=None) -> None:
    """Refuse a run whose networks, ``parts`` as ``(label, bytes)`` (the trained network, each EMA copy, the
    target, a fake score...), need more memory together than ``device`` has, before any is built; the one-line
    message gives the breakdown ("student 1.2 GiB + 2 EMA copies 600 MiB + ...")."""
    parts = [(label, int(n)) for label, n in parts if n > 0]
    breakdown = " + ".join(f"{label} {human(n)}" for label, n in parts)
    check_fits(sum(n for _, n in parts), f"{what} ({breakdown})" if len(parts) > 1 else what, fix, device)
