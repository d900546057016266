"""Ensemble distillation recipe: BatchEnsemble folding identities, losses, the diversifying perturbation."""
import copy
import math

import pytest
import torch
from torch import nn

from monarch_kernels.layers import BlockdiagLinear, MonarchLinear
from methods.ensemble_distill import (
    BatchEnsemble,
    batch_ensemble_,
    diversifying_perturbation,
    ensemble_kd_loss,
    fast_weight_decay,
    fold_batch_ensembles_,
    kl_to_ensemble,
    member_kd_loss,
    member_logits,
    scale_fast_grads_,
    tile_members,
)
from methods.train import soft_cross_entropy
from recipe_runs import quick_run

M = 3


def _layers():
    torch.manual_seed(0)
    d = torch.float64
    return {
        "linear": (nn.Linear(10, 7).to(d), (5, 10)),
        "monarch": (MonarchLinear(12, 20, nblocks=4).to(d), (5, 12)),
        "monarch_ragged": (MonarchLinear(10, 7, nblocks=3).to(d), (5, 10)),
        "monarch_wide_in": (MonarchLinear(24, 8, nblocks=4).to(d), (2, 3, 24)),
        "blockdiag": (BlockdiagLinear(10, 9, nblocks=3).to(d), (5, 10)),
        "blockdiag_shuffle": (BlockdiagLinear(12, 8, nblocks=4, shuffle=True).to(d), (5, 12)),
        "conv": (nn.Conv2d(4, 6, 3, padding=1).to(d), (5, 4, 6, 6)),
        "conv_groups_stride": (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(d), (5, 4, 7, 7)),
    }


def _randomise(be: BatchEnsemble, gen):
    with torch.no_grad():
        be.r.copy_(1 + 0.5 * torch.randn(be.r.shape, generator=gen, dtype=be.r.dtype))
        be.s.copy_(1 + 0.5 * torch.randn(be.s.shape, generator=gen, dtype=be.s.dtype))


def _member_reference(layer, r, s, x, is_conv):
    """Direct formula y = s ∘ (W (r ∘ x) + b) with the untouched layer."""
    shape = (1, -1, 1, 1) if is_conv else (1,) * (x.dim() - 1) + (-1,)
    return s.view(shape) * layer(x * r.view(shape))  # layer(.) = W(.) + b


