"""Activation-aware fitting: optimality of the Monarch / block-diagonal fits, input statistics,
monarchify(calibrate=)."""
import copy

import pytest
import torch
from torch import nn

from conftest import rel_err
from helpers import blockdiag_dense, monarch_dense_explicit
from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, monarchify
from monarch_kernels.layers.calibrate import (
    damped,
    fit_blockdiag,
    fit_monarch,
    input_second_moments,
    output_error,
)


def _inputs(n_in, tokens=300):
    """Correlated, anisotropic inputs ``X (tokens, n_in)`` (float64) and their second moment."""
    X = torch.randn(tokens, n_in, dtype=torch.float64) @ torch.randn(n_in, n_in, dtype=torch.float64)
    return X, X.T @ X / tokens


def _damped_loss_and_grads(W, C, w1, w2, damping):
    """The fit's objective tr((M − W) C_δ (M − W)ᵀ) and its gradients, from the explicit-permutation oracle."""
    w1, w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    out_f, in_f = W.shape
    M = monarch_dense_explicit(w1, w2)[:out_f, :in_f]
    Cd = C + damping * C.diagonal().mean() * torch.eye(in_f, dtype=C.dtype)
    E = M - W
    loss = ((E @ Cd) * E).sum()
    return (loss.item(), *torch.autograd.grad(loss, (w1, w2)))


@pytest.mark.parametrize("n_in,n_out,nb", [(12, 20, 4), (30, 22, 4), (4, 16, 4), (16, 4, 4)])
def test_fit_monarch_converges_to_a_stationary_point_and_never_increases(n_in, n_out, nb):
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    _, C = _inputs(n_in)
    losses = []
    for sweeps in (0, 1, 5, 60):
        w1, w2 = fit_monarch(W, C, nb, sweeps=sweeps, damping=0.01)
        loss, g1, g2 = _damped_loss_and_grads(W, C, w1, w2, 0.01)
        losses.append(loss)
        if sweeps:  # block Gauss-Seidel ends on the last w1 block: it is exactly optimal given the rest
            assert g1[-1].norm() < 1e-8 * (W.norm() * C.norm()), sweeps
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:])), losses
    _, g1_0, g2_0 = _damped_loss_and_grads(W, C, *fit_monarch(W, C, nb, sweeps=0, damping=0.01), 0.01)
    scale = g1_0.norm() + g2_0.norm()
    # ALS converges linearly: 60 sweeps reach ~1e-4, (g1.norm(), g2.norm(), scale)
    assert (g1.norm() + g2.norm()) < 2e-3 * scale
    assert w1.shape == MonarchLinear(n_in, n_out, nblocks=nb).w1.shape and w1.dtype == W.dtype


@pytest.mark.parametrize("n_in,n_out,nb", [(16, 24, 4), (12, 12, 3)])
def test_whitened_start_is_optimal_for_block_diagonal_inputs(n_in, n_out, nb):
    """Inputs independent across the input blocks: the whitened projection is already the global optimum."""
    p = n_in // nb
    C = torch.block_diag(*[(lambda A: A @ A.T)(torch.randn(p, p, dtype=torch.float64)) for _ in range(nb)])
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    w1, w2 = fit_monarch(W, C, nb, sweeps=0, damping=1e-3)
    loss, g1, g2 = _damped_loss_and_grads(W, C, w1, w2, 1e-3)
    assert g1.norm() + g2.norm() < 1e-9 * loss
    assert (_damped_loss_and_grads(W, C, *fit_monarch(W, C, nb, sweeps=5, damping=1e-3), 1e-3)[0]
            == pytest.approx(loss, rel=1e-9))


