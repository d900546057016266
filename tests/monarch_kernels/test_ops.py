"""Reference ops: conventions, ragged sizes, dtypes, autograd, torch.compile, dispatch and bad input."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import monarch_kernels as mk
from monarch_kernels import backends as registry
from conftest import RTOL, rel_err
from helpers import blockdiag_dense, monarch_dense_explicit, monarch_einsum

# (w1 shape, w2 shape): square, rectangular (fly's own test), MonarchLinear layouts, non-powers of two,
# and a routing where q is not a multiple of l
FACTOR_SHAPES = [
    ((4, 4, 4), (4, 4, 4)),
    ((8, 8, 8), (8, 8, 8)),
    ((8, 192, 96), (24, 16, 64)),
    ((4, 12, 12), (4, 48, 12)),  # 48 -> 192, nb=4 (GPT-2 fc1 at 1/16 width)
    ((4, 12, 48), (4, 12, 12)),  # 192 -> 48
    ((3, 5, 7), (5, 6, 3)),
    ((4, 5, 8), (4, 6, 5)),  # q = 5 not a multiple of l = 4
    ((1, 6, 9), (2, 5, 3)),
]


def rand_factors(s1, s2, dtype=torch.float64):
    return torch.randn(s1, dtype=dtype), torch.randn(s2, dtype=dtype)


@pytest.mark.parametrize("s1,s2", FACTOR_SHAPES)
def test_monarch_matches_dense_and_einsum(s1, s2):
    w1, w2 = rand_factors(s1, s2)
    x = torch.randn(3, 2, s1[0] * s1[2], dtype=torch.float64)
    out = mk.monarch_matmul(x, w1, w2)
    assert out.shape == (3, 2, s2[0] * s2[1])
    M = monarch_dense_explicit(w1, w2)
    assert rel_err(mk.monarch_to_dense(w1, w2), M) < 1e-12
    assert rel_err(out, x @ M.T) < 1e-12
    assert rel_err(out, monarch_einsum(x, w1, w2)) < 1e-12


@pytest.mark.parametrize("b,B", [(4, 8), (8, 4), (16, 16), (6, 5)])
def test_square_blocks_are_P_L_Pt_R(b, B):
    """For square factors (b, B, B) the product is the paper's M = P L Pᵀ R with P = P(b, n)."""
    n = b * B
    w1, w2 = rand_factors((b, B, B), (b, B, B))
    idx = torch.arange(n).view(b, B).T.reshape(-1)  # (P x)[j·b + i] = x[i·B + j]
    P = torch.zeros(n, n, dtype=torch.float64)
    P[torch.arange(n), idx] = 1
    M = P @ blockdiag_dense(w2) @ P.T @ blockdiag_dense(w1)
    assert rel_err(mk.monarch_to_dense(w1, w2), M) < 1e-12
    if b == B:  # entry formula M[s·m + l, k·m + p] = w2[l, s, k] · w1[k, l, p]
        E = torch.einsum("lsk,klp->slkp", w2, w1).reshape(n, n)
        assert rel_err(M, E) < 1e-12


def test_blockdiag_matches_block_diag():
    w = torch.randn(5, 3, 4, dtype=torch.float64)
    x = torch.randn(7, 20, dtype=torch.float64)
    assert rel_err(mk.blockdiag_matmul(x, w), x @ blockdiag_dense(w).T) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["monarch", "blockdiag"])
def test_low_precision_against_float64(dtype, op):
    s1, s2 = (4, 12, 12), (4, 48, 12)
    w1, w2 = rand_factors(s1, s2)
    x = torch.randn(33, 48, dtype=torch.float64)
    if op == "monarch":
        out = mk.monarch_matmul(x.to(dtype), w1.to(dtype), w2.to(dtype))
        ref = mk.monarch_matmul(x.to(dtype).double(), w1.to(dtype).double(), w2.to(dtype).double())
    else:
        out = mk.blockdiag_matmul(x.to(dtype), w1.to(dtype))
        ref = mk.blockdiag_matmul(x.to(dtype).double(), w1.to(dtype).double())
    assert out.dtype == dtype
    assert rel_err(out, ref) < RTOL[dtype]


@pytest.mark.parametrize("lead", [(0,), (1,), (2, 3), (0, 4), ()])
def test_batch_shapes(lead):
    w1, w2 = rand_factors((4, 3, 5), (3, 7, 4))
    x = torch.randn(*lead, 20, dtype=torch.float64)
    out = mk.monarch_matmul(x, w1, w2)
    assert out.shape == (*lead, 21)
    if x.numel():
        assert rel_err(out, x @ mk.monarch_to_dense(w1, w2).T) < 1e-12


