"""TAM: Topology-Aware Margin loss for class-imbalanced node classification (Song, Park & Yang, "TAM:
Topology-Aware Margin Loss for Class-Imbalanced Node Classification", ICML 2022).

TAM adjusts the logits of the *labelled training nodes* by per-node, per-class margins computed from the local
topology, without gradient (the margins are constants) and only after a warm-up. With ``N(v)`` the neighbours of
``v`` plus ``v`` itself:

* **neighbour label distribution (NLD)** ``p_v = mean_{u ∈ N(v)} q_u`` with ``q_u = onehot(y_u)`` for labelled
  ``u`` and ``q_u = softmax(T ⊙ l_u)`` otherwise; class-wise temperature ``T_c = φ(π_c + 1 − max π)``,
  ``π_c = δ n_c/Σn + (1 − δ)`` (``δ = 0.4``, ``φ = 1.2``);
* **class connectivity** ``C[c] = mean_{v labelled, y_v = c} p_v``; ``p`` and ``C`` are clamped at ≥ 1e-6;
* **ACM** (anomalous connectivity margin): ``a_{v,c'} = min(1, (p_v[y]/C[y,y]) · (C[y,c']/p_v[c']))``,
  ``a_{v,y} = 1``; margin ``α log a ≤ 0``;
* **ADM** (anomalous distribution margin): with Jensen–Shannon divergences (summed over classes, not square-rooted)
  ``d1 = JS(p_v, C_y)``, ``d2 = JS(C_y, C_c')`` (≥ 1e-6), ``d3 = JS(p_v, C_c')``, the position of ``p_v`` projected on
  the segment ``C_y → C_c'`` by the law of cosines, ``b = (d1² + d2² − d3²)/(2 d2²)``, ``b_{v,y} = 0``; margin ``−β b``;
* **adjusted logits** ``l̃_v = l_v + α log a_v − β b_v``, fed to the base loss (cross-entropy or Balanced Softmax,
  ``CE(l + log n_c, y)``) on the training nodes. Defaults α = 2.5, β = 0.5, φ = 1.2, warm-up 5 epochs (TAM is off
  while ``epoch ≤ warmup``).

The ACM margin is ≤ 0 and 0 for the target class. The ADM margin is 0 for the target class and ≤ 0 whenever ``p_v``
projects at or beyond ``C_y`` towards ``C_c'`` (``b ≥ 0``); a node lying on the far side of its own class centre
(``d3² > d1² + d2²``) gets ``b < 0``, i.e. a *positive* ADM margin. The official code (Jaeyun-Song/TAM,
``models/tam.py``) does not clip this; ``TAM(clip_adm=True)`` clamps ``b ≥ 0`` so that every margin is ≤ 0.

The backbone is a 2-layer GCN (:class:`GCN`) of PyTorch Geometric ``GCNConv`` layers whose feature transforms
``lin`` are swapped for :class:`monarch_kernels.layers.MonarchLinear` (:func:`monarch_gcn_conv`).

Experiment (``python -m methods tam``): a contextual SBM (:func:`make_csbm`; 3000 nodes, 6 balanced classes, 32-d
features, homophily 0.7) where a quarter of each of the 3 minor classes is wired into a major class; 20 labels per
major and 2 per minor class; CE vs Balanced Softmax vs BS+TAM over 10 seeds, plus a control without anomalous nodes.
Class means are 2 noise-σ apart (at ≈1σ every method stayed near 0.49 balanced accuracy in a 4-seed trial, with
BS+TAM − BS = +0.4 points). The README reports what the default run measured, control included.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch import Tensor, nn
from torch_geometric.nn import GCNConv
from torch_geometric.utils import add_self_loops, scatter, to_torch_csr_tensor

from .models import linear
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, format_mean_std, paired, plot_curves
from .train import fit


def adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """The graph as a sparse CSR ``adj_t`` (``[target, source]``), the input :class:`GCN` takes: PyG's ``GCNConv``
    then normalises it once (``cached``) and propagates with one sparse-dense product (≈ 4× faster on CPU than
    gather/scatter over the edge list)."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, num_edges), got {tuple(edge_index.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
        return to_torch_csr_tensor(edge_index.flip(0), size=(num_nodes, num_nodes))