@pytest.mark.parametrize("n_in,n_out,nb", [(24, 40, 4), (30, 22, 4)])
def test_fit_monarch_recovers_monarch_weights_and_beats_projection(n_in, n_out, nb):
    X, C = _inputs(n_in)
    exact = MonarchLinear(n_in, n_out, nblocks=nb, bias=False, dtype=torch.float64).dense_weight().detach()
    w1, w2 = fit_monarch(exact, C, nb, sweeps=2, damping=1e-6)
    assert rel_err(monarch_dense_explicit(w1, w2)[:n_out, :n_in], exact) < 1e-9
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    fitted = MonarchLinear.from_dense(W, nblocks=nb, second_moment=C).dense_weight()
    projected = MonarchLinear.from_dense(W, nblocks=nb).dense_weight()
    assert output_error(fitted, W, C) < 0.9 * output_error(projected, W, C)
    # output_error is ‖(M − W) X‖ / ‖W X‖ on the inputs
    assert output_error(fitted, W, C) == pytest.approx(((X @ (fitted - W).T).norm() / (X @ W.T).norm()).item(),
                                                       rel=1e-9)


@pytest.mark.parametrize("n_in,n_out,nb", [(12, 12, 8), (5, 9, 4), (13, 20, 8)])
def test_fit_monarch_with_whole_padding_blocks_stays_finite(n_in, n_out, nb):
    """Input widths where whole input blocks are padding (ceil(n_in/nb)·(nb − 1) ≥ n_in: e.g. 12 wide in 8 blocks
    of 2 leaves 2 blocks all padding, whose Gram matrix is exactly zero): the fit stays finite, the padding
    slots stay zero, and the calibrated layer is at least as good on the inputs as the plain projection (the
    jitter of an all-zero block once underflowed to a subnormal: NaN weights)."""
    X, C = _inputs(n_in)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    w1, w2 = fit_monarch(W, C, nb)
    assert torch.isfinite(w1).all() and torch.isfinite(w2).all()
    k, q, p = w1.shape
    padded = torch.zeros(k * p, dtype=torch.bool)
    padded[n_in:] = True
    assert padded.view(k, p).all(1).any()  # the case under test: at least one block entirely padding
    assert (w1.reshape(k, q, p).permute(0, 2, 1).reshape(k * p, q)[padded] == 0).all()
    fitted = MonarchLinear.from_dense(W.float(), nblocks=nb, second_moment=C)
    out = fitted(X.float())
    assert torch.isfinite(out).all()
    projected = MonarchLinear.from_dense(W, nblocks=nb).dense_weight()
    assert output_error(fitted.dense_weight().double(), W, C) <= output_error(projected, W, C) * (1 + 1e-4)


@pytest.mark.parametrize("n_in,n_out,nb", [(16, 24, 4), (30, 22, 4), (4, 4, 4)])
def test_fit_blockdiag_is_the_per_block_least_squares_solution(n_in, n_out, nb):
    X, C = _inputs(n_in, tokens=64)
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    damping = 0.05
    w = fit_blockdiag(W, C, nb, damping=damping)
    k, q, p = w.shape
    # oracle: ridge regression per block on the zero-padded inputs, solved with lstsq on stacked rows
    Xp = torch.nn.functional.pad(X, (0, k * p - n_in))
    Y = torch.nn.functional.pad(X @ W.T, (0, k * q - n_out))
    lam = (damping * C.diagonal().mean() * len(X)).sqrt()
    Wp = torch.nn.functional.pad(W, (0, k * p - n_in, 0, k * q - n_out))
    for kk in range(k):
        A = torch.cat([Xp[:, kk * p:(kk + 1) * p], lam * torch.eye(p, dtype=X.dtype)])
        B = torch.cat([Y[:, kk * q:(kk + 1) * q], lam * W.new_zeros(p, q) +
                       lam * Wp[kk * q:(kk + 1) * q, kk * p:(kk + 1) * p].T])
        assert rel_err(w[kk], torch.linalg.lstsq(A, B).solution.T) < 1e-9
    layer = BlockdiagLinear.from_dense(W, None, nb, second_moment=C)  # default damping
    assert rel_err(layer.dense_weight(), blockdiag_dense(fit_blockdiag(W, C, nb))[:n_out, :n_in]) < 1e-12


