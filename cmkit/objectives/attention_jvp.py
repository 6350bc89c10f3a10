"""The forward-mode tangent of softmax attention in O(N * block) memory, for the JVP objectives (sCM, MeanFlow).

``torch.func.jvp`` through PyTorch's math attention kernel (the one kernel with forward-mode AD) materialises every
N x N attention matrix and its tangent: gigabytes per layer at 4096 tokens. ``BlockwiseAttention`` instead runs the
fused ``scaled_dot_product_attention`` (any backend) for the output and computes the tangent over key blocks with an
online softmax, as flash attention computes its forward. With S = scale Q K^T (+ mask), P = softmax(S), O = P V and
the tangents dQ, dK, dV:

    dS = scale (dQ K^T + Q dK^T) (+ the additive mask's tangent)
    m_i = sum_j P_ij dS_ij
    dO_i = sum_j P_ij dS_ij V_j - m_i O_i + sum_j P_ij dV_j

every sum over j taken block by block with a running row maximum and rescaled running sums (the output O is
recomputed by the same pass, so the tangent is consistent with its own normaliser). The largest intermediate is
(batch, heads, N, block). Plain PyTorch, so it runs wherever the rest does; no host-device synchronisation in the
loop.

The seam: ``blockwise_attention_jvp()`` replaces ``torch.nn.functional.scaled_dot_product_attention`` for its scope
and restores it on exit. diffusers 0.42's attention-backend registry cannot host it: the registry is keyed by the
closed enum ``AttentionBackendName`` (``attention_backend`` and ``dispatch_attention_fn`` convert every name through
it), and the older processors in ``attention_processor.py`` (``AttnProcessor2_0`` of ``UNet2DConditionModel``,
``JointAttnProcessor2_0`` of ``SD3Transformer2DModel``) never go through the registry: they call
``F.scaled_dot_product_attention`` themselves. The newer ones (``FluxTransformer2DModel``, ``WanTransformer3DModel``)
call ``dispatch_attention_fn``, whose default ``native`` backend (and ``_native_math`` etc.) calls
``torch.nn.functional.scaled_dot_product_attention`` by attribute at call time, as do cmkit's own processors
(``latent/families/sd3.py``). One module attribute therefore covers all of them. Not covered: a diffusers backend
other than the native ones (flash-attn, sage, xformers: chosen with ``DIFFUSERS_ATTN_BACKEND`` or
``set_attention_backend``), which have no forward-mode AD anyway, and code that bound the function by name at import
(``from torch.nn.functional import scaled_dot_product_attention``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

BLOCK_SIZE = 512  # keys per block of the tangent's online softmax

_SDPA = F.scaled_dot_product_attention  # the fused kernel, bound before any replacement


def _check_args(dropout_p: float, is_causal: bool) -> None:
    if is_causal:
        raise ValueError("blockwise attention JVP supports is_causal=False only (pass a mask instead)")
    if dropout_p != 0:
        raise ValueError(f"blockwise attention JVP supports dropout_p=0 only, got {dropout_p}")


def _key_block(mask: torch.Tensor | None, j0: int, j1: int) -> torch.Tensor | None:
    """The mask's columns j0:j1 (a mask broadcast over the keys, last dim 1, as it is)."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., j0:j1]


