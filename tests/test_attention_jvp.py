"""The blockwise attention tangent (``objectives/attention_jvp.py``): its output and JVP against the math kernel's
forward-mode AD in float64 (masks, GQA, several blocks, N not a multiple of the block), the "jvp" tangent method
against "jvp_math" on tiny diffusers models, and its largest intermediate against the math kernel's N x N."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from cmkit.latent.builders import small_cond_unet, small_sd3_transformer
from cmkit.objectives import attention_jvp as aj
from cmkit.objectives.tangents import TANGENT_METHODS, check_tangent_method, directional_derivative

F64 = torch.float64


def _math_jvp(primals, tangents, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), primals, tangents)


def _qkv(b, h, n, m, d, h_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_kv = h if h_kv is None else h_kv
    shapes = ((b, h, n, d), (b, h_kv, m, d), (b, h_kv, m, d))
    primals = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
    tangents = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
    return primals, tangents


def _masks(b, h, n, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, n, m, generator=g) > 0.4
    keep[0, 0, 3] = False  # a fully masked query row: output and tangent 0, as PyTorch's kernels give
    additive = torch.randn(b, h, n, m, generator=g, dtype=F64)
    additive[1, :, :, 5] = float("-inf")  # a key masked out for every query
    return {"none": None, "bool": keep, "additive": additive}


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("block", [7, 16, 512])
def test_output_and_jvp_equal_the_fused_output_and_the_math_kernel_jvp_in_float64(mask_kind, block):
    b, h, n, m, d = 2, 3, 37, 45, 8  # 45 keys: several blocks of 7 and 16 and a ragged last one; one block of 512
    primals, tangents = _qkv(b, h, n, m, d)
    mask = _masks(b, h, n, m)[mask_kind]
    o, do = torch.func.jvp(lambda q, k, v: aj.blockwise_attention(q, k, v, attn_mask=mask, block_size=block),
                           primals, tangents)
    want_o, want_do = _math_jvp(primals, tangents, attn_mask=mask)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(*primals, attn_mask=mask), rtol=0, atol=1e-10)
    assert want_do.abs().max() > 0.1  # a tangent worth comparing
    torch.testing.assert_close(do, want_do, rtol=0, atol=1e-10)
    if mask_kind == "bool":
        assert (o[0, :, 3] == 0).all() and (do[0, :, 3] == 0).all()


def test_the_additive_masks_own_tangent_scale_and_gqa_are_followed():
    b, h, n, m, d = 2, 4, 20, 33, 8
    (q, k, v), (dq, dk, dv) = _qkv(b, h, n, m, d, h_kv=2)
    g = torch.Generator().manual_seed(3)
    mask, dmask = (torch.randn(b, 1, n, m, generator=g, dtype=F64) for _ in range(2))

    def ours(q, k, v, mask):
        return aj.blockwise_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True, block_size=10)

    def math(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)

    o, do = torch.func.jvp(ours, (q, k, v, mask), (dq, dk, dv, dmask))
    with sdpa_kernel(SDPBackend.MATH):
        want_o, want_do = torch.func.jvp(math, (q, k, v, mask), (dq, dk, dv, dmask))
    torch.testing.assert_close(o, want_o, rtol=0, atol=1e-10)
    torch.testing.assert_close(do, want_do, rtol=0, atol=1e-10)
    # forward_ad too (a fixed mask), and reverse mode recomputes through the fused kernel
    _, want_fixed_mask = _math_jvp((q, k, v), (dq, dk, dv), attn_mask=mask, scale=0.3, enable_gqa=True)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in ((q, dq), (k, dk), (v, dv))]
        got = fwAD.unpack_dual(ours(*duals, mask)).tangent
    torch.testing.assert_close(got, want_fixed_mask, rtol=0, atol=1e-10)
    assert (want_do - want_fixed_mask).abs().max() > 0.1  # the mask's tangent mattered above
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(ours(*leaves, mask).square().sum(), leaves)
    want = torch.autograd.grad(math(*leaves, mask).square().sum(), leaves)
    for a, w in zip(grads, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-10)


def test_vmap_over_the_jvp_batches_it():
    (q, k, v), (dq, dk, dv) = _qkv(5, 2, 9, 11, 4)

    def tangent(attention):
        return lambda q, k, v: torch.func.jvp(attention, (q, k, v), (dq[0], dk[0], dv[0]))[1]

    got = torch.func.vmap(tangent(lambda a, b, c: aj.blockwise_attention(a, b, c, block_size=4)))(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        want = torch.func.vmap(tangent(F.scaled_dot_product_attention))(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_unsupported_arguments_are_refused_in_one_line():
    (q, k, v), _ = _qkv(1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="is_causal=False only"):
        aj.blockwise_attention(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="dropout_p=0 only"):
        aj.blockwise_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="jvp, jvp_math, finite_difference"):
        check_tangent_method("jvp_flash", 1e-3)
    assert TANGENT_METHODS[0] == "jvp"


def test_the_context_restores_sdpa():
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError), aj.blockwise_attention_jvp(block_size=4):
        assert F.scaled_dot_product_attention is not original
        raise RuntimeError
    assert F.scaled_dot_product_attention is original


def _sd3():
    model = small_sd3_transformer(layers=2, heads=2, head_dim=16, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    enc, pooled = torch.randn(2, 7, 64, generator=g), torch.randn(2, 32, generator=g)
    x, dx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)

    def fn(x, t):
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample

    return fn, (x, torch.tensor([300.0, 800.0])), (dx, torch.tensor([100.0, -50.0]))


def _unet():
    model = small_cond_unet(sample_size=8, base=16, heads=4, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(2, 7, 32, generator=g)
    x, dx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)

    def fn(x, t):
        return model(x, t, encoder_hidden_states=enc).sample

    return fn, (x, torch.tensor([300.0, 800.0])), (dx, torch.tensor([100.0, -50.0]))


@pytest.mark.parametrize("build", [_sd3, _unet], ids=["sd3", "unet"])
def test_the_jvp_method_equals_jvp_math_on_tiny_diffusers_models(build, monkeypatch):
    fn, primals, tangents = build()
    calls = []
    inner = aj.attention_jvp

    def counting(*a, **kw):
        calls.append(kw.get("block_size", a[-1] if len(a) > 10 else None))
        return inner(*a, **kw)

    monkeypatch.setattr(aj, "attention_jvp", counting)
    monkeypatch.setattr(aj, "BLOCK_SIZE", 5)  # several blocks of the tiny models' 16-64 tokens
    out, jvp = directional_derivative(fn, primals, tangents, "jvp")
    assert calls and set(calls) == {5}  # every attention went through the blockwise tangent
    n = len(calls)
    want_out, want = directional_derivative(fn, primals, tangents, "jvp_math")
    assert len(calls) == n  # and none on the math route
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jvp, want, rtol=1e-5, atol=1e-5)


class _LargestOutput(TorchDispatchMode):
    """The element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_blockwise_tangent_never_holds_an_n_by_n_matrix_the_math_kernel_does():
    n, d = 4096, 64
    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    tangents = tuple(torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    with torch.no_grad():
        with _LargestOutput() as ours:
            _, do = torch.func.jvp(lambda q, k, v: aj.blockwise_attention(q, k, v, block_size=512), primals, tangents)
        with _LargestOutput() as math:
            _, want = _math_jvp(primals, tangents)
    torch.testing.assert_close(do, want, rtol=1e-4, atol=1e-4)
    assert math.largest >= n * n
    assert ours.largest <= n * 512 < n * n