def monarch_gcn_conv(in_channels: int, out_channels: int, layer: str = "monarch", nblocks: int = 4,
                     cached: bool = True) -> GCNConv:
    """PyTorch Geometric's ``GCNConv`` (``X' = D^{-1/2}(A + I)D^{-1/2} · lin(X) + b``, Kipf & Welling 2017, eq. (2))
    with its feature transform ``lin`` swapped for a bias-free ``MonarchLinear`` (``layer="monarch"``),
    ``BlockdiagLinear`` or ``nn.Linear`` (:func:`methods.models.linear`); everything else is PyG's layer."""
    conv = GCNConv(in_channels, out_channels, cached=cached)
    conv.lin = linear(in_channels, out_channels, layer, nblocks, bias=False)
    return conv


class GCN(nn.Module):
    """2-layer GCN ``conv → ReLU → dropout → conv`` (the TAM paper's default backbone) with Monarch transforms.

    ``reg_params`` (first layer) get weight decay in the recipe, as in the official code. The output transform uses
    ``gcd(num_classes, nblocks)`` blocks (``MonarchLinear`` rejects an output width that leaves a block empty, e.g.
    6 outputs in 4 blocks of 2), or a dense layer when that gcd is 1. ``forward(x (N, in), adj)`` with ``adj`` an
    ``edge_index (2, E)`` or the sparse :func:`adjacency` (one fixed graph: the normalisation is cached)."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int, layer: str = "monarch", nblocks: int = 4,
                 dropout: float = 0.5):
        super().__init__()
        self.conv1 = monarch_gcn_conv(in_channels, hidden, layer, nblocks)
        nb2 = math.gcd(num_classes, nblocks)
        self.conv2 = monarch_gcn_conv(hidden, num_classes, layer if nb2 > 1 else "dense", max(nb2, 1))
        self.dropout = dropout

    @property
    def reg_params(self):
        return list(self.conv1.parameters())

    @property
    def non_reg_params(self):
        return list(self.conv2.parameters())

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = F.relu(self.conv1(x, adj))
        h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h, adj)


# ----------------------------------------------------------------------------------------------------------------
# TAM margins
# ----------------------------------------------------------------------------------------------------------------
def _check_graph_inputs(logits, edge_index, labels, train_mask, class_counts):
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (num_nodes, num_classes), got {tuple(logits.shape)}")
    n, c = logits.shape
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, num_edges), got {tuple(edge_index.shape)}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if train_mask.shape != (n,) or train_mask.dtype != torch.bool:
        raise ValueError(f"train_mask must be a bool tensor of shape ({n},), got {train_mask.dtype} "
                         f"{tuple(train_mask.shape)}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.shape != (c,):
        raise ValueError(f"class_counts must have shape ({c},), got {tuple(counts.shape)}")
    if bool((labels[train_mask] < 0).any()) or bool((labels[train_mask] >= c).any()):
        raise ValueError(f"labels of training nodes must lie in [0, {c})")
    present = torch.bincount(labels[train_mask], minlength=c)
    if bool((present == 0).any()):
        raise ValueError("every class needs at least one labelled training node")
    return counts


def mean_aggregate(x: Tensor, edge_index: Tensor) -> Tensor:
    """``out_v = mean_{u ∈ N(v) ∪ {v}} x_u`` (self-loops added, messages flow ``edge_index[0] → edge_index[1]``)."""
    ei, _ = add_self_loops(edge_index, num_nodes=x.size(0))
    return scatter(x[ei[0]], ei[1], dim=0, dim_size=x.size(0), reduce="mean")


def class_temperature(class_counts, phi: float = 1.2, delta: float = 0.4) -> Tensor:
    """``T_c = φ(π_c + 1 − max π)`` with ``π_c = δ n_c/Σn + (1 − δ)``; the pseudo-label softmax is
    ``softmax(T ⊙ l)``."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    pi = delta * n / n.sum() + (1 - delta)
    return phi * (pi + 1 - pi.max())


def js_divergence(a: Tensor, b: Tensor) -> Tensor:
    """Jensen–Shannon divergence ``½ Σ_k [a_k log(a_k/m_k) + b_k log(b_k/m_k)]``, ``m = (a + b)/2`` (last dim
    summed)."""
    m = (a + b) / 2
    return 0.5 * (torch.xlogy(a, a / m) + torch.xlogy(b, b / m)).sum(-1)