@pytest.mark.parametrize("name", list(_layers()))
def test_member_forward_matches_formula(name):
    layer, xshape = _layers()[name]
    gen = torch.Generator().manual_seed(1)
    be = BatchEnsemble(copy.deepcopy(layer), M)
    _randomise(be, gen)
    x = torch.randn(xshape, generator=gen, dtype=torch.float64)
    out = be(tile_members(x, M))
    out = out.view(M, xshape[0], *out.shape[1:])
    for m in range(M):
        ref = _member_reference(layer, be.r[m], be.s[m], x, isinstance(layer, nn.Conv2d))
        torch.testing.assert_close(out[m], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(be.member_layer(m)(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_layers()))
def test_fold_equals_latent_mean_layer_exactly(name):
    """fold_mean_() == the BE layer with every member set to (r̄, s̄), for every input; class kept."""
    layer, xshape = _layers()[name]
    gen = torch.Generator().manual_seed(2)
    be = BatchEnsemble(copy.deepcopy(layer), M)
    _randomise(be, gen)
    x = torch.randn(xshape, generator=gen, dtype=torch.float64)
    latent = copy.deepcopy(be)
    with torch.no_grad():
        latent.r.copy_(be.r.mean(0, keepdim=True).expand_as(be.r))
        latent.s.copy_(be.s.mean(0, keepdim=True).expand_as(be.s))
    expected = latent(tile_members(x, M)).view(M, xshape[0], -1)
    r_bar, s_bar = be.r.mean(0).detach().clone(), be.s.mean(0).detach().clone()
    folded = be.fold_mean_()
    assert type(folded) is type(layer)
    if isinstance(layer, MonarchLinear):
        assert folded.w1.shape == layer.w1.shape and folded.w2.shape == layer.w2.shape
    got = folded(x).reshape(xshape[0], -1)
    for m in range(M):
        torch.testing.assert_close(got, expected[m], rtol=1e-12, atol=1e-12)
    # the wrapper keeps computing the same map after folding (fast weights reset to 1)
    torch.testing.assert_close(be(tile_members(x, M)).view(M, xshape[0], -1)[1], got, rtol=1e-12, atol=1e-12)
    if not isinstance(layer, nn.Conv2d):  # dense-map identity W' = diag(s̄) W diag(r̄)
        dense = layer.weight if isinstance(layer, nn.Linear) else layer.dense_weight()
        dense_f = folded.weight if isinstance(folded, nn.Linear) else folded.dense_weight()
        torch.testing.assert_close(dense_f, s_bar[:, None] * dense * r_bar[None, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_layers()))
def test_identical_members_equal_folded_layer(name):
    layer, xshape = _layers()[name]
    gen = torch.Generator().manual_seed(3)
    be = BatchEnsemble(copy.deepcopy(layer), M)
    with torch.no_grad():
        be.r.copy_((1 + 0.5 * torch.randn(be.r.shape[1], generator=gen, dtype=torch.float64)).expand_as(be.r))
        be.s.copy_((1 + 0.5 * torch.randn(be.s.shape[1], generator=gen, dtype=torch.float64)).expand_as(be.s))
    x = torch.randn(xshape, generator=gen, dtype=torch.float64)
    members = be(tile_members(x, M)).view(M, xshape[0], -1)
    folded = be.fold_mean_()(x).reshape(xshape[0], -1)
    for m in range(M):
        torch.testing.assert_close(members[m], folded, rtol=1e-12, atol=1e-12)


def test_monarch_per_factor_average_equals_fold_but_output_average_does_not():
    """Averaging the members' folded w1 and w2 factor by factor is exactly fold_mean_; averaging the members'
    maps (outputs) is a different map (documented non-identity)."""
    layer, xshape = _layers()["monarch"]
    gen = torch.Generator().manual_seed(4)
    be = BatchEnsemble(copy.deepcopy(layer), M)
    _randomise(be, gen)
    x = torch.randn(xshape, generator=gen, dtype=torch.float64)
    per_member = [be.member_layer(m) for m in range(M)]
    avg = copy.deepcopy(layer)
    with torch.no_grad():
        avg.w1.copy_(torch.stack([p.w1 for p in per_member]).mean(0))
        avg.w2.copy_(torch.stack([p.w2 for p in per_member]).mean(0))
        avg.bias.copy_(torch.stack([p.bias for p in per_member]).mean(0))
    output_mean = torch.stack([p(x) for p in per_member]).mean(0)
    folded = be.fold_mean_()
    torch.testing.assert_close(avg(x), folded(x), rtol=1e-12, atol=1e-12)
    assert (output_mean - folded(x)).abs().max() > 1e-3


def test_fold_model_and_wrap_every_layer():
    torch.manual_seed(0)
    from methods.models import MLP

    model = MLP(16, 32, 5, depth=2, layer="monarch").double()
    batch_ensemble_(model, M)
    bes = [m for m in model.modules() if isinstance(m, BatchEnsemble)]
    assert len(bes) == 3 and any(isinstance(b.layer, MonarchLinear) for b in bes)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # identical members (a non-trivial common scale): folded net == every member
        for b in bes:
            b.r.copy_((1 + 0.3 * torch.randn(b.r.shape[1], generator=gen, dtype=torch.float64)).expand_as(b.r))
            b.s.copy_((1 + 0.3 * torch.randn(b.s.shape[1], generator=gen, dtype=torch.float64)).expand_as(b.s))
    x = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    members = member_logits(model, x, M)
    fold_batch_ensembles_(model)
    assert not any(isinstance(m, BatchEnsemble) for m in model.modules())
    assert any(isinstance(m, MonarchLinear) for m in model.modules())
    for m in range(M):
        torch.testing.assert_close(model(x), members[m], rtol=1e-12, atol=1e-12)


def test_losses_and_regulariser():
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    T = 4.0
    hand = sum(-(torch.softmax(t[m, b] / T, -1) * torch.log_softmax(s[m, b] / T, -1)).sum()
               for m in range(2) for b in range(3)) / 6 * T * T
    torch.testing.assert_close(member_kd_loss(s, t, T), hand)
    # KD against several teachers is the mean of the per-teacher soft CE
    torch.testing.assert_close(ensemble_kd_loss(s[0], t, T),
                               T * T * (soft_cross_entropy(t[0], s[0], T) + soft_cross_entropy(t[1], s[0], T)) / 2)
    p = torch.softmax(t[0], -1)
    assert kl_to_ensemble(p, t[0]) == pytest.approx(0.0, abs=1e-12)
    assert kl_to_ensemble(p, s[0]) > 0
    # KL(p_DE ‖ p_student) summed over the classes, averaged over the inputs (a hand-computed case)
    pe = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.2]], dtype=torch.float64)
    q = zs.softmax(-1)
    kl = [sum(float(pe[i, c]) * math.log(float(pe[i, c] / q[i, c])) for c in range(3)) for i in range(2)]
    assert kl_to_ensemble(pe, zs) == pytest.approx((kl[0] + kl[1]) / 2, rel=1e-12)
    be = BatchEnsemble(nn.Linear(3, 2).double(), 2)
    assert float(fast_weight_decay(be).detach()) == 0.0
    with torch.no_grad():
        be.r[0, 0] = 3.0
    assert float(fast_weight_decay(be).detach()) == pytest.approx(0.5 * 4 / 2)
    be(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    g = be.r.grad.clone()
    scale_fast_grads_(be)
    torch.testing.assert_close(be.r.grad, 2 * g)
    with pytest.raises(ValueError, match="multiple of members"):
        be(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="layer must be one of"):
        BatchEnsemble(nn.ReLU(), 2)
    with pytest.raises(ValueError, match=r"\(M, B, C\)"):
        member_kd_loss(s[0], t[0])


def test_diversifying_perturbation_step():
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double() for _ in range(M)]
    student = batch_ensemble_(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(), M)
    gen = torch.Generator().manual_seed(7)
    for b in student.modules():
        if isinstance(b, BatchEnsemble):
            _randomise(b, gen)
    x = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    pair = (0, 2)

    def objective_per_example(z):
        s = member_logits(student, z, M)
        ta, tb = teachers[0](z), teachers[2](z)
        pt = (-(tb.softmax(-1) * ta.log_softmax(-1)).sum(-1))
        ps = (-(s[2].softmax(-1) * s[0].log_softmax(-1)).sum(-1))
        return pt - ps

    eps = 1e-4
    x_new = diversifying_perturbation(x, teachers, student, eps, pair, clip=None)
    delta = x_new - x
    # per example: RMS step eps, i.e. ||δ||₂ = eps·√D
    torch.testing.assert_close(delta.norm(dim=1), torch.full((5,), eps * math.sqrt(6), dtype=torch.float64))
    # direction is the gradient of TDiv − SDiv (target member b detached): compare with autograd of the batch mean
    z = x.clone().requires_grad_(True)
    s = member_logits(student, z, M)
    obj = (-(teachers[2](z).softmax(-1).detach() * teachers[0](z).log_softmax(-1)).sum(-1)).mean() \
        - (-(s[2].softmax(-1).detach() * s[0].log_softmax(-1)).sum(-1)).mean()
    (g,) = torch.autograd.grad(obj, z)
    torch.testing.assert_close(delta / delta.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True))
    # a small ascent step increases the disagreement objective for every example
    with torch.no_grad():
        assert bool((objective_per_example(x_new) > objective_per_example(x)).all())
    clipped = diversifying_perturbation(x, teachers, student, 0.5, pair)
    assert clipped.min() >= 0 and clipped.max() <= 1
    with pytest.raises(ValueError, match="distinct member"):
        diversifying_perturbation(x, teachers, student, eps, (1, 1))


def test_quick_run(tmp_path):
    m, cfg = quick_run("ensemble_distill", tmp_path)
    table = m["table"]
    assert set(table) == {"teachers(DE)", "be_ensemble(unfolded)", "kd", "kd+avg", "kd+avg+perturb(eps=0.0625)"}
    for v, conds in table.items():
        for c in ("clean", "noisy"):
            if c not in conds:
                continue
            met = conds[c]
            assert 0 <= met["accuracy"]["mean"] <= 1 and math.isfinite(met["nll"]["mean"])
            assert met["kl_to_ensemble"]["mean"] >= -1e-6 and met["accuracy"]["n"] == 1
    # students learn from the teachers even in 5 epochs (chance: 0.1)
    assert min(table[v]["clean"]["accuracy"]["mean"] for v in table) > 0.8
    d = m["paired"]["kd+avg_minus_kd"]["clean"]["nll"]
    assert d["mean"] == pytest.approx(table["kd+avg"]["clean"]["nll"]["mean"] - table["kd"]["clean"]["nll"]["mean"])
