"""SSS: relaxations and their limits, straight-through gradients, autoregressive selection without repeats,
exactly k picks, permutation equivariance of the set encoder, the sparse-prior KL, quick run."""
import math

import pytest
import torch

from conftest import rel_err
from monarch_kernels.layers import MonarchLinear
from recipe_runs import quick_run
from methods.sss import (CNP, MODES, MaskedSetClassifier, SetAttentionScorer, SetEncoder, SetSubsampler,
                         autoregressive_select, bernoulli_kl, gp_functions, gumbel_softmax, image_to_set,
                         relaxed_bernoulli)


def test_relaxed_bernoulli_hard_samples_are_binary_with_the_right_rate():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0]).repeat(20000, 1)
    z = relaxed_bernoulli(logits, 0.5, generator=torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(z.mean(0), torch.sigmoid(logits[0]), atol=0.015)


def test_relaxed_bernoulli_low_temperature_limit_and_straight_through_gradient():
    logits = torch.randn(4000)
    soft = relaxed_bernoulli(logits, 0.01, hard=False, generator=torch.Generator().manual_seed(1))
    assert (torch.minimum(soft, 1 - soft) < 1e-2).float().mean() > 0.95  # τ → 0: binary
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(4000)
    (relaxed_bernoulli(a, 0.7, hard=True, generator=torch.Generator().manual_seed(2)) * w).sum().backward()
    (relaxed_bernoulli(b, 0.7, hard=False, generator=torch.Generator().manual_seed(2)) * w).sum().backward()
    assert a.grad.abs().sum() > 0 and torch.allclose(a.grad, b.grad)  # hard forward, soft gradient


def test_gumbel_softmax_hard_one_hot_frequencies_mask_and_gradient():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5]).repeat(20000, 1)
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[:, 2] = False
    y, idx = gumbel_softmax(logits, 0.5, mask=mask, generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0} and torch.equal(y.sum(-1), torch.ones(20000))
    assert torch.equal(y.argmax(-1), idx) and (idx != 2).all()
    probs = torch.softmax(logits[0].masked_fill(~mask[0], float("-inf")), -1)
    freq = torch.bincount(idx, minlength=5).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    # τ → 0: the soft sample approaches the one-hot of the same draw
    soft, idx0 = gumbel_softmax(logits[:500], 0.01, hard=False, generator=torch.Generator().manual_seed(3))
    assert (soft.max(-1).values > 0.99).float().mean() > 0.95 and torch.equal(soft.argmax(-1), idx0)
    # straight-through: hard forward, the soft sample's gradient
    a, b = logits[:50].clone().requires_grad_(), logits[:50].clone().requires_grad_()
    w = torch.randn(50, 5)
    (gumbel_softmax(a, 0.5, generator=torch.Generator().manual_seed(4))[0] * w).sum().backward()
    (gumbel_softmax(b, 0.5, hard=False, generator=torch.Generator().manual_seed(4))[0] * w).sum().backward()
    assert a.grad.abs().sum() > 0 and torch.allclose(a.grad, b.grad)


def test_bernoulli_kl_hand_case():
    rho = torch.tensor([0.5, 0.25, 0.9])
    kl = bernoulli_kl(rho, 0.25)
    assert math.isclose(kl[0].item(), 0.5 * math.log(4 / 3), rel_tol=1e-5)  # ½ln2 + ½ln(2/3)
    assert abs(kl[1].item()) < 1e-6
    expected = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.75)
    assert math.isclose(kl[2].item(), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="r0"):
        bernoulli_kl(rho, 1.0)


