"""CBR-SUBG: knowledge-base question answering by case-based reasoning over subgraphs
(Das, Godbole, Naik, Tower, Jia, Zaheer, Hajishirzi & McCallum, ICML 2022).

The pipeline, for a query question ``q`` with seed (topic) entities ``S_q``:

1. **Retrieve cases** (:func:`knn`): the ``K`` training questions most cosine-similar to ``q``. The paper
   embeds questions with RoBERTa, entity mentions masked, so similarity reflects the relational structure;
   here the retrieval is **simulated**: a question's embedding is a one-hot of its (hidden) question type plus
   Gaussian noise, so some retrieved cases have the wrong type (the run reports the kNN type precision).
2. **Adaptive subgraph** (:func:`find_chains`, :func:`follow_chains`, :func:`collect_subgraph`): for each
   case, the relation chains (length ≤ ``max_len``) that lead from its seed to one of its answers in the KB;
   their union is executed from ``S_q`` and every triple on a complete walk is kept
   (``adaptive_subgraph_collection``). Gold answers absent from the subgraph count as misses.
3. **Entity-agnostic node features** (:func:`node_features`): multi-hot of the relation types incident to
   the node (outgoing and inverse) + one-hot of the undirected shortest distance to a seed
   (``0..max_dist``, capped; unreachable = ``max_dist``). No entity ids, so unseen entities are fine.
4. **R-GCN** (:class:`CaseGNN`): a Monarch input projection (:class:`monarch_kernels.layers.MonarchLinear`) to width ``d``,
   then ``L`` PyG :class:`torch_geometric.nn.RGCNConv` layers (mean aggregation, root weight, inverse
   edges added as extra relation types), ReLU (+dropout) between layers and none after the last. The same
   network embeds the query graph and every case graph.
5. **Structural matching** (:func:`structural_distance`, :func:`txent_loss`): for query node ``n``,
   ``d(n) = mean_j mean_{a ∈ A_j} ‖h_n − h_a^{(j)}‖₂`` over the cases ``j`` and their answers ``A_j``;
   the loss is ``L = −log Σ_{n∈Ans} e^{−d(n)/τ} + log Σ_{n∈S} e^{−d(n)/τ}`` (``S`` = all query nodes).
6. **Answer ranking**: nodes by ``d(n)`` ascending (seed entities excluded), hits@1/3/10
   (:func:`hits_at_k`, with exact expected value under random tie-breaking).

Data (:func:`synthetic_questions`, :func:`kg_questions`):

* the official synthetic generator's design (``scripts/create_synthetic_types.py``,
  ``sample_synthetic_graph.py``, ``sample_synthetic_data.py``): a random typed schema (relation
  ``r.ti.tj`` allowed with probability ``p``), grounded query patterns of types 2p/3p/2i/ip/pi, and for every
  question its own random graph (``max_size // n_types`` entities per type, depth-3 expansion with edge
  probability 0.4) with the pattern planted; entities are unique to their question, so every test
  question's entities are unseen in training; a question's KB is its own graph;
* path questions (1-hop and 2-hop relation paths, 1..``max_answers`` answers) over the Kinships, Nations or
  UMLS triples of the pykeen wheel (:func:`methods.data.load_kg_triples`); test questions start from seed
  entities that are never a training question's seed.

Where this follows / deviates from rajarshd/CBR-SUBG: features, distance aggregation (mean of means),
TXent, inverse edges, width 32 and 3 layers follow ``src/``; the official kNN uses RoBERTa (simulated here),
the official R-GCN is PyG's FastRGCNConv (same maths as RGCNConv), training uses one query at a time with
gradient accumulation (here mini-batches of queries in one disjoint-union graph), the input projection is
Monarch instead of ``nn.Linear``, and chain execution keeps every branch (the official code samples at most
100 per step). Baselines in the same run: a distance-from-seed heuristic on the same subgraphs, random
(wrong-type) cases instead of the kNN, and chance.
"""
from __future__ import annotations

import math
import random as _random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.nn import RGCNConv

from .data import load_kg_triples
from .models import linear
from .recipe import Recipe, option, seed_list
from .report import Panel, aggregate, format_mean_std, paired, plot_curves
from .train import fit

