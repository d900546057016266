"""Question sets: the official synthetic generator's design (typed schema, grounded 2p/3p/2i/ip/pi patterns, one
graph per question) and relation-path questions over the Kinships, Nations and UMLS triples."""
from __future__ import annotations

import random as _random
from collections import defaultdict
from typing import Sequence

from .subgraphs import KB, Question


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
