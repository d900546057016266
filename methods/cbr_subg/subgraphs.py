"""The knowledge base, relation chains from a case's seed to its answers, the adaptive subgraph they span from a
query's seeds, and its entity-agnostic node features (CBR-SUBG steps 2–3)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn



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
