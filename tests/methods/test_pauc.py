"""Partial-AUC DRO (methods/pauc.py): the identities of methods-a.md §5 E1, metrics, sampler, quick run."""

import numpy as np
import pytest
import torch

from methods import pauc
from recipe_runs import quick_run


def _batch(P=5, N=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(P + N, generator=g, dtype=dtype)
    labels = torch.cat([torch.ones(P, dtype=torch.long), torch.zeros(N, dtype=torch.long)])
    perm = torch.randperm(P + N, generator=g)
    return scores[perm], labels[perm]


# ---------------------------------------------------------------- E1 (i): CVaR optimum = top-β mean
@pytest.mark.parametrize("beta", [0.2, 0.25, 0.23, 1.0])
def test_cvar_optimum_is_top_beta_mean(beta):
    g = torch.Generator().manual_seed(1)
    L = torch.rand(3, 20, generator=g, dtype=torch.float64) * 4
    # the objective is convex piecewise linear in s with kinks at the L values: exhaustive search is exact
    best = torch.stack([min(pauc.cvar_objective(L[i:i + 1], L[i, j:j + 1], beta) for j in range(20))
                        for i in range(3)])
    assert torch.allclose(best, pauc.cvar(L, beta), atol=1e-12)
    k = beta * 20
    if abs(k - round(k)) < 1e-9:  # integer βn−: the plain mean of the top ⌈βn−⌉ losses
        top = L.sort(1, descending=True).values[:, :int(round(k))].mean(1)
        assert torch.allclose(best, top, atol=1e-12)


# ---------------------------------------------------------------- E1 (ii): SOPA's s converges to the quantile
def test_sopa_thresholds_converge_to_the_quantile():
    scores, labels = _batch(P=4, N=20, seed=2)
    index = torch.arange(len(scores))
    beta, eta = 0.2, 0.002
    loss = pauc.SOPALoss(len(scores), beta=beta, eta=eta)
    for _ in range(800):
        loss(scores, labels, index)
    L = pauc.pairwise_surrogate(scores[labels == 1], scores[labels == 0])
    srt = L.sort(1, descending=True).values
    k = int(beta * 20)
    s = loss.s[index[labels == 1]].double()
    slack = eta * 20 / k
    assert torch.all(s >= srt[:, k] - slack) and torch.all(s <= srt[:, k - 1] + slack)
    # at the final state the CVaR objective is at its minimum (up to the oscillation of the constant step)
    assert torch.allclose(pauc.cvar_objective(L, s, beta), pauc.cvar(L, beta).mean(), atol=2 * slack)


# ---------------------------------------------------------------- E1 (iii): λ limits
def test_kl_dro_limits():
    g = torch.Generator().manual_seed(3)
    L = torch.rand(4, 30, generator=g, dtype=torch.float64) * 2
    assert torch.allclose(pauc.kl_dro_objective(L, 1e5), L.mean(), rtol=1e-4)
    lam = 1e-3
    gap = pauc.kl_dro_objective(L, lam) - L.max(1).values.mean()
    assert -lam * np.log(30) - 1e-12 <= gap <= 1e-12
    # two-way: τ → ∞ averages over positives (= one-way), τ → 0 takes the hardest positive
    assert torch.allclose(pauc.kl_kl_objective(L, 0.7, 1e6), pauc.kl_dro_objective(L, 0.7), rtol=1e-5)
    inner = 0.7 * (torch.logsumexp(L / 0.7, 1) - np.log(30))
    assert torch.allclose(pauc.kl_kl_objective(L, 0.7, 1e-4), inner.max(), atol=1e-3)


# ---------------------------------------------------------------- E1 (iv): p-weighted gradient = exact gradient
def _scorer(seed=4, d=6, n=17):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(n, generator=g) < 0.35).long()
    labels[0], labels[1] = 1, 0
    return x, w, labels


def _grad(fn, w):
    (g,) = torch.autograd.grad(fn(), w)
    return g