# ---------------------------------------------------------------------------------------------------------
# knowledge base, relation chains, subgraphs


class KB:
    """A set of ``(head, relation, tail)`` triples with forward adjacency ``(head, relation) -> {tails}``."""

    def __init__(self, triples: Iterable[tuple]):
        self.triples = sorted(set(tuple(t) for t in triples))
        for t in self.triples:
            if len(t) != 3:
                raise ValueError(f"triples must be (head, relation, tail), got {t!r}")
        self.adj: dict[tuple, set] = defaultdict(set)
        self.out_rels: dict = defaultdict(set)
        for h, r, t in self.triples:
            self.adj[(h, r)].add(t)
            self.out_rels[h].add(r)

    def step(self, nodes: Iterable, relation) -> set:
        """All ``t`` with ``(n, relation, t)`` for some ``n`` in ``nodes``."""
        out = set()
        for n in nodes:
            out |= self.adj.get((n, relation), set())
        return out

    def entities(self) -> set:
        return {h for h, _, _ in self.triples} | {t for _, _, t in self.triples}


def find_chains(kb: KB, seed, answers: Iterable, max_len: int = 2) -> set[tuple]:
    """Relation chains ``(r1, …, rl)``, ``l ≤ max_len``, for which some walk from ``seed`` ends in an answer.

    Executed breadth-first on node *sets*: the frontier of a prefix is every node a walk with that relation
    sequence reaches, so the result is exactly the set of relation sequences of seed→answer walks.
    """
    answers = set(answers)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    chains = set()
    frontier = [((), {seed})]
    for _ in range(max_len):
        nxt = []
        for prefix, nodes in frontier:
            rels = set().union(*(kb.out_rels.get(n, set()) for n in nodes))
            for r in sorted(rels, key=str):
                reached = kb.step(nodes, r)
                if reached & answers:
                    chains.add(prefix + (r,))
                nxt.append((prefix + (r,), reached))
        frontier = nxt
    return chains


def follow_chains(kb: KB, seeds: Iterable, chains: Iterable[Sequence]) -> set[tuple]:
    """Execute every chain from every seed; returns the triples that lie on a *complete* walk (a walk that
    follows the whole chain), as the official ``get_subgraph_spanned_by_chain``."""
    triples = set()
    for seed in seeds:
        for chain in chains:
            levels = [{seed}]
            for r in chain:
                levels.append(kb.step(levels[-1], r))
            if not levels[-1]:
                continue
            keep = levels[-1]
            for depth in range(len(chain) - 1, -1, -1):  # backward: keep nodes that continue the walk
                r = chain[depth]
                prev = set()
                for u in levels[depth]:
                    hit = kb.adj.get((u, r), set()) & keep
                    for v in hit:
                        triples.add((u, r, v))
                    if hit:
                        prev.add(u)
                keep = prev
    return triples


@dataclass
class Question:
    """A KBQA question: seeds, gold answers, its (hidden) type, and the KB it is asked against."""

    qid: str
    qtype: int
    seeds: tuple
    answers: frozenset
    kb: KB = field(repr=False)


@dataclass
class QueryGraph:
    """A question's subgraph as tensors (local node ids; inverse edges have relation id ``r + R``)."""

    nodes: list
    edge_index: Tensor  # (2, 2E)
    edge_type: Tensor  # (2E,)
    seed_mask: Tensor  # (n,) bool
    answer_mask: Tensor  # (n,) bool: gold answers present in the subgraph
    n_gold: int
    x: Tensor  # (n, 2R + max_dist + 1) entity-agnostic features
    distance: Tensor  # (n,) capped distance to the nearest seed

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


def seed_distances(num_nodes: int, edge_index: Tensor, seed_mask: Tensor, max_dist: int = 3) -> Tensor:
    """Undirected shortest-path distance to the nearest seed, capped at ``max_dist`` (also for unreachable)."""
    dist = torch.full((num_nodes,), max_dist, dtype=torch.long)
    dist[seed_mask] = 0
    nbrs = defaultdict(set)
    for u, v in edge_index.t().tolist():
        nbrs[u].add(v)
        nbrs[v].add(u)
    frontier = set(seed_mask.nonzero().flatten().tolist())
    seen = set(frontier)
    for d in range(1, max_dist):
        frontier = {v for u in frontier for v in nbrs[u]} - seen
        seen |= frontier
        for v in frontier:
            dist[v] = d
    return dist