@torch.no_grad()
def neighbor_label_distribution(logits: Tensor, edge_index: Tensor, labels: Tensor, train_mask: Tensor,
                                class_counts, phi: float = 1.2, delta: float = 0.4) -> Tensor:
    """NLD ``p_v`` of every node, shape ``(num_nodes, C)`` (one-hot labels for training nodes, temperature-scaled
    softmax pseudo-labels elsewhere, mean over ``N(v) ∪ {v}``)."""
    _check_graph_inputs(logits, edge_index, labels, train_mask, class_counts)
    c = logits.shape[1]
    q = torch.softmax(logits.detach() * class_temperature(class_counts, phi, delta).to(logits), dim=1)
    q[train_mask] = F.one_hot(labels[train_mask], c).to(q.dtype)
    return mean_aggregate(q, edge_index)


@torch.no_grad()
def tam_margins(logits: Tensor, edge_index: Tensor, labels: Tensor, train_mask: Tensor, class_counts, *,
                phi: float = 1.2, delta: float = 0.4, eps: float = 1e-6):
    """``(log_acm, adm)`` for the training nodes, each ``(num_train, C)``: ``log_acm = log a ≤ 0`` and ``adm = b``
    (0 at the target class). The TAM margin is ``α·log_acm − β·adm``. ``logits (N, C)`` are the model's raw outputs
    for all nodes; ``train_mask (N,)`` bool; ``class_counts (C,)`` labelled nodes per class."""
    counts = _check_graph_inputs(logits, edge_index, labels, train_mask, class_counts)
    c = logits.shape[1]
    p = neighbor_label_distribution(logits, edge_index, labels, train_mask, counts, phi, delta)[train_mask]
    y = labels[train_mask]
    conn = torch.stack([p[y == k].mean(0) for k in range(c)])  # (C, C) class connectivity
    center = F.one_hot(y, c).bool()
    p, conn = p.clamp_min(eps), conn.clamp_min(eps)
    # ACM: (p_v[y]/C[y,y]) · (C[y,c']/p_v[c']) clipped at 1, = 1 at the target
    acm = (p[center] / conn.diagonal()[y]).unsqueeze(1) * (conn[y] / p)
    acm = acm.clamp(max=1.0).masked_fill(center, 1.0)
    # ADM: law-of-cosines position of p_v on the segment C_y -> C_c' in JS geometry
    d_cls = js_divergence(conn.unsqueeze(0), conn.unsqueeze(1)).clamp_min(eps)  # (C, C)
    d1 = js_divergence(p, conn[y]).unsqueeze(1)  # (n, 1)
    d3 = js_divergence(p.unsqueeze(1), conn.unsqueeze(0))  # (n, C)
    d2 = d_cls[y]
    adm = ((d1 ** 2 + d2 ** 2 - d3 ** 2) / (2 * d2 ** 2)).masked_fill(center, 0.0)
    return acm.log(), adm


class TAM:
    """Topology-aware margins for the training nodes' logits (pluggable into any loss on logits).

    ``adjust(logits, edge_index, labels, train_mask, class_counts, epoch)`` returns the training nodes' logits
    ``(num_train, C)``, plus ``α log a − β b`` once ``epoch > warmup`` (the margins carry no gradient)."""

    def __init__(self, alpha: float = 2.5, beta: float = 0.5, phi: float = 1.2, warmup: int = 5, delta: float = 0.4,
                 clip_adm: bool = False):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if phi <= 0 or not 0 <= delta <= 1:
            raise ValueError(f"need phi > 0 and delta in [0, 1], got {phi}, {delta}")
        self.alpha, self.beta, self.phi = alpha, beta, phi
        self.warmup, self.delta, self.clip_adm = warmup, delta, clip_adm

    def margins(self, logits, edge_index, labels, train_mask, class_counts) -> Tensor:
        log_acm, adm = tam_margins(logits, edge_index, labels, train_mask, class_counts, phi=self.phi, delta=self.delta)
        if self.clip_adm:
            adm = adm.clamp_min(0)
        return self.alpha * log_acm - self.beta * adm

    def adjust(self, logits, edge_index, labels, train_mask, class_counts, epoch: int) -> Tensor:
        out = logits[train_mask]
        if epoch > self.warmup:
            out = out + self.margins(logits, edge_index, labels, train_mask, class_counts).to(out.dtype)
        return out


