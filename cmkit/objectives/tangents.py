"""Directional derivatives of a network for the continuous-time objectives (sCM, MeanFlow): forward-mode AD
(``torch.func.jvp``) or, for backbones whose kernels lack forward-mode AD, a central finite difference.

All run under no_grad (the result is a stop-gradient target) and in float32 whatever autocast says (sCM's advice: the
tangent's small differences do not survive half precision). The fused CPU and GPU scaled-dot-product attention
kernels have no forward-mode AD; the method picks how attention is differentiated:

- ``"jvp"`` (default): ``attention_jvp.blockwise_attention_jvp``: the fused kernel for the output and the tangent over
  key blocks with an online softmax, O(N * block) memory per attention call.
- ``"jvp_math"``: PyTorch's math attention kernel, whose forward-mode AD materialises every N x N attention matrix
  and its tangent (the earlier route; kept as a reference).
- ``"finite_difference"``: a central difference, with the math kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_jvp import blockwise_attention_jvp

TANGENT_METHODS = ("jvp", "jvp_math", "finite_difference")


def check_tangent_method(method: str, fd_step: float) -> None:
    if method not in TANGENT_METHODS:
        raise ValueError(f"objective.tangent must be one of {', '.join(TANGENT_METHODS)}, got {method!r}")
    if not fd_step > 0:
        raise ValueError(f"objective.fd_step must be > 0, got {fd_step}")


@contextlib.contextmanager
def _float32(device: torch.device, method: str):
    attention = blockwise_attention_jvp() if method == "jvp" else sdpa_kernel(SDPBackend.MATH)
    with torch.no_grad(), torch.autocast(device.type, enabled=False), attention:
        yield


def directional_derivative(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                           method: str = "jvp", fd_step: float = 1e-3, replay=contextlib.nullcontext):
    """``(fn(*primals) or None, d/de fn(primals + e tangents) at e = 0)``. ``replay`` is a context factory entered
    around every evaluation of ``fn`` (the same dropout masks each time). The finite difference returns no primal
    output (the caller has it from its own pass)."""
    device = primals[0].device
    up = [p.float() if p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) else p for p in primals]
    tangents = [v.to(p.dtype) for v, p in zip(tangents, up, strict=True)]
    if method not in TANGENT_METHODS:
        raise ValueError(f"unknown tangent method {method!r}; choose one of {', '.join(TANGENT_METHODS)}")
    with _float32(device, method):
        if method in ("jvp", "jvp_math"):
            with replay():
                return torch.func.jvp(fn, tuple(up), tuple(tangents))
        with replay():
            hi = fn(*[p + fd_step * v for p, v in zip(up, tangents, strict=True)])
        with replay():
            lo = fn(*[p - fd_step * v for p, v in zip(up, tangents, strict=True)])
        return None, (hi - lo) / (2 * fd_step)