@pytest.mark.parametrize("lam", [0.3, 1.0, 5.0])
def test_sopa_s_gradient_equals_exact_objective(lam):
    x, w, y = _scorer()
    idx = torch.arange(len(x))
    f = lambda: torch.sigmoid(x @ w)  # noqa: E731
    loss = pauc.SOPASLoss(len(x), lam=lam, gamma=1.0)
    g_alg = _grad(lambda: loss(f(), y, idx), w)
    L = lambda: pauc.pairwise_surrogate(f()[y == 1], f()[y == 0])  # noqa: E731
    g_exact = _grad(lambda: pauc.kl_dro_objective(L(), lam), w)
    assert torch.allclose(g_alg, g_exact, rtol=1e-10, atol=1e-12)
    assert g_exact.abs().max() > 1e-4


@pytest.mark.parametrize("lam,tau", [(0.5, 1.0), (1.0, 0.3), (2.0, 2.0)])
def test_sota_s_gradient_equals_exact_objective(lam, tau):
    x, w, y = _scorer(seed=5)
    idx = torch.arange(len(x))
    f = lambda: torch.sigmoid(x @ w)  # noqa: E731
    loss = pauc.SOTASLoss(len(x), lam=lam, tau=tau, gammas=(1.0, 1.0))
    g_alg = _grad(lambda: loss(f(), y, idx), w)
    L = lambda: pauc.pairwise_surrogate(f()[y == 1], f()[y == 0])  # noqa: E731
    g_exact = _grad(lambda: pauc.kl_kl_objective(L(), lam, tau), w)
    assert torch.allclose(g_alg, g_exact, rtol=1e-10, atol=1e-12)


def test_sopa_gradient_and_threshold_step_are_the_cvar_subgradients():
    x, w, y = _scorer(seed=6)
    idx = torch.arange(len(x))
    beta, eta = 0.3, 0.5
    loss = pauc.SOPALoss(len(x), beta=beta, eta=eta)
    loss.s[idx[y == 1]] = torch.linspace(0.1, 0.9, int((y == 1).sum()), dtype=torch.float32)
    s0 = loss.s[idx[y == 1]].double().clone().requires_grad_(True)
    f = lambda: torch.sigmoid(x @ w)  # noqa: E731
    g_alg = _grad(lambda: loss(f(), y, idx), w)
    L = pauc.pairwise_surrogate(f()[y == 1], f()[y == 0])
    F_exact = pauc.cvar_objective(L, s0, beta)
    g_w, g_s = torch.autograd.grad(F_exact, [w, s0])
    assert torch.allclose(g_alg, g_w, rtol=1e-10, atol=1e-12)
    # the s-step is η times the per-positive subgradient n+ ∂F/∂s_i
    n_pos = int((y == 1).sum())
    assert torch.allclose(loss.s[idx[y == 1]].double(), s0.detach() - eta * n_pos * g_s, atol=1e-6)


def test_sopa_update_matches_a_loop_with_ties_and_num_neg():
    """SOPA's documented step by explicit loops: ``p_ij = 1[L_ij > s_i]`` (strict, so a zero loss at ``s_i = 0`` is
    *not* counted), ``s_i ← s_i − η(1 − Σ_j p_ij/(β·num_neg))`` with the given ``num_neg`` (not the batch's
    negatives), loss ``Σ p_ij L_ij/(β P N)``."""
    g = torch.Generator().manual_seed(11)
    P, N, beta, eta, num_neg = 4, 9, 0.3, 0.7, 25
    f_pos = torch.rand(P, generator=g, dtype=torch.float64) + torch.tensor([2.0, 2.0, 0.0, 0.3], dtype=torch.float64)
    f_neg = torch.rand(N, generator=g, dtype=torch.float64)  # positives 0, 1 clear every negative by > 1: L = 0
    scores = torch.cat([f_pos, f_neg])
    labels = torch.cat([torch.ones(P, dtype=torch.long), torch.zeros(N, dtype=torch.long)])
    index = torch.tensor([5, 2, 7, 0] + list(range(10, 10 + N)))
    s0 = [0.0, 0.0, 0.3, 0.25]  # the first two positives sit exactly at their (zero) losses
    for num in (None, num_neg):
        loss = pauc.SOPALoss(30, beta=beta, eta=eta, num_neg=num)
        loss.s = loss.s.double()
        loss.s[index[:P]] = torch.tensor(s0, dtype=torch.float64)
        got = loss(scores, labels, index)
        n_neg = N if num is None else num
        total, s_new = 0.0, []
        for i in range(P):
            row = [max(1.0 - (float(f_pos[i]) - float(f_neg[j])), 0.0) ** 2 for j in range(N)]
            hits = [x for x in row if x > s0[i]]
            total += sum(hits)
            s_new.append(s0[i] - eta * (1 - len(hits) / (beta * n_neg)))
        assert float(got) == pytest.approx(total / (beta * P * N), rel=1e-12)
        assert loss.s[index[:P]].tolist() == pytest.approx(s_new, rel=1e-12, abs=1e-12)
        assert loss.s[0] != 0 and loss.s[5] == pytest.approx(-eta)  # the tied rows count no hit