def balanced_softmax_loss(logits: Tensor, labels: Tensor, class_counts) -> Tensor:
    """Balanced Softmax (Ren et al. 2020): ``CE(l + log n_c, y)`` with ``n_c`` the training count of class ``c``."""
    counts = torch.as_tensor(class_counts, dtype=logits.dtype, device=logits.device)
    if logits.dim() != 2 or counts.shape != (logits.shape[1],):
        raise ValueError(f"logits must be (n, C) and class_counts (C,), "
                         f"got {tuple(logits.shape)}, {tuple(counts.shape)}")
    return F.cross_entropy(logits + counts.log(), labels)


# ----------------------------------------------------------------------------------------------------------------
# data: contextual SBM with planted anomalous minority nodes
# ----------------------------------------------------------------------------------------------------------------
def make_csbm(num_nodes: int = 3000, num_classes: int = 6, num_features: int = 32, homophily: float = 0.7,
              avg_degree: float = 10.0, separation: float = 1.0, minor_classes: Sequence[int] = (3, 4, 5),
              anomaly_fraction: float = 0.25, seed: int = 0):
    """A contextual stochastic block model with balanced classes. Features ``x = μ_y + ε``, ``ε ~ N(0, I)``, class
    means at pairwise distance ``separation`` (in noise standard deviations). Every node draws ``avg_degree/2``
    edge stubs: with probability ``homophily`` to a uniform node of the same *home* group, else to a uniform node of
    another home group; edges are symmetrised and deduplicated. A node's home is its class, except for a fraction
    ``anomaly_fraction`` of each minor class, the *anomalous* nodes, whose home is a major class (the i-th minor
    class pairs with the i-th major class): their neighbourhood is mostly that major class while their features stay
    minor-class. Returns ``(x, edge_index, y, anomalous_mask)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_nodes) % num_classes
    y = y[torch.randperm(num_nodes, generator=g)]
    # class means: random orthonormal directions scaled so that ||μ_a − μ_b|| = separation
    q, _ = torch.linalg.qr(torch.randn(num_features, num_classes, generator=g))
    mu = q.T * (separation / math.sqrt(2))
    x = mu[y] + torch.randn(num_nodes, num_features, generator=g)
    minor = torch.tensor(list(minor_classes), dtype=torch.long)
    major = torch.tensor([c for c in range(num_classes) if c not in set(minor_classes)], dtype=torch.long)
    anomalous = torch.zeros(num_nodes, dtype=torch.bool)
    home = y.clone()
    for i, c in enumerate(minor.tolist()):
        idx = (y == c).nonzero().flatten()
        k = int(round(anomaly_fraction * len(idx)))
        pick = idx[torch.randperm(len(idx), generator=g)[:k]]
        anomalous[pick] = True
        home[pick] = major[i % len(major)]
    members = [(home == c).nonzero().flatten() for c in range(num_classes)]  # stubs land on home groups
    stubs = max(1, int(round(avg_degree / 2)))
    src = torch.arange(num_nodes).repeat_interleave(stubs)
    same = torch.rand(len(src), generator=g) < homophily
    other = torch.randint(0, num_classes - 1, (len(src),), generator=g)
    h = home[src]
    tgt_cls = torch.where(same, h, other + (other >= h).long())
    sizes = torch.tensor([len(m) for m in members])
    offs = (torch.rand(len(src), generator=g) * sizes[tgt_cls]).long()
    table = torch.full((num_classes, int(sizes.max())), -1, dtype=torch.long)
    for c, m in enumerate(members):
        table[c, :len(m)] = m
    dst = table[tgt_cls, offs]
    keep = src != dst
    ei = torch.stack([torch.cat([src[keep], dst[keep]]), torch.cat([dst[keep], src[keep]])])
    ei = torch.unique(ei, dim=1)
    return x, ei, y, anomalous


def imbalanced_split(y: Tensor, num_classes: int, minor_classes: Sequence[int], n_major: int = 20, n_minor: int = 2,
                     seed: int = 0, num_val_per_class: int = 0):
    """Labelled training mask with ``n_major`` nodes per major and ``n_minor`` per minor class (uniformly drawn);
    optional balanced validation mask; the test mask is every other node."""
    g = torch.Generator().manual_seed(seed + 12345)
    train = torch.zeros(len(y), dtype=torch.bool)
    val = torch.zeros(len(y), dtype=torch.bool)
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = n_minor if c in set(minor_classes) else n_major
        train[idx[:k]] = True
        val[idx[k:k + num_val_per_class]] = True
    return train, val, ~(train | val)


# ----------------------------------------------------------------------------------------------------------------
# the recipe: CE vs BS vs BS+TAM
# ----------------------------------------------------------------------------------------------------------------
METHODS = ("ce", "bs", "bs_tam")


def node_metrics(pred: Tensor, y: Tensor, num_classes: int) -> dict:
    yt, yp = y.numpy(), pred.numpy()
    return {"acc": float((pred == y).float().mean()), "bacc": float(balanced_accuracy_score(yt, yp)),
            "f1": float(f1_score(yt, yp, average="macro", labels=list(range(num_classes)), zero_division=0))}


def train_node_classifier(method: str, x: Tensor, adj: Tensor, edge_index: Tensor, y: Tensor, train_mask: Tensor,
                          num_classes: int, cfg, seed: int, tam: Optional[TAM] = None) -> tuple[Tensor, int]:
    """Full-batch training of a Monarch GCN with ``method`` ∈ {ce, bs, ce_tam, bs_tam} (TAM plugs into either
    loss); returns the final logits (eval mode) and the number of epochs run. ``adj`` is the GCN's input
    (:func:`adjacency`), ``edge_index`` the same graph for the TAM margins.

    Adam (lr 0.01, weight decay 5e-4 on the first layer only) as in the official ``main_bs.py``; unlike it, a fixed
    number of epochs (200, not 2000 with ReduceLROnPlateau) and the last epoch's model (no selection on a
    validation set, which would need more labelled minor nodes than the 2 per class of the setting)."""
    if method not in ("ce", "bs", "ce_tam", "bs_tam"):
        raise ValueError(f"method must be one of ce, bs, ce_tam, bs_tam, got {method!r}")
    use_tam, base = method.endswith("_tam"), method.split("_")[0]
    tam = tam or TAM()
    torch.manual_seed(seed)
    model = GCN(x.shape[1], cfg.hidden, num_classes, layer=cfg.layer, nblocks=cfg.nblocks, dropout=cfg.dropout)
    opt = torch.optim.Adam([dict(params=model.reg_params, weight_decay=cfg.weight_decay),
                            dict(params=model.non_reg_params, weight_decay=0.0)], lr=cfg.lr)
    counts = torch.bincount(y[train_mask], minlength=num_classes)
    y_tr = y[train_mask]

    def loss_fn(m, epoch):  # TAM switches on after its warm-up epochs
        out = m(x, adj)
        logits = tam.adjust(out, edge_index, y, train_mask, counts, epoch) if use_tam else out[train_mask]
        return F.cross_entropy(logits, y_tr) if base == "ce" else balanced_softmax_loss(logits, y_tr, counts)

    hist = fit(model, opt, lambda e: [(e + 1,)], epochs=cfg.epochs, loss_fn=loss_fn, prepare=lambda b: b)
    model.eval()
    with torch.no_grad():
        return model(x, adj), hist.epochs


@dataclass(frozen=True)
class Config:
    seeds: int = option(10, "number of seeds (seed, seed+1, ...)")
    nodes: int = option(3000, "graph size")
    features: int = option(32, "node feature dimension")
    separation: float = option(2.0, "class-mean distance in noise std")
    homophily: float = option(0.7, "share of edge stubs to the home group")
    degree: float = option(10.0, "average degree")
    anomaly_fraction: float = option(0.25, "share of minor nodes wired into a major class")
    n_major: int = option(20, "labelled nodes per major class")
    n_minor: int = option(2, "labelled nodes per minor class")
    hidden: int = option(64, "GCN width")
    layer: str = option("monarch", "GCN feature transforms", choices=("monarch", "blockdiag", "dense"))
    nblocks: int = option(4, "Monarch blocks")
    dropout: float = option(0.5, "dropout between the GCN layers")
    epochs: int = option(200, "full-batch training epochs")
    lr: float = option(0.01, "Adam learning rate")
    weight_decay: float = option(5e-4, "on the first layer only")
    tam_alpha: float = option(2.5, "ACM weight α")
    tam_beta: float = option(0.5, "ADM weight β")
    temp_phi: float = option(1.2, "pseudo-label temperature φ")
    warmup: int = option(5, "epochs before TAM switches on")
    control: bool = option(True, "also run the same seeds without anomalous nodes")


QUICK = {"seeds": 2, "nodes": 500, "epochs": 40, "control": False}
METHODS = ("ce", "bs", "bs_tam")
NUM_CLASSES, MINOR = 6, (3, 4, 5)


def run_setting(frac: float, cfg: Config, seed: int, tam: TAM, ctx: RunContext) -> dict:
    """CE, BS and BS+TAM on one graph (anomaly fraction ``frac``): test metrics and minor-class false positives
    (test nodes of major classes predicted as a minor class)."""
    x, ei, y, _ = make_csbm(cfg.nodes, NUM_CLASSES, cfg.features, cfg.homophily, cfg.degree, cfg.separation, MINOR,
                            frac, seed)
    train, _, test = imbalanced_split(y, NUM_CLASSES, MINOR, cfg.n_major, cfg.n_minor, seed)
    adj = adjacency(ei, len(x))
    is_major = torch.tensor([c not in MINOR for c in range(NUM_CLASSES)])
    out = {}
    for m in METHODS:
        logits, epochs = train_node_classifier(m, x, adj, ei, y, train, NUM_CLASSES, cfg, seed * 100 + 1, tam)
        pred = logits.argmax(1)
        out[m] = {**node_metrics(pred[test], y[test], NUM_CLASSES),
                  "minor_fp": int((test & is_major[y] & ~is_major[pred]).sum())}
        ctx.observe(nodes=len(x), epochs=epochs)
    return out


def run(cfg: Config, ctx: RunContext) -> dict:
    tam = TAM(cfg.tam_alpha, cfg.tam_beta, cfg.temp_phi, cfg.warmup)
    settings = {"anomalous": cfg.anomaly_fraction, **({"control": 0.0} if cfg.control else {})}
    per_seed = {s: [] for s in settings}
    for s, frac in settings.items():
        for seed in ctx.progress(seed_list(ctx.seed, cfg.seeds), desc=f"tam {s}"):
            per_seed[s].append(run_setting(frac, cfg, seed, tam, ctx))
            ctx.log(f"[{s}] seed {seed}: " + "  ".join(f"{m} bAcc {per_seed[s][-1][m]['bacc']:.3f} "
                                                       f"F1 {per_seed[s][-1][m]['f1']:.3f}" for m in METHODS))
    ctx.observe(seeds=len(per_seed["anomalous"]), control="control" in per_seed)
    summary = {s: {m: aggregate([r[m] for r in rs]) for m in METHODS} for s, rs in per_seed.items()}
    comparisons = {s: {f"{a}_minus_{b}": {k: paired([r[a][k] for r in rs], [r[b][k] for r in rs])
                                          for k in ("bacc", "f1", "minor_fp")}
                       for a, b in (("bs_tam", "bs"), ("bs", "ce"))} for s, rs in per_seed.items()}
    for s in settings:
        d = comparisons[s]["bs_tam_minus_bs"]["bacc"]
        ctx.log(f"{s}: BS+TAM − BS bAcc {format_mean_std(d, 4)} (TAM better on {d['positive']}/{d['n']} seeds)")
    plot_curves(ctx.plot_path("tam.png"), [
        Panel(title, kind="bar", groups={s: {m: summary[s][m][k] for m in METHODS} for s in settings})
        for k, title in (("bacc", "balanced accuracy"), ("f1", "macro-F1"))],
        title=f"Monarch-GCN on a contextual SBM ({cfg.nodes} nodes, 3 minor classes × {cfg.n_minor} labels), "
              f"{cfg.seeds} seeds")
    return {"methods": list(METHODS), "seeds": seed_list(ctx.seed, cfg.seeds), "summary": summary,
            "paired": comparisons, "per_seed": per_seed}


RECIPE = Recipe("tam", Config, run, quick=QUICK,
                description="TAM (Song et al. 2022): CE vs Balanced Softmax vs BS+TAM on a contextual SBM with "
                            "anomalous minor nodes")