def test_strided_and_noncontiguous_inputs():
    w1, w2 = rand_factors((4, 6, 8), (6, 5, 4))
    big = torch.randn(10, 64, dtype=torch.float64)
    x = big[::2, ::2]  # strided rows and columns
    assert not x.is_contiguous()
    w1t = torch.randn(4, 8, 6, dtype=torch.float64).transpose(1, 2)  # non-contiguous weight
    M = monarch_dense_explicit(w1t, w2)
    assert rel_err(mk.monarch_matmul(x, w1t, w2), x @ M.T) < 1e-12
    xt = torch.randn(32, 5, dtype=torch.float64).T  # transposed
    assert rel_err(mk.monarch_matmul(xt, w1, w2), xt @ monarch_dense_explicit(w1, w2).T) < 1e-12


@pytest.mark.parametrize("n_in,out_features", [(30, 22), (25, 19), (32, 24)])
def test_ragged_sizes_equal_padded_dense(n_in, out_features):
    w1, w2 = rand_factors((4, 5, 8), (4, 6, 5))  # k·p = 32, l·s = 24
    bias = torch.randn(out_features, dtype=torch.float64)
    x = torch.randn(6, n_in, dtype=torch.float64)
    out = mk.monarch_linear(x, w1, w2, bias, out_features=out_features)
    M = monarch_dense_explicit(w1, w2)[:out_features, :n_in]
    assert rel_err(out, x @ M.T + bias) < 1e-12
    w = torch.randn(4, 6, 8, dtype=torch.float64)
    outb = mk.blockdiag_linear(x, w, bias, out_features=out_features)
    assert rel_err(outb, x @ blockdiag_dense(w)[:out_features, :n_in].T + bias) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck_and_gradgradcheck_monarch(dtype):
    x = torch.randn(3, 30, dtype=dtype, requires_grad=True)
    w1 = torch.randn(4, 5, 8, dtype=dtype, requires_grad=True)
    w2 = torch.randn(4, 6, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(22, dtype=dtype, requires_grad=True)
    f = lambda x, w1, w2, b: mk.monarch_linear(x, w1, w2, b, out_features=22)
    assert gradcheck(f, (x, w1, w2, b))
    assert gradgradcheck(f, (x, w1, w2, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck_and_gradgradcheck_blockdiag(dtype):
    x = torch.randn(2, 3, 30, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 7, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(26, dtype=dtype, requires_grad=True)
    f = lambda x, w, b: mk.blockdiag_linear(x, w, b, out_features=26)
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_third_order_derivative_through_weight_grads():
    """Backward ops are themselves differentiable: a third derivative matches finite differences."""
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)

    def grad_norm(x, w1, w2):
        out = mk.monarch_matmul(x, w1, w2)
        (g1,) = torch.autograd.grad(out.pow(2).sum(), w1, create_graph=True)
        return g1.pow(2).sum()

    assert gradgradcheck(grad_norm, (x, w1, w2))


def test_matches_autograd_of_dense_formulation():
    x = torch.randn(4, 2, 48, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 12, 12, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 48, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 2, 192, dtype=torch.float64)
    ours = torch.autograd.grad(mk.monarch_matmul(x, w1, w2), (x, w1, w2), g)
    ref = torch.autograd.grad(monarch_einsum(x, w1, w2), (x, w1, w2), g)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-12


def test_torch_compile_fullgraph_matches_eager():
    w1 = torch.randn(4, 6, 8, requires_grad=True)
    w2 = torch.randn(6, 5, 4, requires_grad=True)
    b = torch.randn(30, requires_grad=True)

    def f(x):
        return torch.relu(mk.monarch_linear(x, w1, w2, b)) + mk.blockdiag_matmul(x, w1).sum(-1, keepdim=True)

    x = torch.randn(5, 32)
    eager = f(x)
    g_eager = torch.autograd.grad(eager.sum(), (w1, w2, b))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    g_comp = torch.autograd.grad(compiled.sum(), (w1, w2, b))
    assert rel_err(compiled, eager) < 1e-6
    for a, c in zip(g_comp, g_eager):
        assert rel_err(a, c) < 1e-6


def test_opcheck_custom_ops():
    """torch.library's own consistency checks (schema, fake tensor, autograd registration)."""
    x = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    ops = torch.ops.monarch_kernels
    torch.library.opcheck(ops.monarch_fwd, (x, w1, w2, None, 24, "gelu", "torch"))
    torch.library.opcheck(ops.monarch_bwd_input, (g, w1, w2, 30, "torch"))
    torch.library.opcheck(ops.monarch_bwd_weight, (x, g, w1, w2, "torch"))
    torch.library.opcheck(ops.blockdiag_fwd, (x, w1, None, 20, "relu", "torch"))
    torch.library.opcheck(ops.blockdiag_wgrad, (x, g[:, :20], 4, 5, 8, "torch"))


# ---------------------------------------------------------------------------------------------- dispatch


def test_available_backends_and_resolution():
    status = mk.available_backends()
    assert status["torch"] == "available"
    x, w = torch.randn(2, 8), torch.randn(2, 4, 4)
    assert mk.resolve_backend("blockdiag", x, w, backend="torch") == "torch"
    assert mk.resolve_backend("monarch", x, w, w) in status


def test_backend_selection_context_and_errors():
    x, w1, w2 = torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    assert mk.get_backend() == "auto"
    with mk.use_backend("torch"):
        assert mk.get_backend() == "torch"
        mk.monarch_matmul(x, w1, w2)
    assert mk.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        mk.monarch_matmul(x, w1, w2, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        mk.set_backend("nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        mk.monarch_matmul(x, w1, w2, backend=3)


def test_unavailable_backend_raises_with_reason():
    def load():
        raise ImportError("compiled without the flux capacitor")

    mk.register_backend(mk.Backend("broken", load, supports=lambda d, t: True, priority=100))
    try:
        assert "flux capacitor" in mk.available_backends()["broken"]
        x, w1, w2 = torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
        with pytest.raises(mk.BackendUnavailableError, match="flux capacitor"):
            mk.monarch_matmul(x, w1, w2, backend="broken")
        # auto skips it even at the highest priority
        assert mk.resolve_backend("monarch", x, w1, w2) != "broken"
    finally:
        registry._REGISTRY.pop("broken")


def test_backend_without_device_support_raises():
    mk.register_backend(mk.Backend("gpuonly", lambda: mk.reference, supports=lambda d, t: d.type == "cuda"))
    try:
        x, w1, w2 = torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
        with pytest.raises(mk.BackendUnavailableError, match="does not support"):
            mk.monarch_matmul(x, w1, w2, backend="gpuonly")
    finally:
        registry._REGISTRY.pop("gpuonly")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 9), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), ValueError,
         r"last dimension 9.*\(\.\.\., 8\)"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(3, 4, 4)), ValueError, "k·q = 8.*l·r = 12"),
        (lambda: (torch.randn(2, 8), torch.randn(8), torch.randn(2, 4, 4)), ValueError,
         r"w1 must be 3-D \(nblocks, out_block, in_block\)"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(4, 4)), ValueError, "w2 must be 3-D"),
        (lambda: (torch.randn(2, 8).double(), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), TypeError, "w1 has dtype"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4).double()), TypeError, "w2 has dtype"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 4, 4, device="meta"), torch.randn(2, 4, 4, device="meta")),
         ValueError, "w1 is on meta"),
        (lambda: (torch.ones(2, 8, dtype=torch.int64), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), TypeError,
         "x has dtype torch.int64"),
        (lambda: ([[1.0] * 8], torch.randn(2, 4, 4), torch.randn(2, 4, 4)), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.tensor(1.0), torch.randn(2, 4, 4), torch.randn(2, 4, 4)), ValueError, "at least 1 dimension"),
        (lambda: (torch.randn(2, 8), torch.randn(2, 0, 4), torch.randn(2, 4, 0)), ValueError, "no empty dimension"),
    ],
)
def test_monarch_matmul_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        mk.monarch_matmul(*make())