def node_features(num_nodes: int, edge_index: Tensor, edge_type: Tensor, num_edge_types: int,
                  seed_mask: Tensor, max_dist: int = 3, normalize: bool = True) -> Tensor:
    """Entity-agnostic node features ``(n, num_edge_types + max_dist + 1)``: a multi-hot of the relation
    types leaving the node (inverse edges included, so incoming relations count as their inverses) and a
    one-hot of the capped distance to the nearest seed.

    With ``normalize`` the relation bag is scaled to unit L2 norm (a deviation from the official raw
    multi-hot): in dense KBs (Nations: up to 110 incident types per node) the raw bag makes the initial
    embeddings and distances huge, and TXent at τ = 0.1 then sometimes collapses to identical embeddings."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_type.shape != (edge_index.shape[1],):
        raise ValueError("edge_index must be (2, E) and edge_type (E,)")
    bag = torch.zeros(num_nodes, num_edge_types)
    if edge_index.numel():
        bag[edge_index[0], edge_type] = 1.0
    if normalize:
        bag = bag / bag.norm(dim=1, keepdim=True).clamp_min(1.0)
    dist = seed_distances(num_nodes, edge_index, seed_mask, max_dist)
    return torch.cat([bag, nn.functional.one_hot(dist, max_dist + 1).float()], dim=1)


def build_graph(triples: Iterable[tuple], seeds: Sequence, answers: Iterable, rel2id: dict,
                max_dist: int = 3, normalize_bag: bool = True) -> QueryGraph:
    """Tensors of a subgraph: seeds are always nodes; inverse edges are added (type ``r + R``)."""
    triples = sorted(set(triples), key=str)
    nodes = list(dict.fromkeys(list(seeds) + [e for h, _, t in triples for e in (h, t)]))
    index = {e: i for i, e in enumerate(nodes)}
    R = len(rel2id)
    missing = {r for _, r, _ in triples if r not in rel2id}
    if missing:
        raise ValueError(f"relations {sorted(missing, key=str)[:5]} are not in rel2id")
    src = [index[h] for h, _, _ in triples]
    dst = [index[t] for _, _, t in triples]
    typ = [rel2id[r] for _, r, _ in triples]
    edge_index = torch.tensor([src + dst, dst + src], dtype=torch.long).view(2, -1)
    edge_type = torch.tensor(typ + [t + R for t in typ], dtype=torch.long)
    seed_mask = torch.zeros(len(nodes), dtype=torch.bool)
    seed_mask[[index[s] for s in seeds]] = True
    answers = set(answers)
    answer_mask = torch.tensor([e in answers for e in nodes], dtype=torch.bool) & ~seed_mask
    x = node_features(len(nodes), edge_index, edge_type, 2 * R, seed_mask, max_dist, normalize_bag)
    dist = x[:, 2 * R:].argmax(1)
    return QueryGraph(nodes, edge_index, edge_type, seed_mask, answer_mask, len(answers), x, dist)


def collect_subgraph(question: Question, cases: Sequence[Question], chains_of: dict, rel2id: dict,
                     max_dist: int = 3) -> QueryGraph:
    """The adaptive query subgraph: the union of the cases' chains (``chains_of[qid]``) executed from the
    question's seeds in the question's KB."""
    chains = set().union(*(chains_of[c.qid] for c in cases)) if cases else set()
    triples = follow_chains(question.kb, question.seeds, chains)
    return build_graph(triples, question.seeds, question.answers, rel2id, max_dist)


# ---------------------------------------------------------------------------------------------------------
# retrieval


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


# ---------------------------------------------------------------------------------------------------------
# model, loss, ranking


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


# ---------------------------------------------------------------------------------------------------------
# data: the official synthetic design and path questions over the pykeen KGs

PATTERN_TYPES = ("2p", "3p", "2i", "ip", "pi")


def sample_schema(n_types: int, p: float, rng: _random.Random) -> dict:
    """Random typed schema (``create_synthetic_types.py``): relation ``r.ti.tj`` exists with prob ``p``.
    Returns ``{type: [(relation, tail type), ...]}``."""
    allowed = {}
    for i in range(n_types):
        for j in range(n_types):
            if i != j and rng.random() < p:
                allowed.setdefault(f"t{i}", []).append((f"r.t{i}.t{j}", f"t{j}"))
    return allowed


def ground_pattern(ptype: str, allowed: dict, rng: _random.Random, tries: int = 200):
    """A grounded pattern: ``(ptype, relations, seed types)``; retried until the schema allows it."""
    out_of = lambda t, avoid=(): [e for e in allowed.get(t, []) if e[1] not in avoid]
    into = lambda t, avoid=(): [(s, r) for s, es in allowed.items() for r, tt in es if tt == t and s not in avoid]
    for _ in range(tries):
        src = rng.choice(sorted(allowed))
        r1, t1 = rng.choice(allowed[src])
        if ptype in ("2p", "3p", "pi"):
            c = out_of(t1, (src,))
            if not c:
                continue
            r2, t2 = rng.choice(c)
            if ptype == "2p":
                return ptype, (r1, r2), (src,)
            if ptype == "3p":
                c = out_of(t2, (src, t1))
                if c:
                    return ptype, (r1, r2, rng.choice(c)[0]), (src,)
                continue
            c = into(t2, (src, t1))  # pi: e0 -r1-> x0 -r2-> ans <-r3- e1
            if c:
                src2, r3 = rng.choice(c)
                return ptype, (r1, r2, r3), (src, src2)
            continue
        c = into(t1, (src,))  # 2i / ip: e0 -r1-> x <-r2- e1
        if not c:
            continue
        src2, r2 = rng.choice(c)
        if ptype == "2i":
            return ptype, (r1, r2), (src, src2)
        c = out_of(t1, (src, src2))
        if c:
            return ptype, (r1, r2, rng.choice(c)[0]), (src, src2)
    raise ValueError(f"the schema admits no {ptype} pattern")


def execute_pattern(kb: KB, ptype: str, rels: tuple, seeds: tuple) -> set:
    """Answers of a grounded pattern on ``kb``."""
    if ptype in ("2p", "3p"):
        nodes = {seeds[0]}
        for r in rels:
            nodes = kb.step(nodes, r)
        return nodes
    if ptype == "2i":
        return kb.step({seeds[0]}, rels[0]) & kb.step({seeds[1]}, rels[1])
    if ptype == "ip":
        return kb.step(kb.step({seeds[0]}, rels[0]) & kb.step({seeds[1]}, rels[1]), rels[2])
    if ptype == "pi":
        return kb.step(kb.step({seeds[0]}, rels[0]), rels[1]) & kb.step({seeds[1]}, rels[2])
    raise ValueError(f"unknown pattern type {ptype!r}; expected one of {PATTERN_TYPES}")


def sample_question_graph(allowed: dict, pattern, prefix: str, rng: _random.Random, max_size: int = 40,
                          max_depth: int = 3, p: float = 0.4) -> tuple[list, tuple, set]:
    """One question's graph (``sample_synthetic_data.get_graph``): seed entities, ``max_size // n_types``
    entities per type, depth-``max_depth`` random expansion from the seeds with edge probability ``p``, the
    pattern planted (edges added where it has no binding), isolated entities pruned.
    Returns ``(triples, seeds, answers)``."""
    ptype, rels, seed_types = pattern
    types = sorted({t for t in allowed} | {tt for es in allowed.values() for _, tt in es}, key=lambda s: int(s[1:]))
    ent_type, by_type = {}, defaultdict(list)
    seeds = tuple(f"{prefix}s{i}" for i in range(len(seed_types)))
    for s, t in zip(seeds, seed_types):
        ent_type[s] = t
        by_type[t].append(s)
    per_type = max(1, max_size // len(types))
    for t in types:
        for _ in range(per_type):
            e = f"{prefix}e{len(ent_type)}"
            ent_type[e] = t
            by_type[t].append(e)
    edges = set()
    expanded = set()

    def expand(e, depth):
        if depth == 0 or e in expanded or ent_type[e] not in allowed:
            return
        expanded.add(e)
        for r, tt in allowed[ent_type[e]]:
            for tail in list(by_type[tt]):
                if rng.random() < p:
                    edges.add((e, r, tail))
                    expand(tail, depth - 1)

    for s in seeds:
        expand(s, max_depth)

    def step(nodes, r):
        return {t for (h, rr, t) in edges if rr == r and h in nodes}

    def tail_type(r):
        return r.split(".")[2]

    def chain(nodes, rs):  # follow relations, planting an edge wherever the walk dies
        for r in rs:
            nxt = step(nodes, r)
            if not nxt:
                u, v = rng.choice(sorted(nodes)), rng.choice(by_type[tail_type(r)])
                edges.add((u, r, v))
                nxt = {v}
            nodes = nxt
        return nodes

    def meet(a_nodes, seed, r):  # make seed -r-> (some node of a_nodes)
        if not (step({seed}, r) & a_nodes):
            edges.add((seed, r, rng.choice(sorted(a_nodes))))
        return step({seed}, r) & a_nodes

    if ptype in ("2p", "3p"):
        chain({seeds[0]}, rels)
    elif ptype == "2i":
        meet(chain({seeds[0]}, rels[:1]), seeds[1], rels[1])
    elif ptype == "ip":
        chain(meet(chain({seeds[0]}, rels[:1]), seeds[1], rels[1]), rels[2:])
    else:  # pi
        meet(chain({seeds[0]}, rels[:2]), seeds[1], rels[2])
    kb = KB(edges)
    answers = execute_pattern(kb, ptype, rels, seeds) - set(seeds)
    return sorted(edges), seeds, answers


def synthetic_questions(n_patterns: int, n_train: int, n_test: int, rng: _random.Random, n_types: int = 8,
                        schema_p: float = 0.4, max_size: int = 40, max_depth: int = 3, p: float = 0.4):
    """Train/test questions of ``n_patterns`` grounded patterns (types drawn from :data:`PATTERN_TYPES`),
    each question with its own graph and its own entities. Returns ``(train, test, rel2id, pattern names)``."""
    allowed = sample_schema(n_types, schema_p, rng)
    rel2id = {r: i for i, r in enumerate(sorted({r for es in allowed.values() for r, _ in es}))}
    patterns = [ground_pattern(rng.choice(PATTERN_TYPES), allowed, rng) for _ in range(n_patterns)]
    splits = {"train": [], "test": []}
    for pid, pat in enumerate(patterns):
        for split, n in (("train", n_train), ("test", n_test)):
            made = 0
            while made < n:
                prefix = f"{split}{pid}_{made}_"
                triples, seeds, answers = sample_question_graph(allowed, pat, prefix, rng, max_size, max_depth, p)
                if not answers:
                    continue
                splits[split].append(Question(prefix[:-1], pid, seeds, frozenset(answers), KB(triples)))
                made += 1
    names = [f"{t}:{'/'.join(r)}" for t, r, _ in patterns]
    return splits["train"], splits["test"], rel2id, names


def kg_questions(triples: Sequence[tuple], n_types: int, n_train: int, n_test: int, rng: _random.Random,
                 max_answers: int = 5, test_entity_fraction: float = 0.3, hops: Sequence[int] = (1, 2),
                 min_train: int = 5, min_test: int = 2):
    """Path questions over one KB: a type is a relation path (1 or 2 hops); a question is a seed entity and
    the entities the path reaches (1..``max_answers`` of them, seed excluded). Seeds of test questions are
    entities never used as a training seed. A type takes ``n_train``/``n_test`` questions, or all its
    groundings when it has fewer (small KBs such as Nations, 14 entities), but at least
    ``min_train``/``min_test``. Returns ``(train, test, rel2id, type names)``."""
    kb = KB(triples)
    rel2id = {r: i for i, r in enumerate(sorted({r for _, r, _ in kb.triples}))}
    entities = sorted(kb.entities(), key=str)
    shuffled = entities[:]
    rng.shuffle(shuffled)
    n_test_ent = max(1, int(round(test_entity_fraction * len(entities))))
    train_ents = set(shuffled[n_test_ent:])
    rels = sorted(rel2id)
    candidates = [(r,) for r in rels] if 1 in hops else []
    if 2 in hops:
        candidates += [(r1, r2) for r1 in rels for r2 in rels]
    rng.shuffle(candidates)
    train, test, names = [], [], []
    for path in candidates:
        if len(names) == n_types:
            break
        grounded = {"train": [], "test": []}
        for e in entities:
            nodes = {e}
            for r in path:
                nodes = kb.step(nodes, r)
            nodes.discard(e)
            if 1 <= len(nodes) <= max_answers:
                grounded["train" if e in train_ents else "test"].append((e, frozenset(nodes)))
        if len(grounded["train"]) < min(n_train, min_train) or len(grounded["test"]) < min(n_test, min_test):
            continue
        tid = len(names)
        names.append("/".join(path))
        for split, n, out in (("train", n_train, train), ("test", n_test, test)):
            for i, (e, ans) in enumerate(rng.sample(grounded[split], min(n, len(grounded[split])))):
                out.append(Question(f"{split}{tid}_{i}", tid, (e,), ans, kb))
    if len(names) < n_types:
        raise ValueError(f"only {len(names)} relation paths have {min_train}+{min_test} groundings; "
                         "lower n_types")
    return train, test, rel2id, names


# ---------------------------------------------------------------------------------------------------------
# the experiment


DATASETS = ("synthetic", "umls", "nations", "kinships")
METHODS = ("cbr_subg", "random_cases", "distance_heuristic", "chance")
KS = (1, 3, 10)


@dataclass(frozen=True)
class Config:
    datasets: tuple[str, ...] = option(DATASETS, "question sets", choices=DATASETS)
    seeds: int = option(3, "replicates per dataset (seed, seed+1, ...: fresh questions, kNN noise, init)")
    types: int = option(10, "question types (patterns / relation paths)")
    train_per_type: int = option(30, "training questions per type")
    test_per_type: int = option(10, "test questions per type")
    k_collect: int = option(5, "cases whose chains build the query subgraph")
    k_train: int = option(5, "cases matched per training query (from the top k+5)")
    k_eval: int = option(5, "cases matched per test query")
    noise: float = option(0.3, "std of the simulated question-embedding noise")
    dim: int = option(32, "R-GCN width")
    layers: int = option(3, "R-GCN layers")
    nblocks: int = option(4, "Monarch blocks of the input projection")
    tau: float = option(0.1, "TXent temperature")
    lr: float = option(3e-3, "AdamW learning rate")
    epochs: int = option(8, "training epochs")
    batch_size: int = option(8, "queries per step")
    max_answers: int = option(5, "KG path questions: most answers per question")


QUICK = {"types": 4, "train_per_type": 12, "test_per_type": 5, "epochs": 3, "datasets": ("synthetic", "umls"),
         "seeds": 1}


def prepare_questions(dataset: str, cfg: Config, rng: _random.Random):
    """``(train, test, rel2id, type names, max chain length)`` of one question set."""
    if dataset == "synthetic":
        train, test, rel2id, names = synthetic_questions(cfg.types, cfg.train_per_type, cfg.test_per_type, rng)
        return train, test, rel2id, names, 3
    d = load_kg_triples(dataset)
    train, test, rel2id, names = kg_questions(d["train"] + d["valid"] + d["test"], cfg.types, cfg.train_per_type,
                                              cfg.test_per_type, rng, max_answers=cfg.max_answers)
    return train, test, rel2id, names, 2


def train_matcher(train: list, graphs: dict, nn_train: Tensor, usable: list, rel2id: dict, cfg: Config,
                  gen: torch.Generator, ctx) -> tuple[CaseGNN, list]:
    """TXent training of the case matcher: each step embeds a mini-batch of training queries with ``k_train``
    cases drawn from their top ``k_train + 5`` neighbours (those whose subgraph holds an answer)."""
    k_pool, usable_set = cfg.k_train + 5, set(usable)
    model = CaseGNN(graphs[train[0].qid].x.shape[1], 2 * len(rel2id), cfg.dim, cfg.layers, cfg.nblocks).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def batches(_epoch):
        order = [usable[i] for i in torch.randperm(len(usable), generator=gen).tolist()]
        for start in range(0, len(order), cfg.batch_size):
            qs, cs = [], []
            for i in order[start:start + cfg.batch_size]:
                pool = [int(j) for j in nn_train[i, :k_pool] if int(j) in usable_set]
                if pool:
                    qs.append(graphs[train[i].qid])
                    cs.append([graphs[train[pool[p]].qid]
                               for p in torch.randperm(len(pool), generator=gen)[:cfg.k_train].tolist()])
            if qs:
                yield qs, cs

    def loss_fn(m, qs, cs):
        ds = match_batch(m, qs, cs, ctx.device)
        return torch.stack([txent_loss(d, q.answer_mask.to(d.device), cfg.tau) for d, q in zip(ds, qs)]).mean()

    hist = fit(model, opt, batches, epochs=cfg.epochs, loss_fn=loss_fn, clip_grad_norm=1.0, prepare=lambda b: b,
               progress=ctx.progress, desc="train")
    ctx.observe(epochs=hist.epochs, dim=model.inp.out_features)
    return model, hist.losses


def run_dataset(dataset: str, cfg: Config, ctx, seed: int) -> dict:
    """One replicate on one dataset: fresh questions, kNN noise, model init and training order from ``seed``.
    Test questions are scored by CBR-SUBG with its kNN cases, by the same model with random wrong-type cases, by a
    distance-from-seed heuristic and by chance; ``*_covered`` restricts hits@1 to questions whose subgraph holds
    an answer (random cases build smaller subgraphs that often miss the answer)."""
    rng = _random.Random(seed * 7919 + sum(map(ord, dataset)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, test, rel2id, names, max_len = prepare_questions(dataset, cfg, rng)
    ctx.observe(types=len(names))
    if dataset == "synthetic":  # KG path types take all their groundings when they have fewer than asked
        ctx.observe(train_per_type=max(Counter(q.qtype for q in train).values()),
                    test_per_type=max(Counter(q.qtype for q in test).values()))
    chains_of = {q.qid: set().union(*(find_chains(q.kb, s, q.answers, max_len) for s in q.seeds)) for q in train}
    emb_train = question_embeddings(train, len(names), cfg.noise, gen)
    emb_test = question_embeddings(test, len(names), cfg.noise, gen)
    nn_train = knn(emb_train, emb_train, max(cfg.k_train + 5, cfg.k_collect), exclude_self=True)
    nn_test = knn(emb_test, emb_train, max(cfg.k_eval, cfg.k_collect))
    knn_precision = float((torch.tensor([q.qtype for q in train])[nn_test[:, :cfg.k_eval]]
                           == torch.tensor([q.qtype for q in test])[:, None]).float().mean())
    graphs = {q.qid: collect_subgraph(q, [train[j] for j in nn_train[i, :cfg.k_collect]], chains_of, rel2id)
              for i, q in enumerate(ctx.progress(train, desc=f"{dataset}: subgraphs"))}
    usable = [i for i, q in enumerate(train) if graphs[q.qid].answer_mask.any()]
    usable_set = set(usable)
    model, losses = train_matcher(train, graphs, nn_train, usable, rel2id, cfg, gen, ctx)
    model.eval()
    res = {m: {k: [] for k in KS} for m in METHODS}
    coverage, sizes = {"knn": [], "random": []}, []
    train_types = torch.tensor([q.qtype for q in train])
    with torch.no_grad():
        for i, q in enumerate(ctx.progress(test, desc=f"{dataset}: test")):
            g = collect_subgraph(q, [train[int(j)] for j in nn_test[i, :cfg.k_collect]], chains_of, rel2id)
            match = [graphs[train[int(j)].qid] for j in nn_test[i, :cfg.k_eval] if int(j) in usable_set]
            wrong = (train_types != q.qtype).nonzero().flatten()
            wrong = wrong[torch.randperm(len(wrong), generator=gen)[:max(cfg.k_collect, cfg.k_eval)]].tolist()
            g_rand = collect_subgraph(q, [train[j] for j in wrong[:cfg.k_collect]], chains_of, rel2id)
            match_rand = [graphs[train[j].qid] for j in wrong[:cfg.k_eval] if j in usable_set]
            coverage["knn"].append(float(g.answer_mask.any()))
            coverage["random"].append(float(g_rand.answer_mask.any()))
            sizes.append(g.num_nodes)
            cand, cand_r = ~g.seed_mask, ~g_rand.seed_mask
            s_model = -match_batch(model, [g], [match], ctx.device)[0].cpu() if match else torch.zeros(g.num_nodes)
            s_rand = (-match_batch(model, [g_rand], [match_rand], ctx.device)[0].cpu() if match_rand
                      else torch.zeros(g_rand.num_nodes))
            for k in KS:
                res["cbr_subg"][k].append(hits_at_k(s_model, g.answer_mask, k, cand))
                res["random_cases"][k].append(hits_at_k(s_rand, g_rand.answer_mask, k, cand_r))
                res["distance_heuristic"][k].append(hits_at_k(distance_heuristic_scores(g, match), g.answer_mask, k,
                                                              cand))
                res["chance"][k].append(hits_at_k(torch.zeros(g.num_nodes), g.answer_mask, k, cand))
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731

    def covered(method, cov):
        return mean([h for h, c in zip(res[method][1], coverage[cov]) if c])

    out = {m: {f"hits@{k}": mean(v[k]) for k in KS} for m, v in res.items()}
    out["cbr_subg"]["hits@1_covered"] = covered("cbr_subg", "knn")
    out["random_cases"]["hits@1_covered"] = covered("random_cases", "random")
    out.update({"question_types": names, "n_train": len(train), "n_train_usable": len(usable), "n_test": len(test),
                "knn_type_precision": knn_precision, "answer_coverage_knn": mean(coverage["knn"]),
                "answer_coverage_random_cases": mean(coverage["random"]), "mean_subgraph_nodes": mean(sizes),
                "test_entities_unseen_as_train_seeds": not ({s for q in test for s in q.seeds}
                                                            & {s for q in train for s in q.seeds}),
                "loss_first": losses[0] if losses else float("nan"), "loss_last": mean(losses[-10:]),
                "losses": losses})
    ctx.log(f"[cbr_subg] {dataset} seed {seed}: hits@1 CBR-SUBG {out['cbr_subg']['hits@1']:.3f} | random cases "
            f"{out['random_cases']['hits@1']:.3f} | distance heuristic {out['distance_heuristic']['hits@1']:.3f} | "
            f"chance {out['chance']['hits@1']:.3f} (coverage kNN {out['answer_coverage_knn']:.2f} / random "
            f"{out['answer_coverage_random_cases']:.2f}, kNN type precision {knn_precision:.2f})")
    return out


def run(cfg: Config, ctx) -> dict:
    seeds = seed_list(ctx.seed, cfg.seeds)
    runs = {d: [run_dataset(d, cfg, ctx, s) for s in seeds] for d in cfg.datasets}
    ctx.observe(datasets=list(runs), seeds=len(runs[cfg.datasets[0]]))
    summary = {d: aggregate([{k: v for k, v in r.items() if k != "losses"} for r in rs]) for d, rs in runs.items()}
    comparisons = {d: {f"cbr_subg_minus_{b}": paired([r["cbr_subg"]["hits@1"] for r in rs], [r[b]["hits@1"] for r in rs])
                       for b in METHODS[1:]} for d, rs in runs.items()}
    for d in cfg.datasets:
        ctx.log(f"[cbr_subg] {d}, hits@1: " + " | ".join(f"{m} {format_mean_std(summary[d][m]['hits@1'])}"
                                                         for m in METHODS))
    plot_curves(ctx.plot_path("cbr_subg.png"), [
        Panel(f"{d} (test: unseen entities, {len(seeds)} seeds)", kind="bar", ylim=(0, 1),
              groups={m: {f"hits@{k}": summary[d][m][f"hits@{k}"] for k in KS} for m in METHODS})
        for d in cfg.datasets] + [
        Panel(f"TXent training loss (seed {seeds[0]})", {d: (range(len(rs[0]["losses"])), rs[0]["losses"])
                                                         for d, rs in runs.items()}, xlabel="step", logy=True)])
    return {"seeds": seeds, "summary": summary, "paired": comparisons,
            "runs": {d: [{k: v for k, v in r.items() if k != "losses"} for r in rs] for d, rs in runs.items()}}


RECIPE = Recipe("cbr_subg", Config, run, quick=QUICK,
                description="CBR-SUBG (Das et al. 2022): kNN cases, adaptive subgraphs, R-GCN structural matching "
                            "for KBQA")