def test_fit_rejects_bad_input():
    W = torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"second_moment must be an \(6, 6\)"):
        fit_monarch(W, torch.eye(8), 2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_monarch(W, torch.full((6, 6), float("nan")), 2)
    with pytest.raises(ValueError, match="damping must be > 0"):
        fit_monarch(W, torch.eye(6), 2, damping=0.0)
    with pytest.raises(ValueError, match="sweeps must be an int >= 0"):
        fit_monarch(W, torch.eye(6), 2, sweeps=-1)
    with pytest.raises(TypeError, match="floating-point 2-D"):
        fit_monarch(torch.ones(8, 6, dtype=torch.long), torch.eye(6), 2)
    with pytest.raises(ValueError, match="nblocks must be an int in"):
        fit_blockdiag(W, torch.eye(6), 7)
    assert damped(torch.zeros(3, 3), 4, 0.1).diagonal().min() > 0  # zero inputs stay well posed


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(16, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x))) * scale


def test_input_second_moments_match_the_captured_inputs():
    model = TwoLayer().double().train()
    xs = [torch.randn(3, 5, 12, dtype=torch.float64) for _ in range(3)]
    batches = [xs[0], (xs[1],), {"x": xs[2], "scale": 2.0}]  # tensor, tuple and mapping batches
    moments = input_second_moments(model, ["a", "b"], batches)
    X = torch.cat([x.reshape(-1, 12) for x in xs])
    H = torch.relu(model.a(X))
    assert rel_err(moments["a"], X.T @ X / len(X)) < 1e-12
    assert rel_err(moments["b"], H.T @ H / len(H)) < 1e-12
    assert model.training and not model.a._forward_pre_hooks  # mode restored, hooks removed
    with pytest.raises(ValueError, match=r"\['unused'\] received no input"):
        input_second_moments(model, ["a", "unused"], batches)


def test_monarchify_calibrate_fits_real_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).double()
    mix = torch.randn(32, 32, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)
    data = [torch.randn(64, 32, dtype=torch.float64) @ mix for _ in range(4)]
    test = torch.randn(256, 32, dtype=torch.float64) @ mix
    dense_out = model(test)
    projected, calibrated = copy.deepcopy(model), model
    blockdiag = monarchify(copy.deepcopy(model), nblocks=4, layer="blockdiag", calibrate=data)
    assert all(c.error < p.error for c, p in zip(blockdiag.layers,
                                                 monarchify(copy.deepcopy(model), nblocks=4, layer="blockdiag").layers))
    plan_p = monarchify(projected, nblocks=4)
    plan_c = monarchify(calibrated, nblocks=4, calibrate=data)
    assert [r.init for r in plan_c.layers] == ["calibrated", "calibrated"]
    assert all(c.error < p.error for c, p in zip(plan_c.layers, plan_p.layers))
    assert rel_err(calibrated(test), dense_out) < 0.7 * rel_err(projected(test), dense_out)
    with pytest.raises(ValueError, match="needs project=True"):
        monarchify(copy.deepcopy(model), calibrate=data, project=False)


def test_input_second_moments_run_the_model_in_eval_mode():
    """Calibration statistics come from the eval-mode model: dropout off (the moments equal those of the
    deterministic inputs, computed here in float64) and BatchNorm running statistics left untouched; the
    training mode is restored afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 8)).double().train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    stats = (model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone())
    xs = [torch.randn(32, 12, dtype=torch.float64) + 0.5 for _ in range(2)]
    moments = input_second_moments(model, ["3"], xs)
    X = torch.cat(xs)
    H = (model[0](X) - stats[0]) / (stats[1] + model[1].eps).sqrt() * model[1].weight + model[1].bias  # eval BN
    assert rel_err(moments["3"], H.T @ H / len(H)) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(stats, (model[1].running_mean, model[1].running_var,
                                                           model[1].num_batches_tracked)))
    assert model.training and model[2].training