# ---------------------------------------------------------------- E1 (v): against LibAUC on identical batches
def test_matches_libauc_state_and_values():
    losses = pytest.importorskip("libauc.losses")
    n = 40
    g = torch.Generator().manual_seed(7)
    y_all = (torch.rand(n, generator=g) < 0.3).long()
    y_all[:2] = torch.tensor([1, 0])
    cpu = torch.device("cpu")
    pairs = [
        (pauc.SOPALoss(n, beta=0.25, eta=0.7), losses.pAUC_CVaR_Loss(n, int(y_all.sum()), beta=0.25, eta=0.7,
                                                                    device=cpu), "s"),
        (pauc.SOPASLoss(n, lam=0.8, gamma=0.3), losses.pAUC_DRO_Loss(n, gamma=0.3, Lambda=0.8, device=cpu), "u"),
        (pauc.SOTASLoss(n, lam=0.5, tau=0.9, gammas=(0.4, 0.6)),
         losses.tpAUC_KL_Loss(n, tau=0.9, Lambda=0.5, gammas=(0.4, 0.6), device=cpu), "u"),
    ]
    for step in range(5):
        idx = torch.cat([torch.tensor([0, 1]), torch.randperm(n, generator=g)[:14]]).unique()
        scores = torch.rand(len(idx), generator=g)
        for ours, theirs, buf in pairs:
            a = ours(scores, y_all[idx], idx)
            b = theirs(scores[:, None], y_all[idx][:, None], idx)
            assert torch.allclose(a, b, rtol=1e-5), (type(ours).__name__, step)
            assert torch.allclose(getattr(ours, buf), theirs.u_pos.flatten(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(pairs[2][0].v, torch.as_tensor(pairs[2][1].w, dtype=torch.float32), rtol=1e-5)


# ---------------------------------------------------------------- metrics, sampler, state, bad input
def test_one_way_pauc_matches_sklearn_mcclish():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.1).astype(int)
    s = np.round(rng.normal(size=400) + 1.2 * y, 1)  # rounding makes ties
    for fpr in (0.05, 0.3, 0.77):
        assert abs(pauc.one_way_pauc(y, s, fpr) - roc_auc_score(y, s, max_fpr=fpr)) < 1e-12
    assert abs(pauc.one_way_pauc(torch.tensor(y), torch.tensor(s), 1.0) - roc_auc_score(y, s)) < 1e-12


def test_two_way_pauc_counts_hard_pairs():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(int)
    s = rng.normal(size=300) + 1.5 * y
    sp, sn = np.sort(s[y == 1]), np.sort(s[y == 0])[::-1]
    hp, hn = sp[:round(0.3 * len(sp))], sn[:round(0.2 * len(sn))]
    brute = np.mean(hp[:, None] > hn[None, :])
    assert abs(pauc.two_way_pauc(y, s, 0.7, 0.2) - brute) < 1e-12
    try:
        from libauc.metrics import pauc_roc_score
    except ImportError:
        return
    assert abs(pauc.two_way_pauc(y, s, 0.7, 0.2) - pauc_roc_score(y, s, max_fpr=0.2, min_tpr=0.7)) < 1e-12


def test_train_method_feeds_sigmoid_scores_labels_and_indices_to_the_pairwise_loss(monkeypatch):
    """The stateful pAUC losses see σ(f(x)) (scores in [0, 1], the range their margin of 1 is meant for), the batch
    labels and the dataset indices of a DualSampler batch (LR 0: the model stays the one evaluated here)."""
    from methods.pauc import recipe as pr

    seen = []

    class SpyLoss(torch.nn.Module):
        def forward(self, scores, labels, index):
            seen.append((scores.detach(), labels, index))
            return pauc.AUCLoss()(scores, labels)

    monkeypatch.setattr(pr, "make_objective", lambda method, n, cfg: (SpyLoss(), None))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(40, 3) * 3, (torch.arange(40) % 4 == 0).long()
    pr.train_method("sopa", model, x, y, pr.Config(batch_size=8, sampling_rate=0.25, lr=0.0), epochs=1,
                    gen=torch.Generator().manual_seed(0))
    assert len(seen) == 5  # max(10 // 2, 30 // 6) batches of 2 positives + 6 negatives
    with torch.no_grad():
        for scores, labels, idx in seen:
            assert torch.allclose(scores, torch.sigmoid(model(x[idx]).squeeze(-1)))
            assert torch.equal(labels, y[idx]) and labels.sum() == 2


def test_dual_sampler_and_indexed_dataset():
    y = torch.zeros(100, dtype=torch.long)
    y[::10] = 1  # 10 positives
    sampler = pauc.DualSampler(y, batch_size=10, sampling_rate=0.3, generator=torch.Generator().manual_seed(0))
    batches = list(sampler.batches())
    assert len(batches) == sampler.num_batches == 90 // 7
    for b in batches:
        assert int(y[b].sum()) == 3 and len(b) == 10
    negs = torch.cat([b[3:] for b in batches])
    assert len(negs.unique()) == len(negs)  # each negative at most once per epoch
    x = torch.randn(100, 3)
    loader = torch.utils.data.DataLoader(pauc.IndexedDataset(x, y), batch_size=10, sampler=sampler)
    xb, yb, ib = next(iter(loader))
    assert torch.equal(xb, x[ib]) and torch.equal(yb, y[ib]) and int(yb.sum()) == 3
    assert len(list(iter(sampler))) == len(sampler)


def test_state_is_checkpointed_and_bad_input_raises():
    loss = pauc.SOTASLoss(10)
    scores, labels = _batch(P=3, N=4)
    loss(scores, labels, torch.arange(7))
    sd = loss.state_dict()
    assert set(sd) == {"u", "v"} and sd["u"].abs().sum() > 0
    fresh = pauc.SOTASLoss(10)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.u, loss.u)
    with pytest.raises(ValueError, match="scores must have shape"):
        loss(torch.rand(7, 2), labels, torch.arange(7))
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        loss(scores, torch.ones(7, dtype=torch.long), torch.arange(7))
    with pytest.raises(ValueError, match="index must have shape"):
        loss(scores, labels, torch.arange(5))
    with pytest.raises(ValueError, match="data_len"):
        loss(scores, labels, torch.arange(7) + 10)
    with pytest.raises(ValueError, match="beta"):
        pauc.SOPALoss(10, beta=0)
    with pytest.raises(ValueError, match="mode"):
        pauc.pauc_loss("nope")
    # index of positives only is accepted as in LibAUC
    pauc.SOPASLoss(10)(scores, labels, torch.arange(3))


