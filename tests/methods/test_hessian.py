"""Curvature tools (methods.hessian): exact HVPs, power iteration, Hutchinson's trace."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from methods import hessian
from methods.models import MLP


def _quadratic(n=12, seed=0, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 5.0, n, dtype=torch.float64) if spectrum is None else spectrum
    a = q @ torch.diag(lam) @ q.T
    a = (a + a.T) / 2
    theta = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(n - 5, generator=g, dtype=torch.float64, requires_grad=True)]
    loss_fn = lambda: 0.5 * torch.cat(theta) @ a @ torch.cat(theta)  # noqa: E731
    return a, theta, loss_fn


def test_hvp_matches_autograd_hessian_on_monarch_mlp():
    torch.manual_seed(0)
    model = MLP(8, 8, 3, depth=2, layer="monarch", nblocks=2, activation=torch.nn.Tanh).double()
    xb = torch.randn(20, 8, dtype=torch.float64)
    yb = torch.randint(0, 3, (20,))
    names, params = zip(*model.named_parameters())
    assert any(n.endswith("w1") for n in names)  # the Monarch factors are in the Hessian's space

    def f(flat):
        new = dict(zip(names, hessian.unflatten(flat, params)))
        return F.cross_entropy(torch.func.functional_call(model, new, (xb,)), yb)

    full = torch.autograd.functional.hessian(f, hessian.flatten([p.detach() for p in params]))
    loss = lambda: F.cross_entropy(model(xb), yb)  # noqa: E731
    op = hessian.HessianOperator(loss, params)
    assert rel_err(op.dense(), full) < 1e-10
    v = [torch.randn_like(p) for p in params]
    assert rel_err(hessian.flatten(hessian.hvp(loss, params, v)), full @ hessian.flatten(v)) < 1e-10


def test_power_iteration_finds_top_eigenvalue():
    a, theta, loss_fn = _quadratic()
    lam, v = hessian.top_eigenvalue(loss_fn, theta, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(1))
    evals, evecs = torch.linalg.eigh(a)
    assert lam == pytest.approx(float(evals[-1]), rel=1e-8)
    assert abs(float(hessian.flatten(v) @ evecs[:, -1])) == pytest.approx(1.0, abs=1e-5)
    # a wrong operator (e.g. the gradient instead of H v) would not give the eigenvalue of a shifted A
    _, theta2, loss2 = _quadratic(spectrum=torch.linspace(0.5, 2.0, 12, dtype=torch.float64))
    lam2, _ = hessian.top_eigenvalue(loss2, theta2, iters=2000, tol=1e-13)
    assert lam2 == pytest.approx(2.0, rel=1e-6)


def test_power_iteration_estimates_are_rayleigh_quotients_of_unit_iterates():
    """With one product the estimate is ``vᵀHv`` of the *normalised* Gaussian start (drawn like ``torch.randn`` per
    parameter from the generator); with two it is the Rayleigh quotient of ``Hv/‖Hv‖``."""
    a, theta, loss_fn = _quadratic()
    g = torch.Generator().manual_seed(4)
    v = torch.cat([torch.randn(p.shape, generator=g, dtype=p.dtype) for p in theta])
    v = v / v.norm()
    lam1, _ = hessian.top_eigenvalue(loss_fn, theta, iters=1, generator=torch.Generator().manual_seed(4))
    assert lam1 == pytest.approx(float(v @ a @ v), rel=1e-10)
    w = a @ v / (a @ v).norm()
    lam2, _ = hessian.top_eigenvalue(loss_fn, theta, iters=2, tol=0.0, generator=torch.Generator().manual_seed(4))
    assert lam2 == pytest.approx(float(w @ a @ w), rel=1e-10)


def test_hutchinson_exact_on_diagonal_and_unbiased_on_dense():
    d = torch.linspace(-2.0, 7.0, 10, dtype=torch.float64)
    th = [torch.randn(10, dtype=torch.float64, requires_grad=True)]
    est, se = hessian.hutchinson_trace(lambda: 0.5 * (d * th[0] ** 2).sum(), th, samples=3)
    assert est == pytest.approx(float(d.sum()), rel=1e-12) and se == pytest.approx(0.0, abs=1e-9)
    a, theta, loss_fn = _quadratic()
    est, se = hessian.hutchinson_trace(loss_fn, theta, samples=400, generator=torch.Generator().manual_seed(3))
    assert abs(est - float(torch.trace(a))) < 4 * se + 1e-9


def test_gradient_norm_and_bad_input():
    a, theta, loss_fn = _quadratic()
    expected = float((a @ torch.cat(theta).detach()).norm())
    assert hessian.gradient_norm(loss_fn, theta) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(TypeError, match="params"):
        hessian.gradient_norm(loss_fn, theta[0])
    with pytest.raises(ValueError, match="require grad"):
        hessian.gradient_norm(loss_fn, [torch.zeros(3)])
    with pytest.raises(ValueError, match="v\\[0\\] must have shape"):
        hessian.hvp(loss_fn, theta, [torch.zeros(3), torch.zeros(7)])
    with pytest.raises(ValueError, match="0-d"):
        hessian.gradient_norm(lambda: torch.cat(theta), theta)
    with pytest.raises(ValueError, match="iters"):
        hessian.top_eigenvalue(loss_fn, theta, iters=0)


def test_power_iteration_keeps_the_sign_of_a_negative_dominant_eigenvalue():
    """The dominant eigenvalue is the largest in |λ| *with its sign*: on a saddle whose most curved direction is
    negative (spectrum −3 … 1) the Rayleigh quotient must give −3, not ‖Hv‖ = +3."""
    spectrum = torch.linspace(-3.0, 1.0, 12, dtype=torch.float64)
    _, theta, loss_fn = _quadratic(seed=4, spectrum=spectrum)
    lam, _ = hessian.top_eigenvalue(loss_fn, theta, iters=3000, tol=1e-13, generator=torch.Generator().manual_seed(2))
    assert lam == pytest.approx(-3.0, rel=1e-6)


def test_hutchinson_standard_error_matches_the_rademacher_variance():
    """For Rademacher z, Var(zᵀAz) = 2 Σ_{i≠j} A_ij² (closed form), so the reported standard error of the mean of
    n probes is ≈ sqrt(2 Σ_{i≠j} A_ij² / n); the spread of the probes alone (no 1/√n) would be √n times larger."""
    a, theta, loss_fn = _quadratic(seed=5)
    n = 400
    _, se = hessian.hutchinson_trace(loss_fn, theta, samples=n, generator=torch.Generator().manual_seed(6))
    off = a - torch.diag(torch.diagonal(a))
    expected = float(torch.sqrt(2 * (off ** 2).sum() / n))
    assert se == pytest.approx(expected, rel=0.25)
