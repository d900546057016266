"""Regression tests for the reliability audit (issue #18, defects D1-D8): NaN/Inf-faithful epilogues and
activation derivatives, thread-local backend choice, validated raw ops (Python custom ops and compiled ops),
autograd on every op including ``torch.func``, and clear errors for bad arguments."""
import asyncio
import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import monarch_kernels as mk
from monarch_kernels import ext
from conftest import rel_err
from helpers import monarch_dense_explicit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = [b for b in ("torch", "cpu", "triton") if mk.available_backends()[b] == "available"]
HAS_CPU = "cpu" in BACKENDS
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="cpu extension not built")


# ------------------------------------------------------------------------------------------------ D1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gelu_tanh_backward_is_finite_at_large_preactivations(backend, dtype):
    """D1: fp16 gelu_tanh backward computed in the storage dtype gave NaN at pre = 1000 (pre³ overflows)."""
    w1, w2 = torch.full((2, 4, 4), 0.01), torch.full((2, 4, 4), 0.01)
    x = torch.randn(5, 8)
    bias = torch.full((8,), 1000.0)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w1, w2, bias)]
    out = mk.monarch_linear(*leaves, activation="gelu_tanh", backend=backend)
    grads = torch.autograd.grad(out.float().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.gelu(ref_leaves[0] @ monarch_dense_explicit(*ref_leaves[1:3]).T + ref_leaves[3], approximate="tanh")
    expect = torch.autograd.grad(ref.sum(), ref_leaves)
    for got, want in zip(grads, expect):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("act,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activation_derivative_in_the_tails(act, approximate, dtype):
    """D1: act'(-4) evaluated in fp16/bf16 was 0 or 6% off; in float32 it is exact to storage precision.
    With zero weights the pre-activation is the bias, so dbias = Σ_t g · act'(bias). (Below -4 even float32
    loses the tanh form's 1 + tanh(u) to cancellation, as torch's own GELU backward does.)"""
    pre = torch.tensor([-4.0, -3.0, -1.0, 3.5, -4.0, -2.5, 0.5, -3.5])
    w1, w2 = torch.zeros(2, 4, 4, dtype=dtype), torch.zeros(2, 4, 4, dtype=dtype)
    bias = pre.to(dtype).requires_grad_()
    for backend in BACKENDS:
        out = mk.monarch_linear(torch.randn(3, 8, dtype=dtype), w1, w2, bias, activation=act, backend=backend)
        (db,) = torch.autograd.grad(out.sum(), bias)
        p = bias.detach().double().requires_grad_()
        (want,) = torch.autograd.grad(3 * F.gelu(p, approximate=approximate).sum(), p)
        assert ((db.double() - want).abs() / want.abs()).max() < 1e-2, backend


# ------------------------------------------------------------------------------------------------ D2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["monarch", "blockdiag"])
def test_fused_relu_keeps_nan(backend, op):
    """D2: the fused ReLU epilogue mapped NaN to 0 on `cpu` and `triton`; unfused relu(F.linear(...)) keeps it."""
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    w1, w2 = torch.randn(4, 4, 4), torch.randn(4, 4, 4)
    if op == "monarch":
        fused = mk.monarch_linear(x, w1, w2, activation="relu", backend=backend)
        unfused = F.relu(mk.monarch_linear(x, w1, w2, backend="torch"))
    else:
        fused = mk.blockdiag_linear(x, w1, activation="relu", backend=backend)
        unfused = F.relu(mk.blockdiag_linear(x, w1, backend="torch"))
    assert torch.isnan(unfused[1]).any()
    assert torch.equal(torch.isnan(fused), torch.isnan(unfused))
    assert rel_err(fused, unfused) < 1e-5


# ------------------------------------------------------------------------------------------------ D4


def _in_thread(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as exc:  # reported to the caller
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_use_backend_is_local_to_the_thread():
    """D4: inside `with use_backend("cpu")` in one thread, another thread's complex64 call raised."""
    c = torch.complex64
    x, w1, w2 = torch.randn(2, 8, dtype=c), torch.randn(2, 4, 4, dtype=c), torch.randn(2, 4, 4, dtype=c)
    with mk.use_backend("torch" if not HAS_CPU else "cpu"):
        assert _in_thread(mk.get_backend) == "auto"
        out = _in_thread(lambda: mk.monarch_matmul(x, w1, w2))
        assert rel_err(out, x @ monarch_dense_explicit(w1, w2).T) < 1e-5
        # set_backend is the process-wide default: other threads see it, this block keeps its own choice
        mk.set_backend("torch")
        try:
            assert _in_thread(mk.get_backend) == "torch"
            assert mk.get_backend() == ("torch" if not HAS_CPU else "cpu")
        finally:
            mk.set_backend("auto")
    assert mk.get_backend() == "auto"


def test_use_backend_is_local_to_the_asyncio_task():
    async def pinned(name, seen):
        with mk.use_backend(name):
            await asyncio.sleep(0)
            seen[name] = mk.get_backend()

    async def main():
        seen = {}
        await asyncio.gather(pinned("torch", seen), pinned("auto", seen))
        return seen

    assert asyncio.run(main()) == {"torch": "torch", "auto": "auto"}


def test_use_backend_validates_and_restores_on_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with mk.use_backend("nope"):
            pass
    with pytest.raises(TypeError, match="backend must be a str"):
        with mk.use_backend(3):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with mk.use_backend("torch"):
            raise RuntimeError("boom")
    assert mk.get_backend() == "auto"


# ------------------------------------------------------------------------------------------------ D5


def _monarch_args():
    x, g = torch.randn(3, 8), torch.randn(3, 8)
    w1, w2 = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    return x, g, w1, w2


PY_OPS = torch.ops.monarch_kernels


def _bad_python_op_calls():
    x, g, w1, w2 = _monarch_args()
    return [
        (lambda: PY_OPS.monarch_bwd_weight(x, g[:1], w1, w2, "torch"), ValueError, "same leading dimensions"),
        (lambda: PY_OPS.monarch_bwd(x, g[:1], w1, w2, 8, "torch"), ValueError, "same leading dimensions"),
        (lambda: PY_OPS.monarch_fwd(x, w1, w2, torch.randn(5), 8, "none", "torch"), ValueError,
         r"bias has shape \(5,\), expected \(8,\)"),
        (lambda: PY_OPS.monarch_fwd(x, w1, w2, None, 12, "none", "torch"), ValueError,
         r"n_out=12 must lie in \[1, 8\]"),
        (lambda: PY_OPS.monarch_fwd(torch.randn(3, 9), w1, w2, None, 8, "none", "torch"), ValueError,
         r"x has shape \(3, 9\)"),
        (lambda: PY_OPS.monarch_fwd(x, w1, w2, None, 8, "swish", "torch"), ValueError, "activation must be"),
        (lambda: PY_OPS.monarch_fwd(x, w1, w2, None, 8, "none", "auto"), ValueError, "already resolved"),
        (lambda: PY_OPS.monarch_fwd(x.double(), w1, w2, None, 8, "none", "torch"), TypeError,
         "x has dtype torch.float64 but w1"),
        (lambda: PY_OPS.monarch_bwd_input(g, w1, w2, 9, "torch"), ValueError, r"n_in=9 must lie in \[1, 8\]"),
        (lambda: PY_OPS.monarch_bwd_weight(x, g, w1, torch.randn(3, 4, 4), "torch"), ValueError, "l·r = 12"),
        (lambda: PY_OPS.blockdiag_fwd(x, w1, None, 9, "none", "torch"), ValueError, r"n_out=9 must lie in \[1, 8\]"),
        (lambda: PY_OPS.blockdiag_wgrad(x, g[:2], 2, 4, 4, "torch"), ValueError, "same leading dimensions"),
        (lambda: PY_OPS.blockdiag_wgrad(x, g, 2, 3, 4, "torch"), ValueError, r"g has shape \(3, 8\)"),
        # the same token count in other leading dims: every leading dim is compared, not the first alone
        (lambda: PY_OPS.monarch_bwd_weight(x.reshape(3, 1, 8), g, w1, w2, "torch"), ValueError,
         "same leading dimensions"),
        (lambda: PY_OPS.blockdiag_wgrad(x, g.reshape(3, 1, 8), 2, 4, 4, "torch"), ValueError,
         "same leading dimensions"),
        (lambda: PY_OPS.monarch_fwd(x[:, :0], w1, w2, None, 8, "none", "torch"), ValueError,
         r"x has shape \(3, 0\)"),
        (lambda: PY_OPS.monarch_bwd_input(g[:, :0], w1, w2, 8, "torch"), ValueError, r"g has shape \(3, 0\)"),
    ]


@pytest.mark.parametrize("case", range(17))
def test_python_ops_validate_arguments_in_real_and_fake_mode(case):
    """D5: the custom ops trusted their callers; their bodies and fake implementations now check."""
    call, exc, match = _bad_python_op_calls()[case]
    with pytest.raises(exc, match=match):
        call()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(exc, match=match):
            call()


EXT = torch.ops.monarch_kernels_ext


def _bad_ext_op_calls():
    x, g, w1, w2 = _monarch_args()
    return [
        (lambda: EXT.monarch_bwd_weight(x, g[:1], w1, w2), ValueError, "same number of rows"),
        (lambda: EXT.monarch_bwd(x, g[:1], w1, w2, 8), ValueError, "same number of rows"),
        (lambda: EXT.monarch_fwd(x, w1, w2, torch.randn(2), 8, 0), ValueError,
         r"bias has shape \[2\], expected \(8,\)"),
        (lambda: EXT.blockdiag_fwd(x, w1, torch.randn(2), 8, 0), ValueError, r"bias has shape \[2\]"),
        (lambda: EXT.monarch_fwd(x, w1, w2, None, 12, 0), ValueError, r"n_out=12 must lie in \[1, 8\]"),
        (lambda: EXT.blockdiag_fwd(x, w1, None, 9, 0), ValueError, r"n_out=9 must lie in \[1, 8\]"),
        (lambda: EXT.monarch_bwd_input(g, w1, w2, 9), ValueError, r"n_in=9 must lie in \[1, 8\]"),
        (lambda: EXT.monarch_bwd(x, g, w1, w2, 0), ValueError, r"n_in=0 must lie in \[1, 8\]"),
        (lambda: EXT.monarch_fwd(x, w1, w2, None, 8, 7), ValueError, "act=7 must be an activation code"),
        (lambda: EXT.monarch_fwd(x[0], w1, w2, None, 8, 0), ValueError, r"x has shape \[8\]"),
        (lambda: EXT.monarch_fwd(x, w1[0], w2, None, 8, 0), ValueError, "w1 must be 3-D"),
        (lambda: EXT.monarch_fwd(x, w1, torch.randn(3, 4, 4), None, 8, 0), ValueError, "l\\*r = 12"),
        (lambda: EXT.monarch_fwd(x.double(), w1, w2, None, 8, 0), TypeError, "x has dtype Double but w1"),
        (lambda: EXT.monarch_fwd(*(t.to(torch.complex64) for t in (x, w1, w2)), None, 8, 0), TypeError, "ComplexFloat"),
        (lambda: EXT.blockdiag_wgrad(x, g, 2, 3, 4), ValueError, r"g has shape \[3, 8\]"),
        (lambda: EXT.blockdiag_wgrad(x, g, 0, 4, 4), ValueError, r"k=0 must lie in"),
    ]


@needs_cpu
@pytest.mark.parametrize("case", range(16))
def test_compiled_ops_validate_arguments(case):
    """D5: the compiled ops read past a short bias, left columns past l·s uninitialised and trusted g's row
    count; they now raise before any kernel runs, in inference mode too, and their fakes agree."""
    ext.load()
    call, exc, match = _bad_ext_op_calls()[case]
    with pytest.raises(exc, match=match):
        call()
    with torch.inference_mode(), pytest.raises(exc, match=match):
        call()
    if exc is ValueError:  # the fakes raise the same error class (their messages name shapes as tuples)
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc):
            call()


@needs_cpu
def test_compiled_op_with_mismatched_rows_does_not_crash_the_process():
    """D5: monarch_bwd_weight(x of 2M rows, g of 1 row) was a SIGSEGV (run in a child process)."""
    code = (
        "import torch\n"
        "from monarch_kernels import ext\n"
        "ext.load()\n"
        "x, g = torch.zeros(2_000_000, 8), torch.zeros(1, 8)\n"
        "w = torch.randn(2, 4, 4)\n"
        "try:\n"
        "    torch.ops.monarch_kernels_ext.monarch_bwd_weight(x, g, w, w)\n"
        "except ValueError as exc:\n"
        "    print('ValueError', exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ValueError" in res.stdout and "same number of rows" in res.stdout


# ------------------------------------------------------------------------------------------------ D6


@needs_cpu
def test_compiled_ops_have_autograd_kernels():
    """D6: the compiled ops had no Autograd-key kernel (PyTorch warned of silently incorrect gradients);
    now gradients (and gradients of gradients) flow through them directly."""
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    f = lambda x, w1, w2, b: EXT.monarch_fwd(x, w1, w2, b, 8, 2)
    assert torch.autograd.gradcheck(f, (x, w1, w2, b))
    assert torch.autograd.gradgradcheck(f, (x, w1, w2, b))


def test_jacrev_through_the_ops():
    """D6: torch.func.jacrev raised a setup_context error (torch.library's autograd registration does not
    support functorch); the ops run through an equivalent autograd.Function under torch.func."""
    x = torch.randn(3, 8, dtype=torch.float64)
    w1, w2 = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    for backend in [b for b in BACKENDS if b != "triton"]:
        jac_w1 = torch.func.jacrev(lambda w: mk.monarch_matmul(x, w, w2, backend=backend))(w1)
        want = torch.func.jacrev(lambda w: x @ monarch_dense_explicit(w, w2).T)(w1)
        assert rel_err(jac_w1, want) < 1e-12, backend
        jac_x = torch.func.jacrev(lambda t: mk.monarch_linear(t, w1, w2, activation="gelu", backend=backend))(x)
        want_x = torch.func.jacrev(lambda t: F.gelu(t @ monarch_dense_explicit(w1, w2).T))(x)
        assert rel_err(jac_x, want_x) < 1e-12, backend
        f = lambda w: F.gelu(x @ torch.block_diag(*w.unbind(0)).T).sum()
        hess = torch.func.jacrev(torch.func.jacrev(
            lambda w: mk.blockdiag_linear(x, w, activation="gelu", backend=backend).sum()))(w1)
        assert rel_err(hess, torch.func.jacrev(torch.func.jacrev(f))(w1)) < 1e-12, backend


def test_vmap_of_the_ops():
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    w1, w2 = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    ws = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    got = torch.vmap(lambda t: mk.monarch_matmul(t, w1, w2))(x)
    assert rel_err(got, x @ monarch_dense_explicit(w1, w2).T) < 1e-12
    got = torch.vmap(lambda w: mk.monarch_matmul(x[0], w, w2))(ws)
    want = torch.stack([x[0] @ monarch_dense_explicit(w, w2).T for w in ws])
    assert rel_err(got, want) < 1e-12


# ------------------------------------------------------------------------------------------------ D8


def test_resolve_backend_bad_factors():
    """D8: a wrong factor count or a 1-D factor gave an unpacking error or IndexError."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"op 'monarch' takes 2 factors \(w1 \(k, q, p\), w2 \(l, s, r\)\), got 1"):
        mk.resolve_backend("monarch", x, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"op 'blockdiag' takes 1 factor \(w \(k, q, p\)\), got 2"):
        mk.resolve_backend("blockdiag", x, torch.randn(2, 4, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"w must be 3-D \(nblocks, out_block, in_block\), got shape \(8,\)"):
        mk.resolve_backend("blockdiag", x, torch.randn(8))
    with pytest.raises(ValueError, match="w2 must be 3-D"):
        mk.resolve_backend("monarch", x, torch.randn(2, 4, 4), torch.randn(8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_project_rejects_non_finite_weights(bad):
    """D8: project on NaN/Inf weights raised torch's _LinAlgError from inside the SVD."""
    W = torch.randn(8, 8)
    W[2, 5] = bad
    with pytest.raises(ValueError, match="weight has 1 NaN or Inf entries"):
        mk.project(W, 2)


# ------------------------------------------------------------------- in-place ops on the outputs


def _forward_calls(backend):
    torch.manual_seed(3)
    w1, w2, w = torch.randn(4, 6, 5), torch.randn(4, 7, 6), torch.randn(4, 6, 5)
    bias = torch.randn(26)
    return {
        "monarch_linear": ((w1, w2, bias), lambda x, a, b, c: mk.monarch_linear(x, a, b, c, out_features=26,
                                                                                 activation="gelu", backend=backend)),
        "monarch_matmul": ((w1, w2), lambda x, a, b: mk.monarch_matmul(x, a, b, backend=backend)),
        "blockdiag_linear": ((w, bias[:24]), lambda x, a, c: mk.blockdiag_linear(x, a, c, backend=backend)),
        "blockdiag_matmul": ((w,), lambda x, a: mk.blockdiag_matmul(x, a, backend=backend)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["monarch_linear", "monarch_matmul", "blockdiag_linear", "blockdiag_matmul"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
@pytest.mark.parametrize("route", ["eager", "op"])
def test_outputs_take_in_place_ops_with_autograd(backend, name, lead, route):
    """``nn.ReLU(inplace=True)`` after a layer: the output of a recorded call is not a view, so autograd accepts
    the in-place op (on the eager ``autograd.Function`` route and on the custom-op route, which the profiler
    forces) and the gradients equal those of the out-of-place op."""
    factors, call = _forward_calls(backend)[name]
    x = torch.randn(*lead, 20)
    grads = []
    for inplace in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, *factors)]
        ctx = torch.profiler.profile() if route == "op" else contextlib.nullcontext()
        with ctx:
            y = call(*leaves)
            assert y.is_contiguous() and not y._is_view()
            out = F.relu(y, inplace=inplace)
            torch.autograd.backward(out, torch.ones_like(out))
        grads.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