def _block_scores(qs, dqs, k, dk, attn_mask, dmask, j0: int, j1: int):
    """Keys ``j0:j1``'s scaled scores ``S = q k^T`` (masked) and their tangent ``dS = dq k^T + q dk^T (+ dmask)``
    (None where every tangent is zero)."""
    kb = k[..., j0:j1, :]
    s, ds = qs @ kb.mT, None
    if dqs is not None:
        ds = dqs @ kb.mT
    if dk is not None:
        t = qs @ dk[..., j0:j1, :].mT
        ds = t if ds is None else ds + t
    mb = _key_block(attn_mask, j0, j1)
    if mb is not None:
        s = s.masked_fill(~mb, float("-inf")) if mb.dtype == torch.bool else s + mb
    if dmask is not None:
        dmb = _key_block(dmask, j0, j1)
        ds = dmb.expand_as(s) if ds is None else ds + dmb
    return s, ds


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor | None,
                  dk: torch.Tensor | None, dv: torch.Tensor | None, attn_mask: torch.Tensor | None = None,
                  dmask: torch.Tensor | None = None, scale: float | None = None, enable_gqa: bool = False,
                  block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, dO)``: softmax attention of (..., N, D) q and (..., M, D) k, v (a boolean mask keeps where True, a float
    one is added to the scores; fully masked rows give 0, as PyTorch's kernels do) and its tangent along
    ``(dq, dk, dv, dmask)`` (None: zero), over blocks of ``block_size`` keys."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out_dtype = q.dtype
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    def up(t):
        return None if t is None else t.to(cdt)

    q, k, v, dq, dk, dv = (up(t) for t in (q, k, v, dq, dk, dv))
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v, dk, dv = (None if t is None else t.repeat_interleave(rep, dim=-3) for t in (k, v, dk, dv))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask, dmask = up(attn_mask), up(dmask)
    else:
        dmask = None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qs = q * scale
    dqs = None if dq is None else dq * scale
    n, m = q.shape[-2], k.shape[-2]
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    neg_inf = float("-inf")
    row_max = torch.full((*batch, n, 1), neg_inf, dtype=cdt, device=q.device)
    norm = torch.zeros((*batch, n, 1), dtype=cdt, device=q.device)    # sum_j exp(S_ij - max)
    msum = torch.zeros_like(norm)                                       # sum_j exp(S_ij - max) dS_ij
    acc_o = torch.zeros((*batch, n, v.shape[-1]), dtype=cdt, device=q.device)
    acc_t = torch.zeros_like(acc_o)
    has_ds = dq is not None or dk is not None or dmask is not None
    for j0 in range(0, m, block_size):
        j1 = min(j0 + block_size, m)
        vb = v[..., j0:j1, :]
        s, ds = _block_scores(qs, dqs, k, dk, attn_mask, dmask, j0, j1)
        new_max = torch.maximum(row_max, s.amax(-1, keepdim=True))
        safe_max = torch.where(new_max == neg_inf, 0.0, new_max)   # rows masked so far: every weight is 0
        alpha = torch.exp(row_max - safe_max)
        w = torch.exp(s - safe_max)
        norm = norm * alpha + w.sum(-1, keepdim=True)
        acc_o = acc_o * alpha + w @ vb
        acc_t = acc_t * alpha
        if has_ds:
            wds = w * ds
            msum = msum * alpha + wds.sum(-1, keepdim=True)
            acc_t = acc_t + wds @ vb
        if dv is not None:
            acc_t = acc_t + w @ dv[..., j0:j1, :]
        row_max = new_max
    norm = torch.where(norm == 0, 1.0, norm)   # fully masked rows: 0, not 0 / 0
    o = acc_o / norm
    do = acc_t / norm - (msum / norm) * o
    return o.to(out_dtype), do.to(out_dtype)


class BlockwiseAttention(torch.autograd.Function):
    """Softmax attention whose forward is the fused kernel and whose forward-mode derivative (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) is ``attention_jvp``; reverse mode recomputes through the fused kernel."""

    generate_vmap_rule = True  # torch.func.vmap over it (and over its jvp) batches the ops inside

    @staticmethod
    def forward(q, k, v, attn_mask, scale, enable_gqa, block_size):
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _SDPA(q, k, v, attn_mask=attn_mask, scale=scale, **kw)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, scale, enable_gqa, block_size = inputs
        ctx.scale, ctx.enable_gqa, ctx.block_size = scale, enable_gqa, block_size
        ctx.has_mask = attn_mask is not None
        saved = (q, k, v) + ((attn_mask,) if attn_mask is not None else ())
        ctx.save_for_forward(*saved)
        ctx.save_for_backward(*saved)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        return attention_jvp(q, k, v, dq, dk, dv, mask, dmask, ctx.scale, ctx.enable_gqa, ctx.block_size)[1]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        if mask is not None and mask.is_floating_point():
            mask = mask.detach().requires_grad_(ctx.needs_input_grad[3])
            inputs.append(mask)
        with torch.enable_grad():
            kw = {"enable_gqa": True} if ctx.enable_gqa else {}
            out = _SDPA(*inputs[:3], attn_mask=mask, scale=ctx.scale, **kw)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        res = [next(grads) if t.requires_grad else None for t in inputs]
        res += [None] * (7 - len(res))
        return tuple(res)


def blockwise_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None, enable_gqa: bool = False,
                        block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature, its output, and the blockwise forward-mode derivative."""
    _check_args(dropout_p, is_causal)
    return BlockwiseAttention.apply(query, key, value, attn_mask, scale, enable_gqa, block_size)


@contextlib.contextmanager
def blockwise_attention_jvp(block_size: int | None = None):
    """Within it, ``torch.nn.functional.scaled_dot_product_attention`` (so every diffusers attention processor, see
    the module docstring) is ``blockwise_attention``; the previous function is restored on exit. The replacement is
    a module attribute, so it is process-wide for its scope: another thread calling attention meanwhile gets the
    blockwise function too (same output, so only its speed and reverse-mode memory change). ``block_size``: keys
    per block, ``BLOCK_SIZE`` when None."""
    block_size = BLOCK_SIZE if block_size is None else block_size
    previous = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return blockwise_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, block_size)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
