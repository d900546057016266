"""``monarch_kernels::monarch_bwd_epilogue``, the first-order backward of ``act(M x + bias)`` that autograd runs when a
fused activation's weight gradients are wanted: against the float64 reference on every backend (the C++ one pass,
the reference, and the composed fallback of backends without one), its checks, opcheck, its refusal to be
differentiated, and a compiled training step that uses it."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import activations, ops
from monarch_kernels import reference as ref
from conftest import rel_err

OP = torch.ops.monarch_kernels.monarch_bwd_epilogue
BACKENDS = [b for b, s in mk.available_backends().items()
            if s == "available" and mk.backends.get(b).supports(torch.device("cpu"), torch.float32)]


def expected(x, g, w1, w2, bias, n_in, act):
    d = [None if t is None else t.double().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.double()
         for t in (x, g, w1, w2, bias)]
    d[2], d[3] = w1.double(), w2.double()
    gp = activations.backward(act, ref.monarch_fwd(d[0], d[2], d[3], d[4], g.shape[-1], "none"), d[1])
    dx, dw1, dw2 = ref.monarch_bwd(d[0], gp, d[2], d[3], n_in)
    return dx.reshape(*x.shape[:-1], n_in), dw1, dw2, gp.sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_tanh", "none"])
def test_matches_float64(backend, act):
    torch.manual_seed(7)
    w1, w2 = torch.randn(4, 8, 6) / 3, torch.randn(4, 7, 8) / 3  # k·q = l·r = 32, n_out ≤ l·s = 28
    x, g = torch.randn(2, 9, 23), torch.randn(2, 9, 26)  # leading dims, n_in < k·p, n_out < l·s
    for bias in (torch.randn(26), None):
        got = OP(x, g, w1, w2, bias, 23, act, backend)
        want = expected(x, g, w1, w2, bias, 23, act)
        for a, e, name in zip(got, want, ("dx", "dw1", "dw2", "db")):
            assert a.shape == e.shape and a.dtype == torch.float32, name
            if name == "db" and bias is None:
                assert torch.equal(a, torch.zeros(26)), "db is zeros without a bias"
            else:
                assert rel_err(a, e) < 2e-5, (backend, act, name)


def test_bad_arguments_name_the_argument():
    x, g, w1, w2 = torch.randn(3, 24), torch.randn(3, 32), torch.randn(4, 8, 6), torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="bias"):
        OP(x, g, w1, w2, torch.randn(31), 24, "gelu", "torch")
    with pytest.raises(ValueError, match="activation"):
        OP(x, g, w1, w2, None, 24, "tanh", "torch")
    with pytest.raises(ValueError, match="n_in"):
        OP(x, g, w1, w2, None, 25, "gelu", "torch")
    with pytest.raises(ValueError, match="backend"):
        OP(x, g, w1, w2, None, 24, "gelu", "auto")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # triton: interpreter too slow for opcheck
def test_opcheck(backend):
    for lead, bias, act in (((5,), torch.randn(30), "gelu"), ((2, 3), None, "relu"),
                            ((0,), torch.randn(30), "gelu_tanh")):
        args = (torch.randn(*lead, 23), torch.randn(*lead, 30), torch.randn(4, 8, 6), torch.randn(4, 8, 8), bias, 23,
                act, backend)
        torch.library.opcheck(OP.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_refuses_to_be_differentiated():
    x = torch.randn(3, 24, requires_grad=True)
    out = OP(x, torch.randn(3, 32), torch.randn(4, 8, 6), torch.randn(4, 8, 8), None, 24, "gelu", "torch")
    with pytest.raises(RuntimeError, match="not differentiable"):
        out[0].sum().backward()


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_compiled_training_step_with_fused_activation(backend):
    """torch.compile traces the first-order backward through the epilogue op (its fake) and gets eager's gradients."""
    torch.manual_seed(3)
    w1 = torch.randn(4, 8, 6, requires_grad=True)
    w2 = torch.randn(4, 8, 8, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    x = torch.randn(20, 24, requires_grad=True)

    def step(x, w1, w2, bias):
        return mk.monarch_linear(x, w1, w2, bias, activation="gelu", backend=backend).square().sum()

    eager = torch.autograd.grad(step(x, w1, w2, bias), (x, w1, w2, bias))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w1, w2, bias), (x, w1, w2, bias))
    for a, e in zip(got, eager):
        assert rel_err(a, e) < 1e-5


def test_eager_path_without_the_weight_gradients_keeps_the_plain_formula():
    """Frozen weights: dx alone, through monarch_bwd_input after the pre-activation (no weight gradients computed)."""
    w1, w2 = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 8, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    for backend in [b for b in ("torch", "cpu") if b in BACKENDS]:
        out = mk.monarch_linear(x, w1, w2, activation="relu", backend=backend)
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert rel_err(dx, expected(x.detach(), torch.ones(5, 32, dtype=torch.float64), w1, w2, None, 24,
                                    "relu")[0]) < 1e-12
    assert ops._monarch_bwd_epilogue in ops._IMPLS


@pytest.mark.skipif("triton" not in BACKENDS or mk.available_backends().get("cpu") != "available",
                    reason="needs the Triton interpreter and the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_extension_hands_a_kept_intermediate_to_the_triton_backward(dtype, act):
    """The intermediate a resident CUDA forward keeps (``ext.Primitives.monarch_fwd_saving``: row-major, stage 2's
    column order ``ll·r + rr``, unlike Triton's own token-major one) reaches Triton's backward kernels through the
    extension's ``monarch_bwd_epilogue``: every gradient against float64, with and without the weight gradients
    (an activation's pre-activation is stage 2 of ``z``). Run here on the interpreter with ``z`` from the
    reference; on a GPU ``tests/monarch_kernels/test_cuda_ext.py`` runs the whole step."""
    from monarch_kernels.ext import Primitives

    gen = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(8, 8, 8, generator=gen) / 3, torch.randn(8, 8, 8, generator=gen) / 3  # 64 -> 64, c = 1
    x, g, bias = torch.randn(40, 64, generator=gen), torch.randn(40, 64, generator=gen), torch.randn(64, generator=gen)
    z = ref._stage1(x.double(), w1.double(), 8, 8).permute(1, 0, 2).reshape(40, 64)
    cast = [t.to(dtype) for t in (x, g, w1, w2, bias, z)]
    want = expected(x, g, w1, w2, bias, 64, act)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for want_dx, want_dw in ((True, True), (False, True), (True, False)):
        got = Primitives.monarch_bwd_epilogue(*cast[:5], 64, act, want_dx, cast[5].contiguous(), want_dw)
        for a, e, name, wanted in zip(got, want, ("dx", "dw1", "dw2", "db"), (want_dx, want_dw, want_dw, True)):
            if not wanted:
                assert a is None, name
                continue
            assert a.dtype == dtype and rel_err(a, e) < tol, (name, want_dx, want_dw)
    xc, _, w1c, w2c, bc, _ = cast
    out, kept, pre = Primitives.monarch_fwd_saving(xc, w1c, w2c, bc, 64, act)  # CPU: the plain forward, no z
    assert kept is None and pre is None
    assert rel_err(out, ref.monarch_fwd(x.double(), w1.double(), w2.double(), bias.double(), 64, act)) < tol
