"""One checker per kind of value check, each raising a one-line ``ValueError`` that names the value and the fix:
``finite_number`` / ``in_range`` for a scalar (a sampling argument, a scheduler or recipe value, a ``cmkit.json``
entry), ``positive_int`` for a count, and ``finite_tensors`` for every weight of a loaded network or state (one
reduction per tensor, read back once) and every output before it is written."""

from __future__ import annotations

import math

import torch


def _fix(fix: str) -> str:
    return f"; {fix}" if fix else ""


def finite_number(value, name: str, fix: str = "") -> float:
    """``value`` as a float, refused unless it is a real (not bool) finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{_fix(fix)}")
    return float(value)


def in_range(value, name: str, low: float | None = None, high: float | None = None, fix: str = "",
             low_open: bool = False) -> float:
    """``value`` as a float, refused unless finite and within ``[low, high]`` (``(low, high]`` with ``low_open``;
    a bound of ``None``: none on that side)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"<= {high:g}"
    want = " and ".join(s for s in (lo, hi) if s)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number{' ' + want if want else ''}, got {value!r}{_fix(fix)}")
    return float(value)


def positive_int(value, name: str, fix: str = "") -> int:
    """``value`` refused unless it is an integer (not a bool, not 2.5) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}{_fix(fix)}")
    return value


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf among ``(name, tensor)`` pairs, else None:
    one ``isfinite().all()`` per tensor, read back to the host once."""
    named = [(n, t) for n, t in tensors if torch.is_tensor(t) and t.is_floating_point() and t.device.type != "meta"]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all().to(named[0][1].device) for _, t in named]).cpu()
    return None if bool(flags.all()) else named[int((~flags).nonzero()[0])][0]


def finite_tensors(state_or_module, what: str, fix: str = "") -> None:
    """Refuse a network (its parameters and buffers), a state dict or a tensor holding a NaN or inf value, naming
    ``what`` it is and its first bad tensor."""
    if isinstance(state_or_module, torch.nn.Module):
        pairs = [*state_or_module.named_parameters(), *state_or_module.named_buffers()]
    elif torch.is_tensor(state_or_module):
        pairs = [("", state_or_module)]
    else:
        pairs = list(state_or_module.items())
    bad = first_nonfinite(pairs)
    if bad is not None:
        where = f"'s tensor {bad}" if bad else ""
        raise ValueError(f"{what}{where} holds NaN or inf values{_fix(fix)}")
