"""TAM (methods/tam.py): margins by hand on a small graph, sign/zero structure, GCN propagation, quick run."""
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")
from methods import tam  # noqa: E402
from recipe_runs import quick_run  # noqa: E402


def _undirected(edges):
    e = torch.tensor(edges, dtype=torch.long).T
    return torch.cat([e, e.flip(0)], 1)


def _js(a, b):
    return 0.5 * sum(x * math.log(x / ((x + y) / 2)) + y * math.log(y / ((x + y) / 2)) for x, y in zip(a, b))


def test_js_divergence_is_the_bounded_symmetric_divergence():
    """Disjoint supports give ln 2 (its maximum), equal distributions 0, and a hand-computed pair its value,
    either way round, over the last dim of batched inputs."""
    a = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    got = tam.js_divergence(a, b)
    want = torch.tensor([math.log(2), _js((0.25, 0.75), (0.5, 0.5)), 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tam.js_divergence(b, a), got, rtol=1e-12, atol=1e-15)


def test_margins_match_hand_computation_on_a_path():
    # path 0-1-2-3, labels 0,0,1,1, all labelled: NLDs with self-loops are
    # p0=(1,0), p1=(2/3,1/3), p2=(1/3,2/3), p3=(0,1); C0=(5/6,1/6), C1=(1/6,5/6)
    ei = _undirected([(0, 1), (1, 2), (2, 3)])
    y = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, dtype=torch.bool)
    logits = torch.randn(4, 2, dtype=torch.float64)  # irrelevant: every node is labelled
    log_acm, adm = tam.tam_margins(logits, ei, y, mask, [2, 2])
    # ACM of node 1 towards class 1: (p1[0]/C00) (C01/p1[1]) = (2/3)/(5/6) * (1/6)/(1/3) = 0.4
    expect_acm = torch.tensor([[1.0, 1.0], [1.0, 0.4], [0.4, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(log_acm, expect_acm.log(), atol=1e-12)
    # ADM of node 1 towards class 1 by the law of cosines on JS divergences
    eps = 1e-6
    C0, C1 = (5 / 6, 1 / 6), (1 / 6, 5 / 6)
    d1, d2, d3 = _js((2 / 3, 1 / 3), C0), _js(C0, C1), _js((2 / 3, 1 / 3), C1)
    b1 = (d1 ** 2 + d2 ** 2 - d3 ** 2) / (2 * d2 ** 2)
    # node 0: p0 = (1, eps) after clamping lies beyond C0, away from C1: negative position
    e1, e3 = _js((1.0, eps), C0), _js((1.0, eps), C1)
    b0 = (e1 ** 2 + d2 ** 2 - e3 ** 2) / (2 * d2 ** 2)
    expect_adm = torch.tensor([[0.0, b0], [0.0, b1], [b1, 0.0], [b0, 0.0]], dtype=torch.float64)
    assert torch.allclose(adm, expect_adm, rtol=1e-5, atol=1e-8)
    assert 0 < b1 < 0.5 and b0 < 0  # node 1 sits between the class centres, nearer its own; node 0 beyond C0
    # combined margin with α, β: zero on the target, α log a − β b elsewhere
    m = tam.TAM(alpha=2.5, beta=0.5).margins(logits, ei, y, mask, [2, 2])
    assert torch.allclose(m[1, 1], torch.tensor(2.5 * math.log(0.4) - 0.5 * b1, dtype=torch.float64))
    assert torch.all(m[torch.arange(4), y] == 0)


def test_pseudo_labels_use_the_class_wise_temperature():
    # star: centre 0 (labelled 0) with unlabelled leaves 1, 2; leaf 3 labelled 1 attached to 2
    ei = _undirected([(0, 1), (0, 2), (2, 3)])
    y = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, False, False, True])
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([3.0, 1.0])
    pi = 0.4 * counts / counts.sum() + 0.6
    T = 1.2 * (pi + 1 - pi.max())
    assert torch.allclose(tam.class_temperature(counts), T.double())
    q1, q2 = torch.softmax(logits[1] * T, 0), torch.softmax(logits[2] * T, 0)
    p = tam.neighbor_label_distribution(logits, ei, y, mask, counts)
    assert torch.allclose(p[0], (torch.tensor([1.0, 0.0], dtype=torch.float64) + q1 + q2) / 3)
    assert torch.allclose(p[3], (q2 + torch.tensor([0.0, 1.0], dtype=torch.float64)) / 2)


def test_margins_match_a_loop_on_an_asymmetric_three_class_graph():
    """Plain-Python loops over a random 3-class graph with unlabelled nodes and non-default φ, δ: NLD with the
    class-wise temperature, class connectivity ``C`` (not symmetric here, so ``C[y, c']`` vs ``C[c', y]`` matter),
    ``log a`` and ``b`` against :func:`tam.tam_margins`."""
    g = torch.Generator().manual_seed(21)
    n, c, phi, delta, eps = 12, 3, 0.9, 0.7, 1e-6
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if float(torch.rand((), generator=g)) < 0.3]
    ei = _undirected(pairs)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 0, 1])
    mask = torch.tensor([True] * 10 + [False] * 2)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    counts = [5, 3, 2]
    pi = [delta * k / sum(counts) + 1 - delta for k in counts]
    T = [phi * (x + 1 - max(pi)) for x in pi]
    q = []
    for v in range(n):
        if mask[v]:
            q.append([1.0 if k == int(y[v]) else 0.0 for k in range(c)])
        else:
            e = [math.exp(T[k] * float(logits[v, k])) for k in range(c)]
            q.append([x / sum(e) for x in e])
    nbrs = [{v} | {j for i, j in pairs if i == v} | {i for i, j in pairs if j == v} for v in range(n)]
    p = [[sum(q[u][k] for u in nbrs[v]) / len(nbrs[v]) for k in range(c)] for v in range(n)]
    train = [v for v in range(n) if mask[v]]
    C = [[sum(p[v][k] for v in train if int(y[v]) == a) / counts[a] for k in range(c)] for a in range(c)]
    C = [[max(x, eps) for x in row] for row in C]
    assert max(abs(C[a][b] - C[b][a]) for a in range(c) for b in range(c)) > 0.05
    log_acm, adm = tam.tam_margins(logits, ei, y, mask, counts, phi=phi, delta=delta)
    for r, v in enumerate(train):
        pv, t = [max(x, eps) for x in p[v]], int(y[v])
        for k in range(c):
            a = 1.0 if k == t else min(1.0, (pv[t] / C[t][t]) * (C[t][k] / pv[k]))
            assert float(log_acm[r, k]) == pytest.approx(math.log(a), abs=1e-9)
            if k == t:
                assert float(adm[r, k]) == 0.0
                continue
            d1, d2, d3 = _js(pv, C[t]), max(_js(C[t], C[k]), eps), _js(pv, C[k])
            assert float(adm[r, k]) == pytest.approx((d1 ** 2 + d2 ** 2 - d3 ** 2) / (2 * d2 ** 2), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_signs_on_a_random_graph(seed):
    x, ei, y, _ = tam.make_csbm(300, 4, 8, minor_classes=(2, 3), anomaly_fraction=0.3, seed=seed)
    train, _, _ = tam.imbalanced_split(y, 4, (2, 3), n_major=15, n_minor=3, seed=seed)
    logits = torch.randn(300, 4, generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(y[train], minlength=4)
    log_acm, adm = tam.tam_margins(logits, ei, y, train, counts)
    target = torch.nn.functional.one_hot(y[train], 4).bool()
    assert torch.all(log_acm[target] == 0) and torch.all(adm[target] == 0)
    assert torch.all(log_acm <= 0)  # ACM never raises a logit
    assert (log_acm < 0).any()
    clipped = tam.TAM(clip_adm=True).margins(logits, ei, y, train, counts)
    assert torch.all(clipped <= 0) and torch.all(clipped[target] == 0)
    # ADM alone is ≤ 0 exactly where p_v projects at or beyond its own centre towards C_c' (b ≥ 0); the official
    # code does not clip, so a node on the far side of its own centre gets a positive ADM margin
    unclipped = tam.TAM(alpha=0.0, beta=1.0).margins(logits, ei, y, train, counts)
    assert torch.equal(unclipped > 0, adm < 0)


def test_margins_carry_no_gradient_and_respect_warmup():
    x, ei, y, _ = tam.make_csbm(200, 4, 8, minor_classes=(2, 3), seed=3)
    train, _, _ = tam.imbalanced_split(y, 4, (2, 3), n_major=10, n_minor=2, seed=3)
    counts = torch.bincount(y[train], minlength=4)
    logits = torch.randn(200, 4, requires_grad=True)
    t = tam.TAM(warmup=5)
    assert torch.equal(t.adjust(logits, ei, y, train, counts, epoch=5), logits[train])
    adj = t.adjust(logits, ei, y, train, counts, epoch=6)
    (g,) = torch.autograd.grad(adj.sum(), logits)
    assert torch.equal(g, train[:, None].float().expand(-1, 4))  # d(l + margin)/dl = 1: margins are constants
    assert not torch.equal(adj, logits[train])


def test_training_hands_tam_one_based_epochs_and_decays_only_the_first_layer(monkeypatch):
    """train_node_classifier: TAM sees epochs 1..E (off while epoch ≤ warmup), and Adam's weight decay is on the
    first GCN layer only, as in the official main_bs.py."""
    x, ei, y, _ = tam.make_csbm(120, 4, 8, minor_classes=(2, 3), seed=3)
    train, _, _ = tam.imbalanced_split(y, 4, (2, 3), n_major=10, n_minor=2, seed=3)
    seen, groups = [], []

    class SpyTAM(tam.TAM):
        def adjust(self, logits, edge_index, labels, train_mask, class_counts, epoch):
            seen.append(epoch)
            return super().adjust(logits, edge_index, labels, train_mask, class_counts, epoch)

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            groups.extend(self.param_groups)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    cfg = tam.Config(epochs=3, hidden=16)
    _, epochs = tam.train_node_classifier("bs_tam", x, tam.adjacency(ei, 120), ei, y, train, 4, cfg, seed=0,
                                          tam=SpyTAM(warmup=1))
    assert epochs == 3 and seen == [1, 2, 3]
    ref = tam.GCN(8, 16, 4, layer=cfg.layer, nblocks=cfg.nblocks)
    decayed = [tuple(p.shape) for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [tuple(p.shape) for p in ref.conv1.parameters()]
    assert {g["weight_decay"] for g in groups} == {cfg.weight_decay, 0.0}


def test_balanced_softmax_and_bad_input():
    logits = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    counts = torch.tensor([10.0, 3.0, 1.0])
    ref = -torch.log_softmax(logits + counts.log().double(), 1)[torch.arange(5), y].mean()
    assert torch.allclose(tam.balanced_softmax_loss(logits, y, counts), ref)
    ei = _undirected([(0, 1), (1, 2)])
    mask = torch.tensor([True, True, True, False, False])
    with pytest.raises(ValueError, match="train_mask"):
        tam.tam_margins(logits, ei, y, mask.long(), counts)
    with pytest.raises(ValueError, match="class_counts"):
        tam.tam_margins(logits, ei, y, mask, [1, 2])
    with pytest.raises(ValueError, match="edge_index"):
        tam.tam_margins(logits, ei.T, y, mask, counts)
    with pytest.raises(ValueError, match="every class"):
        tam.tam_margins(logits, ei, y, torch.tensor([True, True, False, False, False]), counts)


def test_monarch_gcn_conv_is_pyg_gcnconv_with_a_monarch_lin():
    from torch_geometric.nn import GCNConv

    from monarch_kernels.layers import MonarchLinear

    x, ei, _, _ = tam.make_csbm(120, 4, 8, seed=4)
    # Â = D^{-1/2}(A + I)D^{-1/2} by hand (the graph is symmetric, no duplicate edges)
    a = torch.zeros(120, 120)
    a[ei[1], ei[0]] = 1.0
    a += torch.eye(120)
    dinv = a.sum(1).rsqrt()
    a_hat = dinv[:, None] * a * dinv[None, :]
    for layer, kind in (("dense", nn.Linear), ("monarch", MonarchLinear)):
        conv = tam.monarch_gcn_conv(8, 12, layer=layer, nblocks=2)
        assert isinstance(conv, GCNConv) and isinstance(conv.lin, kind) and conv.lin.bias is None
        with torch.no_grad():
            conv.bias.copy_(torch.randn(12))
        want = a_hat @ conv.lin(x) + conv.bias
        assert torch.allclose(conv(x, ei), want, atol=1e-5)  # edge list
        assert torch.allclose(conv(x, tam.adjacency(ei, 120)), want, atol=1e-5)  # sparse adj_t (cached)
    model = tam.GCN(8, 16, 6)
    assert isinstance(model.conv1.lin, MonarchLinear) and isinstance(model.conv2.lin, MonarchLinear)
    assert model(x, tam.adjacency(ei, 120)).shape == (120, 6)
    with pytest.raises(ValueError, match="edge_index must have shape"):
        tam.adjacency(ei.T, 120)


def test_csbm_plants_anomalous_minor_nodes():
    x, ei, y, anom = tam.make_csbm(1200, seed=5)
    assert x.shape == (1200, 32) and torch.equal(ei, torch.unique(ei.flip(0), dim=1))  # symmetric
    assert anom.sum() > 0 and torch.all(y[anom] >= 3)
    same = (y[ei[0]] == y[ei[1]]).float()
    normal = ~anom[ei[0]]
    # normal nodes are homophilous; anomalous minor nodes mostly link to major classes
    assert same[normal].mean() > 0.55
    assert (y[ei[1]][anom[ei[0]]] < 3).float().mean() > 0.6


def test_quick_run(tmp_path):
    m, cfg = quick_run("tam", tmp_path)
    assert m["methods"] == ["ce", "bs", "bs_tam"] and m["seeds"] == [0, 1] and set(m["summary"]) == {"anomalous"}
    s = m["summary"]["anomalous"]
    for method in m["methods"]:
        for key in ("bacc", "f1", "acc"):
            assert 0.0 <= s[method][key]["mean"] <= 1.0 and s[method][key]["n"] == 2
        assert s[method]["bacc"]["mean"] > 0.3  # far above chance (1/6) for every loss
    # the baseline effect the paper builds on appears even here: Balanced Softmax beats CE on balanced accuracy
    assert m["paired"]["anomalous"]["bs_minus_ce"]["bacc"]["positive"] == 2
    d = m["paired"]["anomalous"]["bs_tam_minus_bs"]["bacc"]
    per = m["per_seed"]["anomalous"]
    assert d["mean"] == pytest.approx(np.mean([r["bs_tam"]["bacc"] - r["bs"]["bacc"] for r in per]))