@pytest.mark.parametrize("training", [True, False])
def test_autoregressive_select_never_repeats_and_picks_exactly_k(training):
    b, n, k = 64, 10, 6
    available = torch.rand(b, n, generator=torch.Generator().manual_seed(0)) < 0.8
    available[:, :k] = True  # at least k per row
    seen_t = []

    def greedy(t, prev):  # always prefers element 0 strongly: the mask must stop repeats
        seen_t.append((t, tuple(prev.shape)))
        s = torch.zeros(b, n)
        s[:, 0] = 50.0
        return s

    idx, w = autoregressive_select(greedy, k, available, training=training,
                                   generator=torch.Generator().manual_seed(1))
    assert idx.shape == (b, k) and w.shape == (b, k, n)
    assert all(len(set(row.tolist())) == k for row in idx)
    assert available.gather(1, idx).all()
    assert torch.equal(w.detach().argmax(-1), idx) and torch.equal(w.detach().sum(-1), torch.ones(b, k))
    assert (idx[:, 0] == 0).all()
    assert seen_t == [(t, (b, t, n)) for t in range(k)]  # scores see the previous picks
    with pytest.raises(ValueError, match="at least k"):
        autoregressive_select(greedy, n + 1, torch.ones(b, n, dtype=torch.bool))


def test_set_encoder_is_permutation_equivariant():
    torch.manual_seed(0)
    enc = SetEncoder(3, hidden=16, nblocks=4).double()
    assert any(isinstance(m, MonarchLinear) for m in enc.modules())
    d = torch.randn(5, 12, 3, dtype=torch.float64)
    perm = torch.randperm(12)
    logits, h, r = enc(d)
    logits_p, h_p, r_p = enc(d[:, perm])
    assert rel_err(logits_p, logits[:, perm]) < 1e-12
    assert rel_err(h_p, h[:, perm]) < 1e-12
    assert rel_err(r_p, r) < 1e-12



def test_set_attention_scorer_is_the_documented_mab():
    """``score_i = head([LN(h_i + O·MultiHead(Q h_i, K Y, V Y)), r])`` with ``Y = {seed} ∪ selected`` and per-head
    scaled dot-product attention ``softmax(q kᵀ / √d_h) v``, re-implemented head by head."""
    torch.manual_seed(0)
    sc = SetAttentionScorer(hidden=16, heads=2, nblocks=4).double()
    h, r, sel = (torch.randn(*s, dtype=torch.float64) for s in ((3, 5, 16), (3, 16), (3, 2, 16)))
    keys = torch.cat([sc.seed.expand(3, 1, 16), sel], 1)
    q, k, v = sc.q(h), sc.k(keys), sc.v(keys)
    heads = [torch.softmax(q[..., j:j + 8] @ k[..., j:j + 8].transpose(1, 2) / math.sqrt(8), -1) @ v[..., j:j + 8]
             for j in (0, 8)]
    mab = sc.norm(h + sc.o(torch.cat(heads, -1)))
    expected = sc.head(torch.cat([mab, r[:, None].expand_as(mab)], -1).reshape(15, 32)).reshape(3, 5)
    assert rel_err(sc(h, r, sel), expected) < 1e-12

@pytest.mark.parametrize("mode", MODES)
def test_subsampler_picks_exactly_k_distinct_elements(mode):
    torch.manual_seed(0)
    d = torch.randn(8, 20, 3)
    s = SetSubsampler(3, 5, mode, n=20, hidden=16, r0=0.2)
    for train in (True, False):
        s.train(train)
        sub = s(d, generator=torch.Generator().manual_seed(0))
        assert sub.index.shape == (8, 5) and all(len(set(r.tolist())) == 5 for r in sub.index)
        gathered = d.gather(1, sub.index[..., None].expand(-1, -1, 3))
        assert torch.allclose(sub.elements, gathered, atol=1e-6)  # forward value is exactly the picked elements
        assert sub.candidates.gather(1, sub.index).all()
        assert (sub.candidates.sum(-1) >= 5).all()


