"""CBR-SUBG: chain finding/following, subgraphs, entity-agnostic features, TXent, hits@k, data generators."""
import math
import random

import pytest
import torch

from methods import cbr_subg as cb
from recipe_runs import quick_run

# a toy KB:  a -r1-> b -r2-> c,  b -r2-> f,  a -r1-> d -r3-> e,  a -r2-> g,  x -r1-> y -r2-> z
TOY = [("a", "r1", "b"), ("b", "r2", "c"), ("b", "r2", "f"), ("a", "r1", "d"), ("d", "r3", "e"),
       ("a", "r2", "g"), ("x", "r1", "y"), ("y", "r2", "z")]
REL2ID = {"r1": 0, "r2": 1, "r3": 2}


def test_find_and_follow_chains_on_a_toy_kb():
    kb = cb.KB(TOY)
    assert cb.find_chains(kb, "a", {"c"}, 2) == {("r1", "r2")}
    assert cb.find_chains(kb, "a", {"b", "e"}, 2) == {("r1",), ("r1", "r3")}
    assert cb.find_chains(kb, "a", {"e"}, 1) == set()
    # only complete walks: (a, r1, d) does not continue with r2
    assert cb.follow_chains(kb, ["a"], [("r1", "r2")]) == {("a", "r1", "b"), ("b", "r2", "c"), ("b", "r2", "f")}
    assert cb.follow_chains(kb, ["a"], [("r1", "r3"), ("r2",)]) == {("a", "r1", "d"), ("d", "r3", "e"),
                                                                   ("a", "r2", "g")}
    assert cb.follow_chains(kb, ["a", "x"], [("r1", "r2")]) == {("a", "r1", "b"), ("b", "r2", "c"),
                                                               ("b", "r2", "f"), ("x", "r1", "y"), ("y", "r2", "z")}
    assert cb.follow_chains(kb, ["c"], [("r1",)]) == set()


def test_subgraph_contains_the_answer_when_the_cases_paths_lead_to_it():
    kb = cb.KB(TOY)
    case = cb.Question("case", 0, ("x",), frozenset({"z"}), kb)
    query = cb.Question("q", 0, ("a",), frozenset({"c", "f"}), kb)
    chains_of = {"case": cb.find_chains(kb, "x", {"z"}, 2)}
    assert chains_of["case"] == {("r1", "r2")}
    g = cb.collect_subgraph(query, [case], chains_of, REL2ID)
    assert set(g.nodes) == {"a", "b", "c", "f"}
    assert {g.nodes[i] for i in g.answer_mask.nonzero().flatten().tolist()} == {"c", "f"}
    assert g.seed_mask.tolist() == [n == "a" for n in g.nodes]
    # a case whose chain leads elsewhere: the answer is missing and counts as a miss
    other = cb.Question("other", 1, ("a",), frozenset({"g"}), kb)
    g2 = cb.collect_subgraph(query, [other], {"other": {("r2",)}}, REL2ID)
    assert set(g2.nodes) == {"a", "g"} and not g2.answer_mask.any()
    assert cb.hits_at_k(torch.randn(g2.num_nodes), g2.answer_mask, 10) == 0.0
    # no chains at all: the seed alone
    g3 = cb.collect_subgraph(query, [], {}, REL2ID)
    assert g3.nodes == ["a"] and g3.edge_index.shape == (2, 0)


