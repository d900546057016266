"""GNP (methods.gnp): the identities that define the update, BN handling, and the quick end-to-end run."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
from recipe_runs import quick_run
from methods.data import symmetric_label_noise
from methods.gnp import GNP, gnp_gradient
from methods.models import MLP


def _mlp_problem(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = MLP(12, 16, 4, depth=2, layer="monarch", nblocks=4, activation=nn.Tanh).to(dtype)
    x = torch.randn(32, 12, dtype=dtype)
    y = torch.randint(0, 4, (32,))
    return model, x, y


def _closure(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _grad(model, x, y):
    params = list(model.parameters())
    return torch.autograd.grad(F.cross_entropy(model(x), y), params)


def test_alpha0_is_the_base_optimizer_step():
    model, x, y = _mlp_problem()
    twin = copy.deepcopy(model)
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), r=0.05, alpha=0.0)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(_closure(model, x, y))
        ref.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.last_grad_norm > 0


def test_alpha1_is_sam():
    model, x, y = _mlp_problem()
    rho = 0.1
    params = list(model.parameters())
    g1 = _grad(model, x, y)
    n = math.sqrt(sum(float((g ** 2).sum()) for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(g, alpha=rho / n)
    sam = _grad(model, x, y)
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.sub_(g, alpha=rho / n)
    before = [p.detach().clone() for p in params]
    got = gnp_gradient(params, _closure(model, x, y), r=rho, alpha=1.0)
    for a, b, p, p0 in zip(got, sam, params, before):
        assert rel_err(a, b) < 1e-10
        assert torch.equal(p, p0)  # parameters restored exactly
    # and SAM is not the plain gradient (so the comparison above can fail)
    assert max(rel_err(a, b) for a, b in zip(got, g1)) > 1e-3


@pytest.mark.parametrize("alpha,r", [(0.8, 0.1), (0.3, 1.7), (1.0, 0.5)])
def test_quadratic_update_is_exact(alpha, r):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(9, 9, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(9, dtype=torch.float64)
    b = torch.randn(9, generator=g, dtype=torch.float64)
    theta = [nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)),
             nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))]

    def closure():
        t = torch.cat(theta)
        loss = 0.5 * t @ a @ t + b @ t
        loss.backward()
        return loss

    t = torch.cat([p.detach() for p in theta])
    grad = a @ t + b
    v = grad / grad.norm()
    expected = grad + alpha * r * (a @ v)
    got = torch.cat(gnp_gradient(theta, closure, r=r, alpha=alpha))
    assert rel_err(got, expected) < 1e-12
    # the official code's default (normalised first term) differs from the paper's formula
    off = torch.cat(gnp_gradient(theta, closure, r=r, alpha=alpha, normalize_first_term=True))
    assert rel_err(off, (1 - alpha) * v + alpha * (a @ (t + r * v) + b)) < 1e-12
    if alpha < 1:
        assert rel_err(off, expected) > 1e-2


def _quadratic_problem(seed=1, n=9):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    theta = [nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)),
             nn.Parameter(torch.randn(n - 4, generator=g, dtype=torch.float64))]

    def closure():
        t = torch.cat(theta)
        loss = 0.5 * t @ a @ t + b @ t
        loss.backward()
        return loss
    return a, b, theta, closure


def test_edge_alphas_on_quadratic():
    """α above 1 extrapolates (``g = ∇L + α·r·A·v``, not SAM's ascent-point gradient), and α = 0 with the
    official normalised first term gives ``∇L/‖∇L‖`` (not the raw gradient)."""
    a, b, theta, closure = _quadratic_problem()
    t = torch.cat([p.detach() for p in theta])
    grad = a @ t + b
    v = grad / grad.norm()
    r = 0.3
    got = torch.cat(gnp_gradient(theta, closure, r=r, alpha=1.5))
    assert rel_err(got, grad + 1.5 * r * (a @ v)) < 1e-12
    assert rel_err(got, a @ (t + r * v) + b) > 1e-2  # differs from SAM (α = 1)
    got0 = torch.cat(gnp_gradient(theta, closure, r=r, alpha=0.0, normalize_first_term=True))
    assert rel_err(got0, v) < 1e-12
    assert rel_err(torch.cat(gnp_gradient(theta, closure, r=r, alpha=0.0)), grad) < 1e-12


def test_matches_double_backprop_of_gradient_norm_penalty():
    model, x, y = _mlp_problem(seed=1)
    params = list(model.parameters())
    alpha = 0.8

    def autograd_penalty(lam):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gnorm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss + lam * gnorm, params)])

    base = torch.cat([g.reshape(-1) for g in _grad(model, x, y)])
    errs = {}
    for r in (1e-3, 1e-1, 1.0):
        exact = autograd_penalty(alpha * r)
        got = torch.cat([g.reshape(-1) for g in gnp_gradient(params, _closure(model, x, y), r=r, alpha=alpha)])
        cos = F.cosine_similarity(got, exact, dim=0)
        # the penalty part alone (λ·H∇L/‖∇L‖) — the full gradient would be dominated by ∇L
        cos_pen = F.cosine_similarity(got - base, exact - base, dim=0)
        errs[r] = rel_err(got - base, exact - base)
        if r == 1e-3:
            assert cos > 0.99 and cos_pen > 0.99
    assert errs[1e-3] < 1e-2
    assert errs[1e-3] < errs[1e-1] < errs[1.0]  # finite-difference error grows with r


def test_batchnorm_running_stats_from_unperturbed_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    plain = copy.deepcopy(model)
    plain.train()
    with torch.no_grad():
        plain(x)  # one unperturbed train-mode pass
    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.0), r=0.5, alpha=0.8, model=model)
    opt.step(_closure(model, x, y))
    bn, ref = model[1], plain[1]
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    # without model= the perturbed pass also moves the statistics (so the check above can fail)
    other = copy.deepcopy(plain)
    other[1].reset_running_stats()
    GNP(torch.optim.SGD(other.parameters(), lr=0.0), r=0.5, alpha=0.8).step(_closure(other, x, y))
    assert int(other[1].num_batches_tracked) == 2


def test_scheduler_state_and_bad_input():
    model, x, y = _mlp_problem()
    base = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = GNP(base, r=0.05, alpha=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, x, y))
    sched.step()
    assert base.param_groups[0]["lr"] == 0.5  # the schedule acts on the base optimiser
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.5
    with pytest.raises(ValueError, match="r must be"):
        GNP(base, r=0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        GNP(base, r=0.1, alpha=-1)
    with pytest.raises(TypeError, match="base_optimizer"):
        GNP(model.parameters(), r=0.1)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rate"):
        symmetric_label_noise(y, 1.5, 4, torch.Generator())


def test_symmetric_label_noise_flips_to_other_classes():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    noisy = symmetric_label_noise(y, 0.3, 10, torch.Generator().manual_seed(1))
    assert abs(float((noisy != y).float().mean()) - 0.3) < 0.015
    assert noisy.min() >= 0 and noisy.max() < 10


def test_quick_run(tmp_path):
    m, cfg = quick_run("gnp", tmp_path)
    s = m["summary"]
    for name in ("sgd", "sam", "gnp"):
        assert len(m["per_seed"][name][0]["curve"]) == cfg["config"]["epochs"]
        assert math.isfinite(s[name]["grad_norm"]["mean"]) and s[name]["grad_norm"]["mean"] > 0
        assert math.isfinite(s[name]["hessian_trace"]["mean"]) and s[name]["test_accuracy"]["n"] == 1
        assert s[name]["test_accuracy"]["mean"] > 0.25  # learns from 30%-noisy labels (chance: 0.1)
        assert s[name]["test_accuracy"]["std"] is None  # one seed: no spread is claimed
    # the effect's direction even at this budget: SAM and GNP end flatter than SGD
    assert s["sam"]["hessian_lambda_max"]["mean"] < s["sgd"]["hessian_lambda_max"]["mean"]
    assert s["gnp"]["hessian_lambda_max"]["mean"] < s["sgd"]["hessian_lambda_max"]["mean"]
    assert m["paired"]["gnp_minus_sgd"]["test_accuracy"]["mean"] == pytest.approx(
        s["gnp"]["test_accuracy"]["mean"] - s["sgd"]["test_accuracy"]["mean"])