def test_sss_gradients_reach_both_stages_and_kl_is_the_prior_term():
    torch.manual_seed(0)
    d = torch.rand(16, 20, 3)
    s = SetSubsampler(3, 4, "sss", hidden=16, r0=0.2)
    s.train()
    sub = s(d, generator=torch.Generator().manual_seed(0))
    assert rel_err(sub.kl, bernoulli_kl(sub.rho, 0.2).mean()) < 1e-6
    sub.elements.pow(2).sum().backward()  # the task loss alone reaches stage 1 (through log z) and stage 2
    enc_grad = sum(p.grad.abs().sum() for p in s.encoder.psi.parameters() if p.grad is not None)
    att_grad = sum(p.grad.abs().sum() for p in s.scorer.parameters() if p.grad is not None)
    assert enc_grad > 0 and att_grad > 0
    s.eval()
    a, b = s(d), s(d)
    assert torch.equal(a.index, b.index)  # deterministic at test
    m = a.rho.sum(-1).round().long().clamp(min=4)
    assert torch.equal(a.candidates.sum(-1), m)  # the expected sample size, at least k
    for row in range(16):  # ... of the most probable elements
        assert a.rho[row][a.candidates[row]].min() >= a.rho[row][~a.candidates[row]].max()


def test_stage_two_depends_on_the_selected_set():
    torch.manual_seed(0)
    s = SetSubsampler(3, 3, "sss", hidden=16)
    d = torch.randn(2, 10, 3)
    _, h, r = s.encoder(d)
    s1 = s.scorer(h, r, h[:, :1])
    s2 = s.scorer(h, r, h[:, 1:2])
    assert (s1 - s2).abs().max() > 1e-4


def test_task_networks_and_data():
    torch.manual_seed(0)
    sets = image_to_set(torch.rand(4, 1, 8, 8))
    assert sets.shape == (4, 64, 3) and sets[0, 10, :2].tolist() == pytest.approx([1 / 7, 2 / 7])
    w = torch.nn.functional.one_hot(torch.tensor([[3, 9]] * 4), 64).float()
    clf = MaskedSetClassifier(64, 10, 16)
    assert clf(w, sets[..., 2]).shape == (4, 10)
    inp = torch.zeros(4, 128)
    inp[:, [3, 9]] = sets[:, [3, 9], 2]
    inp[:, [64 + 3, 64 + 9]] = 1.0
    assert torch.allclose(clf(w, sets[..., 2]), clf.net(inp))  # only the picked pixels, in place, plus the mask
    f = gp_functions(3, 50, generator=torch.Generator().manual_seed(0))
    assert f.shape == (3, 50, 2) and f[..., 1].std() > 0.3
    mu, sigma = CNP(16)(f[:, :4], f[:, :, :1])
    assert mu.shape == sigma.shape == (3, 50) and (sigma > 0).all()
    with pytest.raises(ValueError, match=r"\(B, n, 3\)"):
        SetSubsampler(3, 2)(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="mode"):
        SetSubsampler(3, 2, "greedy")


def test_quick_run(tmp_path):
    m, cfg = quick_run("sss", tmp_path)
    cls, fn = m["results"]["classify"]["summary"], m["results"]["function"]["summary"]
    assert set(cls) == {"8"} and set(fn) == {"3"}
    row = cls["8"]
    assert set(row) == set(MODES) and all(0 <= row[mode]["accuracy"]["mean"] <= 1 for mode in MODES)
    # 8 of 64 pixels: every subsampler's classifier is above chance (0.1), and the learned subsets beat random ones
    assert min(row[mode]["accuracy"]["mean"] for mode in MODES) > 0.15
    assert row["sss"]["accuracy"]["mean"] > row["random"]["accuracy"]["mean"]
    assert m["paired"]["classify"]["8"]["sss_minus_random"]["mean"] == pytest.approx(
        row["sss"]["accuracy"]["mean"] - row["random"]["accuracy"]["mean"])
    for mode in MODES:
        assert math.isfinite(fn["3"][mode]["mse"]["mean"]) and fn["3"][mode]["mse"]["mean"] >= 0