def test_node_features_are_entity_agnostic_and_correct():
    g = cb.build_graph(TOY, ["a"], {"c"}, REL2ID)
    idx = {e: i for i, e in enumerate(g.nodes)}
    R = len(REL2ID)
    # node b: leaves by r2 (to c, f) and by r1-inverse (to a); distance 1
    xb = g.x[idx["b"]]
    torch.testing.assert_close(xb[:2 * R], torch.tensor([0, 1, 0, 1, 0, 0]) / math.sqrt(2))  # unit-norm bag
    assert xb[2 * R:].tolist() == [0, 1, 0, 0]
    raw = cb.build_graph(TOY, ["a"], {"c"}, REL2ID, normalize_bag=False)
    assert raw.x[idx["b"], :2 * R].tolist() == [0, 1, 0, 1, 0, 0]
    assert g.x[idx["a"], 2 * R:].tolist() == [1, 0, 0, 0]
    assert g.x[idx["e"], 2 * R:].tolist() == [0, 0, 1, 0]
    assert g.x[idx["z"], 2 * R:].tolist() == [0, 0, 0, 1]  # unreachable from the seed: capped
    # relabel every entity: the features of corresponding nodes are unchanged, and so are the GNN outputs
    names = sorted({e for h, _, t in TOY for e in (h, t)})
    perm = dict(zip(names, random.Random(0).sample([f"E{i}" for i in range(len(names))], len(names))))
    relabelled = [(perm[h], r, perm[t]) for h, r, t in TOY]
    g2 = cb.build_graph(relabelled, [perm["a"]], {perm["c"]}, REL2ID)
    idx2 = {e: i for i, e in enumerate(g2.nodes)}
    order = torch.tensor([idx2[perm[e]] for e in g.nodes])
    assert torch.equal(g2.x[order], g.x)
    assert torch.equal(g2.answer_mask[order], g.answer_mask)
    torch.manual_seed(0)
    model = cb.CaseGNN(g.x.shape[1], 2 * R, dim=8, num_layers=2).double().eval()
    h1 = model(g.x.double(), g.edge_index, g.edge_type)
    h2 = model(g2.x.double(), g2.edge_index, g2.edge_type)
    torch.testing.assert_close(h2[order], h1)
    from monarch_kernels.layers import MonarchLinear

    assert isinstance(model.inp, MonarchLinear)


def test_structural_distance_and_txent_hand_case():
    hq = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    a1 = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # case 1: two answers
    a2 = torch.tensor([[0.0, 4.0]], dtype=torch.float64)  # case 2: one answer
    d = cb.structural_distance(hq, [a1, a2, a2[:0]])  # the empty case is skipped
    # node 0: case1 mean(0, 5) = 2.5, case2 4 -> 3.25; node 1: case1 mean(5, 0) = 2.5, case2 3 -> 2.75
    torch.testing.assert_close(d, torch.tensor([3.25, 2.75], dtype=torch.float64))
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ans = torch.tensor([True, False, False])
    expected = 1.0 + math.log(math.exp(-1) + math.exp(-2) + math.exp(-3))
    assert float(cb.txent_loss(d, ans, tau=1.0)) == pytest.approx(expected, abs=1e-12)
    two = torch.tensor([True, False, True])
    expected = -math.log(math.exp(-2) + math.exp(-6)) + math.log(math.exp(-2) + math.exp(-4) + math.exp(-6))
    assert float(cb.txent_loss(d, two, tau=0.5)) == pytest.approx(expected, abs=1e-12)
    # negative subsampling: S = answers + sampled negatives
    sampled = torch.tensor([False, True, False])
    expected = 1.0 + math.log(math.exp(-1) + math.exp(-2))
    assert float(cb.txent_loss(d, ans, 1.0, sampled)) == pytest.approx(expected, abs=1e-12)
    assert float(cb.txent_loss(d, torch.ones(3, dtype=torch.bool), 1.0)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="answer_mask"):
        cb.txent_loss(d, torch.zeros(3, dtype=torch.bool))


