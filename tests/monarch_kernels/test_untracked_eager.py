"""Forward calls that nothing tracks run the backend directly; everything that observes ops still sees the
custom op (dispatch modes, the profiler, autograd)."""
import torch

import monarch_kernels as mk
from monarch_kernels import ops
from conftest import OpLog, rel_err


def _factors(dtype=torch.float64):
    return torch.randn(4, 8, 6, dtype=dtype), torch.randn(4, 8, 8, dtype=dtype)


def test_untracked_eager_conditions():
    w1, w2 = _factors()
    x = torch.randn(3, 24, dtype=torch.float64)
    assert ops._untracked_eager(x, w1, w2, None)
    assert ops._untracked_eager(x, torch.nn.Parameter(w1, requires_grad=False), w2)  # a frozen parameter
    with torch.no_grad():
        assert ops._untracked_eager(x.requires_grad_(), w1, w2)
    assert not ops._untracked_eager(x, w1, w2)  # x requires grad and grad mode is on
    with OpLog():
        assert not ops._untracked_eager(torch.randn(2, 2))
    with torch.profiler.profile():
        assert not ops._untracked_eager(torch.randn(2, 2))


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


def test_autograd_still_goes_through_the_op():
    w1, w2 = _factors()
    w1.requires_grad_()
    x = torch.randn(3, 24, dtype=torch.float64)
    out = mk.monarch_matmul(x, w1, w2)
    assert out.grad_fn is not None
    out.sum().backward()
    dense = mk.monarch_to_dense(w1.detach(), w2)
    assert rel_err(out.detach(), x @ dense.T) < 1e-12
    assert w1.grad is not None and w1.grad.abs().sum() > 0