def test_linear_bad_input():
    x, w1, w2 = torch.randn(2, 7), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(8,\)"):
        mk.monarch_linear(x, w1, w2, torch.randn(5))
    with pytest.raises(ValueError, match=r"out_features=9 must lie in \[1, 8\]"):
        mk.monarch_linear(x, w1, w2, out_features=9)
    with pytest.raises(ValueError, match="between 1 and 8"):
        mk.monarch_linear(torch.randn(2, 9), w1, w2)
    with pytest.raises(ValueError, match=r"expects shape \(\.\.\., 8\)"):
        mk.monarch_matmul(x, w1, w2)  # the strict op refuses ragged inputs
    with pytest.raises(ValueError, match=r"expects shape \(\.\.\., 8\)"):
        mk.blockdiag_matmul(x, w1)
    with pytest.raises(TypeError, match="bias has dtype"):
        mk.blockdiag_linear(torch.randn(2, 8), w1, torch.randn(8).double())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dtype_mismatches_are_refused_by_the_public_functions(backend):
    """A bias or second factor of another dtype than ``x``/``w1`` raises ``TypeError`` naming it, on the torch
    reference too (whose ``+``/``bmm`` would otherwise promote the bias silently or fail with a bare RuntimeError),
    before any backend runs."""
    if mk.available_backends()[backend] != "available":
        pytest.skip(f"{backend} backend not available")
    x, w1, w2 = torch.randn(3, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    b64 = torch.randn(8, dtype=torch.float64)
    for call in (lambda: mk.monarch_linear(x, w1, w2, b64, backend=backend),
                 lambda: mk.blockdiag_linear(x, w1, b64, backend=backend),
                 lambda: mk.monarch_mlp(x, w1, w2, w1, w2, fc2_bias=b64, backend=backend)):
        with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has dtype torch.float32"):
            call()
    for call in (lambda: mk.monarch_linear(x, w1, w2.double(), backend=backend),
                 lambda: mk.monarch_matmul(x, w1, w2.double(), backend=backend)):
        with pytest.raises(TypeError, match="w2 has dtype torch.float64 but w1 has dtype torch.float32"):
            call()


@pytest.mark.parametrize("transform", [False, True], ids=["autograd", "torch.func"])
def test_second_order_through_one_weight_gradient_only(transform):
    """``d/dw1 ⟨c2, ∂⟨g, out⟩/∂w2⟩`` and ``d/dw2 ⟨c1, ∂⟨g, out⟩/∂w1⟩``: a double backward whose outer loss uses
    one of the two weight gradients (under ``torch.func`` the other's cotangent arrives as ``None``), per element
    against float64 autograd through the einsum formulation, ragged sizes (30 inputs of 32, 22 outputs of 24)."""
    w1, w2 = rand_factors((4, 5, 8), (4, 6, 5))
    x = torch.randn(2, 3, 30, dtype=torch.float64)
    g = torch.randn(2, 3, 22, dtype=torch.float64)
    c1, c2 = torch.randn_like(w1), torch.randn_like(w2)

    def run(fn):
        if transform:
            vjp = torch.func.vjp
            f2 = lambda a1: (vjp(lambda b: fn(x, a1, b), w2)[1](g)[0] * c2).sum()
            f1 = lambda a2: (vjp(lambda a: fn(x, a, a2), w1)[1](g)[0] * c1).sum()
            return torch.func.grad(f2)(w1), torch.func.grad(f1)(w2)
        a1, a2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
        d1, d2 = torch.autograd.grad(fn(x, a1, a2), (a1, a2), g, create_graph=True)
        return (torch.autograd.grad((d2 * c2).sum(), a1, retain_graph=True)[0],
                torch.autograd.grad((d1 * c1).sum(), a2)[0])

    got = run(lambda x, a, b: mk.monarch_linear(x, a, b, out_features=22))
    want = run(lambda x, a, b: monarch_einsum(torch.nn.functional.pad(x, (0, 2)), a, b)[..., :22])
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-12, atol=1e-12)


