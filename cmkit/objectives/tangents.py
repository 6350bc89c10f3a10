"""Directional derivatives of a network for the continuous-time objectives (sCM, MeanFlow): forward-mode AD
(``torch.func.jvp``) or, for backbones whose kernels lack forward-mode AD, a central finite difference.

Both run under no_grad (the result is a stop-gradient target), in float32 whatever autocast says (sCM's advice: the
tangent's small differences do not survive half precision), and with PyTorch's math attention kernel, the one
scaled-dot-product attention kernel with forward-mode AD (the fused CPU and GPU kernels have none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

TANGENT_METHODS = ("jvp", "finite_difference")


def check_tangent_method(method: str, fd_step: float) -> None:
    if method not in TANGENT_METHODS:
        raise ValueError(f"objective.tangent must be one of {', '.join(TANGENT_METHODS)}, got {method!r}")
    if not fd_step > 0:
        raise ValueError(f"objective.fd_step must be > 0, got {fd_step}")


@contextlib.contextmanager
def _float32(device: torch.device):
    with torch.no_grad(), torch.autocast(device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        yield


def directional_derivative(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                           method: str = "jvp", fd_step: float = 1e-3, replay=contextlib.nullcontext):
    """``(fn(*primals) or None, d/de fn(primals + e tangents) at e = 0)``. ``replay`` is a context factory entered
    around every evaluation of ``fn`` (the same dropout masks each time). The finite difference returns no primal
    output (the caller has it from its own pass)."""
    device = primals[0].device
    up = [p.float() if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) else p for p in primals]
    tangents = [v.to(p.dtype) for v, p in zip(tangents, up, strict=True)]
    with _float32(device):
        if method == "jvp":
            with replay():
                return torch.func.jvp(fn, tuple(up), tuple(tangents))
        if method != "finite_difference":
            raise ValueError(f"unknown tangent method {method!r}; choose one of {', '.join(TANGENT_METHODS)}")
        with replay():
            hi = fn(*[p + fd_step * v for p, v in zip(up, tangents, strict=True)])
        with replay():
            lo = fn(*[p - fd_step * v for p, v in zip(up, tangents, strict=True)])
        return None, (hi - lo) / (2 * fd_step)
