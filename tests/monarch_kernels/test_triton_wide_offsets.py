"""Triton kernels on tensors whose element offsets pass 2^31 while every stride fits in int32.

A token-major (transposed) tensor has column stride ``ld ≈ T``: at ``T·n ≥ 2^31`` elements (700K tokens at
3072 wide, a 4 GiB bf16 tensor) the column index times ``ld`` no longer fits in int32, though each factor
does, so Triton passes both as int32. The kernels form every activation tile's offsets in int64
(``blockdiag._at``); here each tensor argument is handed in as a transposed view whose last columns sit past
element 2^31 (``wide``: the storage is virtual, only ``T·n`` elements are touched) and each result must equal,
bit for bit, the same call on a compact token-major copy (same kernels and tiles, offsets below 2^31), which
the other test files check against float64. With int32 column offsets the wrapped offsets address memory
outside the tensor: the interpreter crashes or the values differ.
"""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels.shapes import MonarchShape, monarch_factor_shapes

pytest.importorskip("triton")
if mk.available_backends()["triton"] != "available":
    pytest.skip("triton backend unavailable: " + mk.available_backends()["triton"], allow_module_level=True)

from monarch_kernels.triton import _common  # noqa: E402
from monarch_kernels.triton import blockdiag as tbd  # noqa: E402
from monarch_kernels.triton import mlp as tmlp  # noqa: E402
from monarch_kernels.triton import monarch as tmon  # noqa: E402
from monarch_kernels.triton import token_major as ttm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INT32_LIMIT = 2 ** 31


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t (T, n)``, ``n ≥ 2``, copied into a token-major view with a 16-aligned column stride ``ld < 2^31``
    that puts its last ``⌈n/4⌉`` columns at offsets ``col·ld ≥ 2^31``."""
    T, n = t.shape
    first_past = n - max(1, n // 4)
    ld = -(-INT32_LIMIT // first_past // 16) * 16
    assert (first_past - 1) * ld < INT32_LIMIT <= first_past * ld and ld >= T
    view = torch.empty((n - 1) * ld + T, device=t.device, dtype=t.dtype).as_strided((T, n), (1, ld))
    return view.copy_(t)


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a token-major tensor of the library's own layout (column stride ``T`` rounded up to 16)."""
    return _common.empty_token_major(*t.shape, device=t.device, dtype=t.dtype).copy_(t)


def rnd(gen, *shape, dtype=torch.float16):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def assert_same(fn, tensors: dict):
    """``fn(**tensors)`` with every tensor wide equals ``fn`` with every tensor compact, element for element
    (results: a tensor or a tuple of tensors/None)."""
    expect = fn(**{k: compact(v) for k, v in tensors.items()})
    got = fn(**{k: wide(v) for k, v in tensors.items()})
    expect, got = (r if isinstance(r, tuple) else (r,) for r in (expect, got))
    assert len(got) == len(expect)
    for i, (a, e) in enumerate(zip(got, expect)):
        assert (a is None) == (e is None), i
        if e is not None:
            assert a.shape == e.shape, i
            assert torch.equal(a, e), f"result {i}: {(a.double() - e.double()).abs().max().item():.3g} off"


def test_wide_helper_puts_columns_past_the_int32_range():
    t = torch.randn(5, 8, dtype=torch.float16)
    w = wide(t)
    assert torch.equal(w, t) and w.stride(0) == 1 and w.stride(1) < INT32_LIMIT
    assert w.stride(1) * (w.shape[1] - 1) >= INT32_LIMIT


def test_token_major_copies():
    gen = torch.Generator().manual_seed(0)
    x, pre = rnd(gen, 37, 24), rnd(gen, 37, 24)
    assert_same(lambda src: ttm.copy_into(src, torch.empty(37, 24, device=DEVICE, dtype=torch.float16)),
                dict(src=x))
    assert_same(lambda pre, g: ttm.activation_grad_token_major("gelu", pre, g), dict(pre=pre, g=x))
    out = wide(torch.zeros_like(x))
    ttm.copy_into(x, out)
    assert torch.equal(out, x)


