"""One checker per kind of value check, each raising a one-line ``ValueError`` that names the value and the fix:
``finite_number`` / ``in_range`` for a scalar (a sampling argument, a scheduler or recipe value, a ``cmkit.json``
entry), ``positive_int`` for a count, and ``finite_tensors`` for every weight of a loaded network or state (one
reduction per tensor, read back once) and every output before it is written. The scalar checks import no torch, so
the command line's argument parsing uses them too."""

from __future__ import annotations

import math
import sys
from numbers import Integral, Real


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def finite_number(value, name: str, fix: str = "") -> float:
    """``value`` as a float, refused unless it is a real (not bool) finite number."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{_fix(fix)}")
    return float(value)


def in_range(value, name: str, low: float | None = None, high: float | None = None, fix: str = "",
             low_open: bool = False) -> float:
    """``value`` as a float, refused unless finite and within ``[low, high]`` (``(low, high]`` with ``low_open``;
    a bound of ``None``: none on that side)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"<= {high:g}"
    want = " and ".join(s for s in (lo, hi) if s)
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number{' ' + want if want else ''}, got {value!r}{_fix(fix)}")
    return float(value)


def positive_int(value, name: str, fix: str = "") -> int:
    """``value`` refused unless it is an integer (not a bool, not 2.5) >= 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}{_fix(fix)}")
    return int(value)


# The largest classifier-free guidance scale cmkit samples at. Guidance extrapolates eps_u + w (eps_c - eps_u): the
# scales pipelines use lie in 1-20 (SD 7.5, SD3 7, Flux-dev 3.5); far above, the difference amplified w times
# saturates every image, and near 1e308 it overflows to inf / NaN latents. 100 leaves room for experiments.
MAX_GUIDANCE = 100.0


def check_guidance(w, name: str = "guidance_scale"):
    """A guidance scale: a finite number in [1, MAX_GUIDANCE] (1: none); a per-sample tensor passes as it is."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and torch.is_tensor(w):
        return w
    return in_range(w, name, 1, MAX_GUIDANCE, fix="1 = no guidance")


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf among ``(name, tensor)`` pairs, else None:
    one ``isfinite().all()`` per tensor, read back to the host once."""
    import torch

    named = [(n, t) for n, t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.device.type != "meta"]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all().to(named[0][1].device) for _, t in named]).cpu()
    return None if bool(flags.all()) else named[int((~flags).nonzero()[0])][0]


def finite_tensors(state_or_module, what: str, fix: str = "") -> None:
    """Refuse a network (its parameters and buffers), a state dict or a tensor holding a NaN or inf value, naming
    ``what`` they are (plural: "the unet's weights", "the sampled images") and the first bad tensor."""
    import torch

    if isinstance(state_or_module, torch.nn.Module):
        pairs = [*state_or_module.named_parameters(), *state_or_module.named_buffers()]
    elif torch.is_tensor(state_or_module):
        pairs = [("", state_or_module)]
    else:
        pairs = list(state_or_module.items())
    bad = first_nonfinite(pairs)
    if bad is not None:
        raise ValueError(f"{what} hold NaN or inf values{f' (first: {bad})' if bad else ''}{_fix(fix)}")