def test_out_features_bounds_are_inclusive_of_one_and_the_padded_width():
    """``out_features`` lies in ``[1, padded width]``: 0 and negatives are refused by every public function (the
    eager route runs no op-level check after it), 1 and the full width give the leading columns of the float64
    dense product."""
    x = torch.randn(3, 7, dtype=torch.float64)
    w1, w2 = rand_factors((2, 4, 4), (2, 4, 4))
    w = torch.randn(2, 4, 4, dtype=torch.float64)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"out_features={bad} must lie in \[1, 8\]"):
            mk.monarch_linear(x, w1, w2, out_features=bad)
        with pytest.raises(ValueError, match=rf"out_features={bad} must lie in \[1, 8\]"):
            mk.blockdiag_linear(x, w, out_features=bad)
        with pytest.raises(ValueError, match=rf"hidden_features={bad} must lie in \[1, 8\]"):
            mk.monarch_mlp(x, w1, w2, w1, w2, hidden_features=bad)
    for n in (1, 8):
        dense = monarch_dense_explicit(w1, w2)[:n, :7]
        assert rel_err(mk.monarch_linear(x, w1, w2, out_features=n), x @ dense.T) < 1e-12
        assert rel_err(mk.blockdiag_linear(x, w, out_features=n), x @ blockdiag_dense(w)[:n, :7].T) < 1e-12


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_fused_activation_matches_torch_and_is_twice_differentiable(act):
    import torch.nn.functional as F

    x = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(22, dtype=torch.float64, requires_grad=True)
    pre = mk.monarch_linear(x, w1, w2, b, out_features=22)
    expect = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](pre)
    assert rel_err(mk.monarch_linear(x, w1, w2, b, out_features=22, activation=act), expect) < 1e-12
    f = lambda x, w1, w2, b: mk.monarch_linear(x, w1, w2, b, out_features=22, activation=act)
    assert gradcheck(f, (x, w1, w2, b))
    if act != "relu":  # relu's second derivative is zero almost everywhere but finite differences see the kinks
        assert gradgradcheck(f, (x, w1, w2, b))
    fb = lambda x, w: mk.blockdiag_linear(x, w, activation=act)
    assert gradcheck(fb, (x, torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)))


def test_activation_bad_input():
    x, w = torch.randn(2, 8), torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        mk.monarch_linear(x, w, w, activation="swish")
    with pytest.raises(TypeError, match="needs real tensors"):
        mk.blockdiag_linear(x.to(torch.complex64), w.to(torch.complex64), activation="relu")