@pytest.mark.parametrize("in_perm", [None, (8, 4)], ids=["natural", "grouped"])
def test_block_diagonal_forward_and_weight_gradient(in_perm):
    gen = torch.Generator().manual_seed(1)
    k, q, p, T = 4, 8, 8, 37
    x, g, w, b = rnd(gen, T, k * p), rnd(gen, T, k * q), rnd(gen, k, q, p), rnd(gen, k * q)
    assert_same(lambda x: tbd.bd_forward(x, w, b, k * q, "gelu", in_perm=in_perm), dict(x=x))
    assert_same(lambda x, g: tbd.bd_weight_grad(x, g, k, q, p, g_perm=in_perm), dict(x=x, g=g))
    # a wide output and pre-activation
    out, pre = wide(torch.zeros(T, k * q, device=DEVICE, dtype=x.dtype)), wide(torch.zeros_like(g))
    y = tbd.bd_forward(x, w, b, k * q, "gelu", in_perm=in_perm, out=out, pre_out=pre)
    expect_pre = tbd.bd_forward(x, w, b, k * q, "none", in_perm=in_perm)
    assert y is out and torch.equal(out, tbd.bd_forward(x, w, b, k * q, "gelu", in_perm=in_perm))
    assert torch.equal(pre, expect_pre)


SHAPES = {"fused square": ((16, 16, 8), (16, 8, 16)), "grouped C=2": ((4, 8, 8), (4, 8, 8))}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_monarch_forward_and_backward(shape):
    s1, s2 = SHAPES[shape]
    sh = MonarchShape.from_factors(s1, s2)
    gen = torch.Generator().manual_seed(2)
    T = 37
    x, g, w1, w2, b = rnd(gen, T, sh.n_in), rnd(gen, T, sh.n_out), rnd(gen, *s1), rnd(gen, *s2), rnd(gen, sh.n_out)
    for path in ("fused", "two_kernel"):
        if tmon.path_applies(sh, path):
            assert_same(lambda x: tmon.forward(x, w1, w2, b, sh.n_out, "gelu", path=path), dict(x=x))
    for dxw in ("fused", "separate", "bmm"):
        for g_layout in ("row_major", "token_major"):
            assert_same(lambda x, g: tmon.backward(x, g, w1, w2, dxw=dxw, g_layout=g_layout), dict(x=x, g=g))
    assert_same(lambda x, g: tmon.backward_epilogue(x, g, w1, w2, b, sh.n_in, "gelu", True), dict(x=x, g=g))


def test_fused_mlp_forward_and_backward():
    n_in, n_h, nb = 64, 256, 4
    sh1, sh2 = monarch_factor_shapes(n_in, n_h, nb), monarch_factor_shapes(n_h, n_in, nb)
    gen = torch.Generator().manual_seed(3)
    dt = torch.bfloat16
    w1a, w2a, w1b, w2b = (rnd(gen, *s, dtype=dt) * 0.2 for s in (sh1.w1_shape, sh1.w2_shape, sh2.w1_shape,
                                                                sh2.w2_shape))
    b1, b2 = rnd(gen, n_h, dtype=dt), rnd(gen, n_in, dtype=dt)
    T = 150  # two 128-token tiles
    x, g = rnd(gen, T, n_in, dtype=dt), rnd(gen, T, n_in, dtype=dt)
    w1v = tmlp.regroup(w1b, sh2, sh1.l)
    z1, z2 = rnd(gen, T, sh1.n_mid, dtype=dt), rnd(gen, T, sh2.n_mid, dtype=dt)
    assert_same(lambda z1: tmlp.hidden_layer(z1, w2a, b1, w1v, sh2, "gelu"), dict(z1=z1))
    assert_same(lambda z1, dy2: tmlp.hidden_layer_backward(z1, w2a, b1, w1v, dy2, sh2, "gelu"),
                dict(z1=z1, dy2=z2))
    assert_same(lambda x: tmlp.mlp_forward_saving(x, w1a, w2a, b1, w1b, w2b, b2, n_in, "gelu")[0], dict(x=x))
    _, z1, z2, _ = tmlp.mlp_forward_saving(x, w1a, w2a, b1, w1b, w2b, b2, n_in, "gelu")
    assert_same(lambda x, g, z1, z2: tmlp.mlp_backward(x, g, w1a, w2a, b1, w1b, w2b, z1, z2, w1v, "gelu", True),
                dict(x=x, g=g, z1=z1, z2=z2))
