"""Eager forward calls skip the custom-op dispatch: run the backend directly when nothing tracks them, or
through a plain autograd.Function with the op's formulas when autograd records them; everything that observes
ops (dispatch modes, the profiler, the compiler, functorch) still sees the custom op."""
import contextlib

import torch

import monarch_kernels as mk
from monarch_kernels import ops
from conftest import OpLog, rel_err


def _factors(dtype=torch.float64):
    return torch.randn(4, 8, 6, dtype=dtype), torch.randn(4, 8, 8, dtype=dtype)


def test_route_conditions():
    w1, w2 = _factors()
    x = torch.randn(3, 24, dtype=torch.float64)
    assert ops._route(x, w1, w2, None) == ops.DIRECT
    assert ops._route(x, torch.nn.Parameter(w1, requires_grad=False), w2) == ops.DIRECT  # a frozen parameter
    with torch.no_grad():
        assert ops._route(x.requires_grad_(), w1, w2) == ops.DIRECT
    assert ops._route(x, w1, w2) == ops.FUNCTION  # x requires grad and grad mode is on
    assert ops._route(x.detach(), torch.nn.Parameter(w1)) == ops.FUNCTION
    with OpLog():
        assert ops._route(torch.randn(2, 2)) == ops.OP
    with torch.profiler.profile():
        assert ops._route(torch.randn(2, 2)) == ops.OP
    routes = []
    torch.func.grad(lambda t: routes.append(ops._route(t, w1)) or t.sum())(x.detach())
    assert routes == [ops.OP]  # a functorch transform sees the custom op (through its autograd.Function twin)

    class Sub(torch.Tensor):
        pass

    assert ops._route(x.detach().as_subclass(Sub), w1) == ops.OP


def test_direct_and_custom_op_paths_agree():
    w1, w2 = _factors()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    bias = torch.randn(32, dtype=torch.float64)
    with torch.no_grad():
        direct = mk.monarch_linear(x, w1, w2, bias, activation="gelu")
    with OpLog() as log:  # forces the custom op
        via_op = mk.monarch_linear(x, w1, w2, bias, activation="gelu")
    assert "monarch_kernels.monarch_fwd.default" in log.names
    assert torch.equal(direct, via_op)
    wb = torch.randn(3, 4, 8, dtype=torch.float64)
    xb = torch.randn(7, 24, dtype=torch.float64)
    with OpLog() as log:
        via_op = mk.blockdiag_matmul(xb, wb)
    assert "monarch_kernels.blockdiag_fwd.default" in log.names
    assert torch.equal(mk.blockdiag_matmul(xb, wb), via_op)


def test_tracked_eager_calls_use_the_function_and_match_the_op():
    """Same outputs and gradients (every backend here) on the FUNCTION route as through the custom op, with
    fused activation, bias, leading dims and only some inputs requiring grad."""
    torch.manual_seed(3)
    w1, w2 = _factors()
    wb = torch.randn(3, 4, 8, dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    bias = torch.randn(32, dtype=torch.float64)

    def run(fn, tensors, needs, op_log: bool):
        leaves = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs)]
        with (OpLog() if op_log else contextlib.nullcontext()) as log:
            out = fn(*leaves)
        g = torch.randn_like(out)
        return out, torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g), log, g

    float64 = [b for b, s in mk.available_backends().items()
               if s == "available" and mk.backends.get(b).supports(x.device, x.dtype)]
    assert "torch" in float64
    for backend in float64:
        tol = 0 if backend == "torch" else 1e-12
        for act in ("none", "gelu", "relu"):
            mon = lambda a, b, c, d: mk.monarch_linear(a, b, c, d[:30], out_features=30, activation=act,
                                                       backend=backend)
            bd = lambda *a: mk.blockdiag_linear(*a, activation=act, backend=backend)
            for fn, tensors, grad_fn, op in (
                (mon, (x, w1, w2, bias), "_MonarchFwdEagerBackward", "monarch_fwd"),
                (bd, (x, wb, bias[:12]), "_BlockdiagFwdEagerBackward", "blockdiag_fwd"),
            ):
                for needs in ((True,) * 4, (True, False, False, False), (False, True, True, False)):
                    torch.manual_seed(5)
                    eager, eager_grads, _, _ = run(fn, tensors, needs, False)
                    assert type(eager.grad_fn).__name__ == grad_fn
                    torch.manual_seed(5)
                    via_op, op_grads, log, _ = run(fn, tensors, needs, True)
                    assert f"monarch_kernels.{op}.default" in log.names
                    assert rel_err(eager, via_op) <= tol
                    assert len(eager_grads) == len(op_grads) == sum(needs[:len(tensors)])
                    for a, b in zip(eager_grads, op_grads):
                        assert rel_err(a, b) <= 1e-12, (backend, act, op, needs)


def test_function_route_is_differentiable_twice():
    torch.manual_seed(4)
    w1, w2 = (t.requires_grad_() for t in _factors())
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: mk.monarch_linear(*a, activation="gelu", backend="torch")
    assert torch.autograd.gradgradcheck(fn, (x, w1, w2, bias))
    assert torch.autograd.gradcheck(fn, (x, w1, w2, bias))
    wb = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    fb = lambda a, b: mk.blockdiag_linear(a, b, activation="gelu", backend="torch")
    assert torch.autograd.gradgradcheck(fb, (x, wb))


def test_torch_backend_keeps_the_intermediate_only_on_the_eager_route():
    """The reference saves the stage-1 intermediate (not the pre-activation) for its first-order backward on the
    FUNCTION route; the custom op (compiled graphs) saves only its inputs."""
    w1, w2 = (t.requires_grad_() for t in _factors())
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mk.monarch_linear(x, w1, w2, activation="gelu", backend="torch")
    assert sorted(saved) == sorted([x.numel(), w1.numel(), w2.numel(), 7 * 32])  # z: (T, k·q)
    saved.clear()
    with OpLog(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mk.monarch_linear(x, w1, w2, activation="gelu", backend="torch")
    assert sorted(saved) == sorted([x.numel(), w1.numel(), w2.numel()])


def test_frozen_weights_take_the_pre_activation_from_the_saved_intermediate():
    """Only dx wanted (frozen weights) with an activation: the reference's backward gets the pre-activation from
    its saved z through stage 2 alone (3 bmm: stage 2, dz, dx) instead of re-running the whole forward (4), and
    computes no weight gradient; the gradient equals the one through the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountBmm(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket is torch.ops.aten.bmm
            return func(*args, **(kwargs or {}))

    torch.manual_seed(6)
    w1, w2 = _factors()
    bias = torch.randn(32, dtype=torch.float64)
    for act, want in (("gelu", 3), ("none", 2)):
        x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
        out = mk.monarch_linear(x, w1, w2, bias, activation=act, backend="torch")
        g = torch.randn_like(out)
        with CountBmm() as count:
            (dx,) = torch.autograd.grad(out, [x], g)
        assert count.n == want, (act, count.n)
        with OpLog():
            ref_out = mk.monarch_linear(x, w1, w2, bias, activation=act, backend="torch")
        assert rel_err(dx, torch.autograd.grad(ref_out, [x], g)[0]) <= 1e-12
