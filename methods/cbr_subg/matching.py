"""Case retrieval (simulated), the R-GCN that embeds query and case subgraphs, the structural distance to the
cases' answers, the TXent loss and hits@k (CBR-SUBG steps 1, 4–6)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn import RGCNConv

from ..models import linear
from .subgraphs import QueryGraph, Question


def question_embeddings(questions: Sequence[Question], num_types: int, noise: float,
                        generator: torch.Generator) -> Tensor:
    """Simulated masked-question embeddings: one-hot of the question type + ``noise``·N(0, I)."""
    types = torch.tensor([q.qtype for q in questions])
    return nn.functional.one_hot(types, num_types).float() + noise * torch.randn(len(questions), num_types,
                                                                                  generator=generator)


def knn(query: Tensor, keys: Tensor, k: int, exclude_self: bool = False) -> Tensor:
    """Indices ``(Q, k)`` of the ``k`` keys of highest cosine similarity to each query row."""
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query (Q, D) and keys (N, D) must share D, got {tuple(query.shape)}, {tuple(keys.shape)}")
    sim = nn.functional.normalize(query, dim=1) @ nn.functional.normalize(keys, dim=1).T
    if exclude_self:
        if query.shape[0] != keys.shape[0]:
            raise ValueError("exclude_self needs query and keys to be the same set")
        sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


class CaseGNN(nn.Module):
    """Monarch input projection + ``num_layers`` R-GCN layers (PyG ``RGCNConv``, mean aggregation).

    ``x (n, in_features)``, ``edge_index (2, E)``, ``edge_type (E,)`` in ``[0, num_relations)`` -> ``(n, dim)``.
    """

    def __init__(self, in_features: int, num_relations: int, dim: int = 32, num_layers: int = 3,
                 nblocks: int = 4, dropout: float = 0.0, input_layer: str = "monarch"):
        super().__init__()
        self.inp = linear(in_features, dim, input_layer, nblocks)
        self.convs = nn.ModuleList(RGCNConv(dim, dim, num_relations, aggr="mean") for _ in range(num_layers))
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor, edge_type: Tensor) -> Tensor:
        h = self.inp(x)
        for i, conv in enumerate(self.convs):
            h = conv(h, edge_index, edge_type)
            if i < len(self.convs) - 1:
                h = nn.functional.dropout(torch.relu(h), self.dropout, self.training)
        return h


def structural_distance(h_query: Tensor, case_answers: Sequence[Tensor]) -> Tensor:
    """``d(n) = mean_j mean_{a∈A_j} ‖h_n − h_a^{(j)}‖₂`` for query nodes ``h_query (n, d)`` and the answer
    embeddings ``(|A_j|, d)`` of each case ``j`` (cases with no answer are skipped). Returns ``(n,)``."""
    per_case = [torch.cdist(h_query, a).mean(1) for a in case_answers if a.shape[0] > 0]
    if not per_case:
        raise ValueError("case_answers holds no answer embedding")
    return torch.stack(per_case).mean(0)


def txent_loss(d: Tensor, answer_mask: Tensor, tau: float = 0.1, sample_mask: Optional[Tensor] = None) -> Tensor:
    """``−log Σ_{n∈Ans} e^{−d(n)/τ} + log Σ_{n∈S} e^{−d(n)/τ}``; ``S`` = all nodes unless ``sample_mask``
    (answers are always in ``S``)."""
    if d.dim() != 1 or answer_mask.shape != d.shape:
        raise ValueError(f"d must be (n,) and answer_mask (n,), got {tuple(d.shape)}, {tuple(answer_mask.shape)}")
    if not bool(answer_mask.any()):
        raise ValueError("answer_mask selects no node")
    logits = -d / tau
    s = torch.ones_like(answer_mask) if sample_mask is None else (sample_mask | answer_mask)
    return -torch.logsumexp(logits[answer_mask], 0) + torch.logsumexp(logits[s], 0)


def hits_at_k(scores: Tensor, answer_mask: Tensor, k: int, candidates: Optional[Tensor] = None) -> float:
    """Expected hits@k when candidates are ranked by ``scores`` (higher first) with ties broken uniformly at
    random: the probability that an answer is among the top ``k``. ``candidates`` masks nodes out of the
    ranking (e.g. the seeds). 0 when no answer is a candidate (answer missing from the subgraph)."""
    if scores.dim() != 1 or answer_mask.shape != scores.shape:
        raise ValueError("scores and answer_mask must both be (n,)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if candidates is not None:
        scores, answer_mask = scores[candidates], answer_mask[candidates]
    if not bool(answer_mask.any()):
        return 0.0
    best = scores[answer_mask].max()
    better = int((scores > best).sum())  # all non-answers
    if better >= k:
        return 0.0
    tied = scores == best
    g, t = int(tied.sum()), int((tied & answer_mask).sum())
    m = min(k - better, g)
    return 1.0 - math.comb(g - t, m) / math.comb(g, m)


def distance_heuristic_scores(graph: QueryGraph, case_graphs: Sequence[QueryGraph]) -> Tensor:
    """Baseline: prefer nodes whose distance to the seed equals the most common distance of the cases'
    answers to their seeds (``score = −|dist(n) − mode|``)."""
    dists = torch.cat([g.distance[g.answer_mask] for g in case_graphs]) if case_graphs else torch.tensor([])
    target = int(dists.mode().values) if dists.numel() else 1
    return -(graph.distance - target).abs().float()


def batch_graphs(graphs: Sequence[QueryGraph]) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Disjoint union: ``x``, ``edge_index``, ``edge_type`` and the node offset of each graph."""
    offsets, n = [], 0
    for g in graphs:
        offsets.append(n)
        n += g.num_nodes
    x = torch.cat([g.x for g in graphs])
    ei = torch.cat([g.edge_index + o for g, o in zip(graphs, offsets)], dim=1)
    et = torch.cat([g.edge_type for g in graphs])
    return x, ei, et, offsets


def match_batch(model: CaseGNN, queries: Sequence[QueryGraph], cases: Sequence[Sequence[QueryGraph]],
                device=None) -> list[Tensor]:
    """Embed every query and case graph in one pass; returns ``d(n)`` for each query's nodes."""
    unique, pos = [], {}
    for g in list(queries) + [c for cs in cases for c in cs]:
        if id(g) not in pos:
            pos[id(g)] = len(unique)
            unique.append(g)
    x, ei, et, offsets = batch_graphs(unique)
    dev = device or next(model.parameters()).device
    h = model(x.to(dev), ei.to(dev), et.to(dev))
    out = []
    for q, cs in zip(queries, cases):
        o = offsets[pos[id(q)]]
        hq = h[o:o + q.num_nodes]
        answers = [h[offsets[pos[id(c)]]:offsets[pos[id(c)]] + c.num_nodes][c.answer_mask.to(dev)] for c in cs]
        out.append(structural_distance(hq, answers))
    return out