def test_hits_at_k():
    ans = torch.tensor([False, True, False, False])
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert [cb.hits_at_k(s, ans, k) for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    # masking the top node out of the candidates puts the answer first
    assert cb.hits_at_k(s, ans, 1, candidates=torch.tensor([False, True, True, True])) == 1.0
    # all tied: P(answer among the first k of 4) = k/4; two answers among 4: 1 - C(2,k)/C(4,k)
    flat = torch.zeros(4)
    assert [cb.hits_at_k(flat, ans, k) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    two = torch.tensor([True, True, False, False])
    assert cb.hits_at_k(flat, two, 1) == pytest.approx(0.5)
    assert cb.hits_at_k(flat, two, 2) == pytest.approx(1 - 1 / 6)
    # one better non-answer then a tie of 3 holding one answer: hits@2 = 1/3
    assert cb.hits_at_k(torch.tensor([5.0, 1.0, 1.0, 1.0]), ans, 2) == pytest.approx(1 / 3)
    assert cb.hits_at_k(s, torch.zeros(4, dtype=torch.bool), 10) == 0.0
    # Monte-Carlo check of the tie formula
    gen = torch.Generator().manual_seed(0)
    sc = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    am = torch.tensor([False, False, True, False, True, False])
    trials = [bool(am[(sc + 1e-3 * torch.rand(6, generator=gen)).argsort(descending=True)[:2]].any())
              for _ in range(4000)]
    assert cb.hits_at_k(sc, am, 2) == pytest.approx(sum(trials) / len(trials), abs=0.03)


def test_knn_retrieval():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert cb.knn(torch.tensor([[1.0, 0.05]]), keys, 2).tolist() == [[0, 1]]
    assert cb.knn(keys, keys, 1, exclude_self=True).tolist() == [[1], [0], [1]]
    with pytest.raises(ValueError, match="share D"):
        cb.knn(torch.zeros(1, 3), keys, 1)


def test_synthetic_generator_plants_the_pattern():
    rng = random.Random(0)
    allowed = cb.sample_schema(8, 0.4, rng)
    for ptype in cb.PATTERN_TYPES:
        pattern = cb.ground_pattern(ptype, allowed, rng)
        triples, seeds, answers = cb.sample_question_graph(allowed, pattern, "q_", rng)
        kb = cb.KB(triples)
        assert answers and answers == cb.execute_pattern(kb, ptype, pattern[1], seeds) - set(seeds)
        assert all(e.startswith("q_") for t in triples for e in (t[0], t[2]))
        # typed schema respected: r.ti.tj only leaves ti-typed... and every relation exists in the schema
        rels = {r for es in allowed.values() for r, _ in es}
        assert {r for _, r, _ in triples} <= rels
    train, test, rel2id, names = cb.synthetic_questions(3, 4, 2, random.Random(1))
    assert len(train) == 12 and len(test) == 6 and len(names) == 3
    ents = lambda qs: {e for q in qs for e in q.kb.entities()}
    assert not ents(train) & ents(test)  # every test entity is unseen


def test_kg_questions_hold_out_seed_entities():
    pytest.importorskip("importlib.metadata")
    from methods.data import load_kg_triples

    d = load_kg_triples("umls")
    train, test, rel2id, names = cb.kg_questions(d["train"], 3, 5, 3, random.Random(0), max_answers=4)
    assert len(train) == 15 and len(test) == 9
    assert not {q.seeds[0] for q in train} & {q.seeds[0] for q in test}
    for q in train + test:
        nodes = {q.seeds[0]}
        for r in names[q.qtype].split("/"):
            nodes = q.kb.step(nodes, r)
        assert set(q.answers) == nodes - {q.seeds[0]} and 1 <= len(q.answers) <= 4


def test_quick_run(tmp_path):
    m, cfg = quick_run("cbr_subg", tmp_path)
    assert m["seeds"] == [0] and set(m["runs"]) == {"synthetic", "umls"}
    for d, runs in m["runs"].items():
        res = runs[0]
        for method in ("cbr_subg", "random_cases", "distance_heuristic", "chance"):
            h = [res[method][f"hits@{k}"] for k in (1, 3, 10)]
            assert all(0.0 <= v <= 1.0 for v in h) and h[0] <= h[1] <= h[2]
            assert m["summary"][d][method]["hits@1"]["mean"] == pytest.approx(h[0])
        assert res["test_entities_unseen_as_train_seeds"] is True
        assert math.isfinite(res["loss_first"]) and res["loss_last"] < res["loss_first"]
        assert 0.0 <= res["answer_coverage_random_cases"] <= res["answer_coverage_knn"] <= 1.0
        assert 0.5 < res["knn_type_precision"] <= 1.0  # the simulated retrieval is reported
        # the matcher learns: far above chance and above the distance heuristic, with unseen entities
        assert res["cbr_subg"]["hits@1"] > max(0.5, res["chance"]["hits@1"] + 0.3, res["distance_heuristic"]["hits@1"])