# ---------------------------------------------------------------- quick end-to-end run
def test_quick_run(tmp_path):
    m, cfg = quick_run("pauc", tmp_path)
    assert set(m["summary"]) == set(pauc.METHODS) and m["seeds"] == [0, 1]
    for method, s in m["summary"].items():
        for key in ("opauc", "tpauc", "auc"):
            assert 0.0 <= s[key]["mean"] <= 1.0 and s[key]["n"] == 2 and np.isfinite(s[key]["std"])
        assert s["opauc"]["mean"] > 0.7 and s["auc"]["mean"] > 0.8  # far above chance (0.5)
    assert m["best_opauc"] in pauc.METHODS
    # the effect's direction: every pAUC objective beats BCE on OPAUC (mean over the 2 seeds)
    bce = m["summary"]["bce"]["opauc"]["mean"]
    assert all(m["summary"][k]["opauc"]["mean"] > bce for k in ("sopa", "sopa_s", "sota_s"))
    d = m["paired"]["sopa_minus_bce"]["opauc"]
    per = m["per_seed"]
    assert abs(d["mean"] - np.mean([r["sopa"]["opauc"] - r["bce"]["opauc"] for r in per])) < 1e-12
    assert set(m["paired"]) >= {"sopa_minus_auc", "sota_s_minus_auc"}  # the full-AUC baseline too
    assert m["summary"]["sopa"]["opauc"]["std"] == pytest.approx(np.std([r["sopa"]["opauc"] for r in per], ddof=1))
