"""CUDA kernels (the ``cuda`` backend) against the float64 reference; skipped without a GPU build."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import activations
from monarch_kernels import reference as ref
from conftest import rel_err

if mk.available_backends()["cuda"] != "available":
    pytest.skip("cuda backend unavailable: " + mk.available_backends()["cuda"], allow_module_level=True)

from monarch_kernels.ext import Primitives as C  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# fused (q % l == 0) and two-kernel shapes, ragged, rank c = 48 (GPT-2 style), c = 1, c > 64
SHAPES = [((4, 192, 192), (4, 768, 192)), ((4, 192, 768), (4, 192, 192)), ((32, 32, 32), (32, 32, 32)),
          ((4, 5, 8), (4, 6, 5)), ((2, 160, 40), (2, 90, 160))]


pytestmark = pytest.mark.usefixtures("poisoned_allocations")  # fresh outputs start as NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s1,s2", SHAPES)
@pytest.mark.parametrize("T", [1, 333])
def test_monarch_ops(s1, s2, dtype, T):
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in, n_out = sh.n_in - 1, sh.n_out - 1
    mkr = lambda *s, sc=1.0: (torch.randn(*s) * sc).cuda().to(dtype)
    x, g, b = mkr(T, n_in), mkr(T, n_out), mkr(n_out)
    w1, w2 = mkr(*s1, sc=sh.p ** -0.5), mkr(*s2, sc=sh.r ** -0.5)
    d = lambda t: t.double()
    assert rel_err(C.monarch_fwd(x, w1, w2, b, n_out, "gelu"),
                   ref.monarch_fwd(d(x), d(w1), d(w2), d(b), n_out, "gelu")) < TOL[dtype]
    assert rel_err(C.monarch_bwd_input(g, w1, w2, n_in), ref.monarch_bwd_input(d(g), d(w1), d(w2), n_in)) < TOL[dtype]
    for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2))):
        assert rel_err(a, e) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blockdiag_ops(dtype):
    x, g = torch.randn(300, 250).cuda().to(dtype), torch.randn(300, 190).cuda().to(dtype)
    w, b = (torch.randn(4, 48, 64) / 8).cuda().to(dtype), torch.randn(190).cuda().to(dtype)
    d = lambda t: t.double()
    assert rel_err(C.blockdiag_fwd(x, w, b, 190, "relu"), ref.blockdiag_fwd(d(x), d(w), d(b), 190, "relu")) < TOL[dtype]
    assert rel_err(C.blockdiag_wgrad(x, g, 4, 48, 64), ref.blockdiag_wgrad(d(x), d(g), 4, 48, 64)) < TOL[dtype]


def test_strided_input():
    big = torch.randn(64, 2 * 768, device="cuda", dtype=torch.bfloat16)
    x = big[:, ::2]
    w1 = (torch.randn(4, 192, 192, device="cuda") / 14).bfloat16()
    w2 = (torch.randn(4, 768, 192, device="cuda") / 14).bfloat16()
    out = C.monarch_fwd(x, w1, w2, None, 3072, "none")
    assert rel_err(out, ref.monarch_fwd(x.double(), w1.double(), w2.double(), None, 3072)) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------ decode kernels (few tokens)
# decode.cu serves forward, dX and block-diagonal products with T <= 64 tokens (fp32: 16); compared per element
# (max-abs error relative to the output's scale) with float64 on fresh random data, outputs poisoned with NaN.
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DECODE_TOKENS = {torch.bfloat16: [1, 5, 16, 17, 33, 64], torch.float16: [1, 8, 40], torch.float32: [1, 7, 16]}
# square (nblocks 4: reductions of several chunks and warps), c = 1 (n = 4096 in 64 blocks), ragged (p = 8, r = 5:
# element loads), p = 1, q = 1, a rectangular GPT-2-like pair, and 2048-wide blocks (the longest reductions)
DECODE_SHAPES = [((4, 256, 256), (4, 256, 256)), ((64, 64, 64), (64, 64, 64)), ((4, 5, 8), (4, 6, 5)),
                 ((4, 3, 1), (3, 2, 4)), ((8, 1, 4), (2, 3, 4)), ((4, 192, 192), (4, 768, 192)),
                 ((2, 2048, 2048), (2, 2048, 2048))]


def elem_err(actual, expected):
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def decode_case(s1, s2, dtype, T):
    sh = mk.MonarchShape.from_factors(s1, s2)
    mkr = lambda *s, sc=1.0: (torch.randn(*s, device="cuda") * sc).to(dtype)
    return sh, mkr(T, sh.n_in), mkr(T, sh.n_out), mkr(sh.n_out), mkr(*s1, sc=sh.p ** -0.5), mkr(*s2, sc=sh.r ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s1,s2", DECODE_SHAPES)
def test_decode_monarch_forward_and_dx(s1, s2, dtype):
    for T in DECODE_TOKENS[dtype]:
        sh, x, g, b, w1, w2 = decode_case(s1, s2, dtype, T)
        d = lambda t: t.double()
        for act in ("none", "relu", "gelu", "gelu_tanh"):
            out = C.monarch_fwd(x, w1, w2, b, sh.n_out, act)
            assert elem_err(out, ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, act)) < ELEM_TOL[dtype], (T, act)
        # truncated input and output widths (the kernels' column bounds)
        out = C.monarch_fwd(x[:, : sh.n_in - 1], w1, w2, b[:-1], sh.n_out - 1, "none")
        want = ref.monarch_fwd(d(x[:, : sh.n_in - 1]), d(w1), d(w2), d(b[:-1]), sh.n_out - 1)
        assert elem_err(out, want) < ELEM_TOL[dtype], T
        dx = C.monarch_bwd_input(g, w1, w2, sh.n_in)
        assert elem_err(dx, ref.monarch_bwd_input(d(g), d(w1), d(w2), sh.n_in)) < ELEM_TOL[dtype], T
        for a, e in zip(C.monarch_bwd_weight(x, g, w1, w2), ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2))):
            assert rel_err(a, e) < TOL[dtype], T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_strided_and_transposed_operands(dtype):
    w1 = (torch.randn(4, 192, 192, device="cuda") / 14).to(dtype)
    w2 = (torch.randn(4, 768, 192, device="cuda") / 14).to(dtype)
    big, gbig = torch.randn(5, 2 * 768, device="cuda").to(dtype), torch.randn(3072, 5, device="cuda").to(dtype)
    x, g = big[:, ::2], gbig.t()  # strided columns / a transposed view: the element-load staging path
    d = lambda t: t.double()
    assert elem_err(C.monarch_fwd(x, w1, w2, None, 3072, "none"), ref.monarch_fwd(d(x), d(w1), d(w2), None, 3072)) \
        < ELEM_TOL[dtype]
    assert elem_err(C.monarch_bwd_input(g, w1, w2, 768), ref.monarch_bwd_input(d(g), d(w1), d(w2), 768)) \
        < ELEM_TOL[dtype]
    # non-contiguous weights are served (copied) too
    w2t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert elem_err(C.monarch_fwd(x, w1, w2t, None, 3072, "none"), ref.monarch_fwd(d(x), d(w1), d(w2), None, 3072)) \
        < ELEM_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 16])
def test_decode_blockdiag_plain_and_transposed_weight(dtype, T):
    x, b = torch.randn(T, 250, device="cuda").to(dtype), torch.randn(190, device="cuda").to(dtype)
    w = (torch.randn(4, 48, 64, device="cuda") / 8).to(dtype)
    d = lambda t: t.double()
    assert elem_err(C.blockdiag_fwd(x, w, b, 190, "relu"), ref.blockdiag_fwd(d(x), d(w), d(b), 190, "relu")) \
        < ELEM_TOL[dtype]
    wt = (torch.randn(4, 64, 48, device="cuda") / 8).to(dtype).transpose(1, 2)  # served in place (W_bᵀ x)
    assert elem_err(C.blockdiag_fwd(x, wt, None, 190, "none"), ref.blockdiag_fwd(d(x), d(wt), None, 190)) \
        < ELEM_TOL[dtype]


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
def test_decode_nan_and_inf_propagate_like_torch(act):
    sh, x, g, b, w1, w2 = decode_case((4, 64, 64), (4, 64, 64), torch.float32, 3)
    x[0, 5], x[1, 70], b[9] = float("nan"), float("inf"), float("-inf")
    out = C.monarch_fwd(x, w1, w2, b, sh.n_out, act)
    want = ref.monarch_fwd(x.double(), w1.double(), w2.double(), b.double(), sh.n_out, act)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    finite = want.isfinite()
    assert elem_err(out[finite], want[finite]) < ELEM_TOL[torch.float32]


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("T", [3, 100])  # decode kernels; fused tile kernel (q % l == 0)
def test_fp16_pre_activation_overflow_like_torch(act, T):
    # act(F.linear(...)) rounds the linear output to fp16 before the activation: -65536 is -inf there and
    # gelu(-inf) = NaN; odd stage-2 rows give -16 * 64 * 64 = -65536, even rows 4096 (all exact in fp16)
    x = torch.ones(T, 256, device="cuda", dtype=torch.float16)
    w1 = torch.ones(4, 64, 64, device="cuda", dtype=torch.float16)
    w2 = torch.full((4, 64, 64), -16.0, device="cuda", dtype=torch.float16)
    w2[:, ::2] = 1.0
    out = C.monarch_fwd(x, w1, w2, None, 256, act)
    want = activations.apply(act, ref.monarch_fwd(x, w1, w2, None, 256))
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.equal(out[finite], want[finite])

def test_auto_takes_the_decode_kernels_for_few_tokens():
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16) / 16
    w2 = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16) / 16
    assert mk.resolve_backend("monarch", x, w1, w2) == "cuda"
    got = mk.monarch_matmul(x, w1, w2)
    assert elem_err(got, ref.monarch_fwd(x.double(), w1.double(), w2.double(), None, 1024)) < ELEM_TOL[torch.bfloat16]



def _scaled_factors(s1, s2, dtype, gen):
    """(shape, w1, w2, bias) on the GPU: factors scaled by their fan-in (outputs of order 1), a random bias."""
    sh = mk.MonarchShape.from_factors(s1, s2)
    w1 = (torch.randn(*s1, generator=gen) * sh.p ** -0.5).to("cuda", dtype)
    w2 = (torch.randn(*s2, generator=gen) * sh.r ** -0.5).to("cuda", dtype)
    return sh, w1, w2, torch.randn(sh.n_out, generator=gen).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("factors", [((64, 64, 64), (64, 64, 64)), ((4, 8, 16), (4, 24, 8)), ((5, 6, 7), (3, 9, 10)),
                                     ((16, 1, 1), (4, 3, 4))], ids=str)
def test_rowsplit_decode_forward_matches_float64(dtype, factors):
    """The row-split forward (``ext.decode_kernel("rowsplit")``) per element against float64, bias + GELU,
    T = 1..16, outputs poisoned (fresh allocations filled with NaN); ragged and 1-wide blocks."""
    from monarch_kernels import ext

    gen = torch.Generator().manual_seed(0)
    sh, w1, w2, b = _scaled_factors(*factors, dtype, gen)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}[dtype]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for T in (1, 4, 16):
            x = torch.randn(T, sh.n_in, generator=gen).to("cuda", dtype)
            with ext.decode_kernel("rowsplit"):
                out = C.monarch_fwd(x, w1, w2, b, sh.n_out, "gelu")
            d = lambda t: t.double()
            assert rel_err(out, ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, "gelu")) < tol
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("factors", [((32, 32, 32), (32, 32, 32)), ((4, 32, 16), (8, 16, 16)),
                                     ((2, 24, 16), (3, 8, 16)), ((16, 16, 64), (16, 16, 16)),
                                     ((64, 64, 64), (64, 64, 64)), ((16, 16, 16), (16, 16, 16))], ids=str)
def test_resident_forward_matches_float64(dtype, factors):
    """The many-token forward with both factors in shared memory (the default past the decode kernels where its
    plans take the call: one CTA per SM, or a cluster for 4096/64 and 256/16) per element against float64 and
    against the tile kernels (``many_token_kernel("tiles")``), bias + each activation, ragged token counts
    (several tiles per CTA or cluster at 5000 tokens)."""
    from monarch_kernels import ext

    gen = torch.Generator().manual_seed(1)
    sh, w1, w2, b = _scaled_factors(*factors, dtype, gen)
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for T, act in ((65, "none"), (333, "relu"), (5000, "gelu"), (1000, "gelu_tanh")):
            x = torch.randn(T, sh.n_in, generator=gen).to("cuda", dtype)
            out = C.monarch_fwd(x, w1, w2, b, sh.n_out, act)
            d = lambda t: t.double()
            assert rel_err(out, ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, act)) < tol
            with ext.many_token_kernel("tiles"):
                tiles = C.monarch_fwd(x, w1, w2, b, sh.n_out, act)
            assert rel_err(out, tiles.double()) < 2 * tol
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("factors", [((32, 32, 32), (32, 32, 32)), ((64, 64, 64), (64, 64, 64))],
                         ids=["one_cta", "cluster"])
def test_training_forward_keeps_the_intermediate_for_the_triton_backward(factors):
    """A training call where a resident kernel runs the forward (``ext.Primitives.monarch_fwd_saving``): it keeps
    ``z`` (row-major, stage 2's column order) beside the output, and the backward runs Triton's kernels on it —
    ``z``, the output and every gradient of a bias + GELU step through autograd (``backend="cuda"``) against
    float64. Few tokens (the decode kernels) and the tile kernels keep nothing."""
    from monarch_kernels import ext

    if mk.available_backends()["triton"] != "available":
        pytest.skip("the kept intermediate is read by the Triton backend's backward")
    gen = torch.Generator().manual_seed(2)
    sh, w1, w2, b = _scaled_factors(*factors, torch.bfloat16, gen)
    x = torch.randn(1000, sh.n_in, generator=gen).to("cuda", torch.bfloat16)
    d = lambda t: t.double()
    out, z, pre = C.monarch_fwd_saving(x, w1, w2, b, sh.n_out, "gelu")
    assert pre is None and z is not None and z.shape == (1000, sh.k * sh.q) and z.is_contiguous()
    want_z = ref._stage1(d(x), d(w1), sh.l, sh.r).permute(1, 0, 2).reshape(1000, -1)
    assert elem_err(z, want_z) < 2e-2
    assert elem_err(out, ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, "gelu")) < 2e-2
    assert C.monarch_fwd_saving(x[:16], w1, w2, b, sh.n_out, "gelu")[1] is None
    with ext.many_token_kernel("tiles"):
        assert C.monarch_fwd_saving(x, w1, w2, b, sh.n_out, "gelu")[1] is None

    g = torch.randn(1000, sh.n_out, generator=gen).to("cuda", torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
    mk.monarch_linear(*leaves, activation="gelu", backend="cuda").backward(g)
    gp = activations.backward("gelu", ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, "none"), d(g))
    want = (*ref.monarch_bwd(d(x), gp, d(w1), d(w2), sh.n_in), gp.sum(0))
    for name, a, e in zip(("dx", "dw1", "dw2", "db"), leaves, want):
        assert elem_err(a.grad, e) < 3e-2, name
