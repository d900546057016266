"""PoF (methods.pof): frozen classifier, line search on a quadratic, perturbation, Hessian trace, quick run."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from recipe_runs import quick_run
from methods import hessian
from methods.pof import PoF, FeatureClassifier, classifier_hessian_trace, classifier_line_search


def _mse(logits, targets):
    return 0.5 * ((logits - targets) ** 2).sum(-1).mean()


def _model(seed=0):
    torch.manual_seed(seed)
    return FeatureClassifier(16, 16, 4, depth=2, nblocks=4)


def test_classifier_bit_identical_and_extractor_moves():
    model = _model()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    w0 = [p.detach().clone() for p in model.classifier.parameters()]
    e0 = [p.detach().clone() for p in model.extractor.parameters()]
    assert any(type(m).__name__ == "MonarchLinear" for m in model.extractor.modules())
    opt = torch.optim.SGD(model.extractor.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    pof = PoF(model.extractor, model.classifier, opt, generator=torch.Generator().manual_seed(0))
    for i in range(5):
        info = pof.step(x[:16], y[:16], x, y)
        assert 0 <= info["gamma"] <= 2 and info["eta_star"] <= info["eta_max"] and math.isfinite(info["loss"])
    for a, b in zip(w0, model.classifier.parameters()):
        assert torch.equal(a, b)
        assert b.grad is None  # never even differentiated
    assert any(not torch.equal(a, b) for a, b in zip(e0, model.extractor.parameters()))


def test_official_release_flag_never_steps_the_extractor():
    model = _model(1)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    e0 = [p.detach().clone() for p in model.extractor.parameters()]
    opt = torch.optim.SGD(model.extractor.parameters(), lr=0.1)
    pof = PoF(model.extractor, model.classifier, opt, official_release=True)
    pof.step(x, y, x, y)
    assert all(torch.equal(a, b) for a, b in zip(e0, model.extractor.parameters()))
    assert int(model.extractor[1].num_batches_tracked) == 2  # only BN statistics moved (weak batch + batch)


@pytest.mark.parametrize("seed", range(6))
def test_grid_step_near_analytic_minimiser_on_quadratic(seed):
    g = torch.Generator().manual_seed(seed)
    n, d, c = 40, 6, 3
    feats = torch.randn(n, d, generator=g, dtype=torch.float64) * (0.2 + seed)
    targets = torch.randn(n, c, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.01
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.01
    ls = classifier_line_search(feats, targets, w, b, loss_fn=_mse)
    # analytic minimiser along g: η_a = ‖g‖² / gᵀHg (H by exact HVPs)
    wp, bp = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    gvec = [ls.grad_weight, ls.grad_bias]
    hg = hessian.hvp(lambda: _mse(F.linear(feats, wp, bp), targets), [wp, bp], gvec)
    eta_a = float(hessian.dot(gvec, gvec) / hessian.dot(gvec, hg))
    assert abs(ls.eta_star - eta_a) <= ls.eta_max / 16
    assert ls.grid.shape == (16,) and ls.grid[-1] == ls.eta_max
    if ls.eta_max < 100:  # bracket: η_max is past the opposite bank 2η_a, η_max/2 was not
        assert 2 * eta_a < ls.eta_max <= 4 * eta_a or ls.eta_max == 1.0
    # a wrong direction (ascent) or a wrong grid would miss the minimiser
    assert float(ls.grid_losses.min()) < ls.loss0


def test_perturbation_is_gamma_eta_star_along_minus_g():
    model = _model(2)
    x, y = torch.randn(48, 16), torch.randint(0, 4, (48,))
    pof = PoF(model.extractor, model.classifier, torch.optim.SGD(model.extractor.parameters(), lr=0.0),
              generator=torch.Generator().manual_seed(5))
    state = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    w_t, b_t, info = pof.perturbed_classifier(x, y)
    model.extractor.load_state_dict(state)
    model.extractor.train()
    with torch.no_grad():
        ls = classifier_line_search(model.extractor(x), y, model.classifier.weight, model.classifier.bias)
    gamma = float(torch.rand((), generator=torch.Generator().manual_seed(5))) * 2.0
    assert info["gamma"] == pytest.approx(gamma)
    assert info["eta_star"] == ls.eta_star
    assert rel_err(w_t, model.classifier.weight - gamma * ls.eta_star * ls.grad_weight) < 1e-6
    assert rel_err(b_t, model.classifier.bias - gamma * ls.eta_star * ls.grad_bias) < 1e-6


def test_step_searches_on_the_weak_batch_with_gamma_max():
    """``step(x, y, weak_x, weak_y)``: the line search runs on the *weak* batch, ``γ ~ U(0, gamma_max)`` for a
    non-default ``gamma_max``, ``perturb_norm = ‖(W̃, b̃) − (W, b)‖`` and the loss is that of the training batch
    under the perturbed classifier."""
    model = _model(3)
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    weak_x, weak_y = 3.0 * torch.randn(48, 16, generator=gen) + 1.0, torch.randint(0, 4, (48,), generator=gen)
    pof = PoF(model.extractor, model.classifier, torch.optim.SGD(model.extractor.parameters(), lr=0.0),
              gamma_max=0.5, generator=torch.Generator().manual_seed(9))
    state = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    model.extractor.train()
    with torch.no_grad():
        ls = classifier_line_search(model.extractor(weak_x), weak_y, model.classifier.weight, model.classifier.bias)
        other = classifier_line_search(model.extractor(x), y, model.classifier.weight, model.classifier.bias)
    model.extractor.load_state_dict(state)
    gamma = float(torch.rand((), generator=torch.Generator().manual_seed(9))) * 0.5
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    w_t, b_t = w - gamma * ls.eta_star * ls.grad_weight, b - gamma * ls.eta_star * ls.grad_bias
    info = pof.step(x, y, weak_x, weak_y)
    assert info["gamma"] == pytest.approx(gamma) and info["eta_star"] == ls.eta_star
    assert not torch.allclose(other.grad_weight, ls.grad_weight)  # the training batch would give another g
    assert info["perturb_norm"] == pytest.approx(float(torch.cat([(w_t - w).reshape(-1), b_t - b]).norm()), rel=1e-5)
    model.extractor.load_state_dict(state)
    model.extractor.train()
    with torch.no_grad():
        expected = F.cross_entropy(F.linear(model.extractor(x), w_t, b_t), y)
    assert info["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_classifier_hessian_trace_closed_form():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=g)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    dense = hessian.HessianOperator(lambda: F.cross_entropy(F.linear(feats, w, b), y), [w, b]).dense()
    assert classifier_hessian_trace(feats, w, b) == pytest.approx(float(torch.trace(dense)), rel=1e-10)
    dense_nb = hessian.HessianOperator(lambda: F.cross_entropy(F.linear(feats, w), y), [w]).dense()
    assert classifier_hessian_trace(feats, w) == pytest.approx(float(torch.trace(dense_nb)), rel=1e-10)


def test_bad_input():
    model = _model()
    opt = torch.optim.SGD(model.extractor.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="classifier"):
        PoF(model.extractor, model.extractor, opt)
    with pytest.raises(ValueError, match="must not contain the classifier"):
        PoF(model.extractor, model.classifier, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer"):
        PoF(model.extractor, model.classifier, None)
    with pytest.raises(ValueError, match="features must be a \\(N, D\\)"):
        classifier_line_search(torch.randn(3), torch.zeros(3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="weight must be a \\(C, D=4\\)"):
        classifier_line_search(torch.randn(3, 4), torch.zeros(3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="num_partition"):
        classifier_line_search(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(2, 4), num_partition=0)


def test_quick_run(tmp_path):
    m, cfg = quick_run("pof", tmp_path)
    assert m["arms"] == ["pretrained", "sgd", "sgd_frozen_clf", "pof_wb256", "pof_wb64"]
    for name in m["arms"]:
        s = m["summary"][name]
        assert s["test_accuracy"]["mean"] > 0.8  # the pretrained Monarch extractor learned digits (chance 0.1)
        assert math.isfinite(s["test_nll"]["mean"]) and s["test_nll"]["mean"] > 0
        assert s["hessian_trace"]["mean"] > 0 and s["hessian_lambda_max"]["mean"] > 0
        assert s["hessian_lambda_max"]["mean"] <= s["hessian_trace"]["mean"] + 1e-6
    assert m["classifier_bit_identical"] is True and m["pof_diagnostics"]["pof_wb256"]["mean_perturb_norm"]["mean"] > 0
    d = m["paired"]["pof_wb256_minus_sgd"]["hessian_trace"]
    assert d["mean"] == pytest.approx(m["summary"]["pof_wb256"]["hessian_trace"]["mean"]
                                      - m["summary"]["sgd"]["hessian_trace"]["mean"]) and d["n"] == 1
