"""``python -m methods cbr_subg``: CBR-SUBG vs random cases, a distance heuristic and chance on the synthetic set
and three KGs, unseen test entities, over seeds."""
from __future__ import annotations

import random as _random
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import load_kg_triples
from ..recipe import Recipe, option, seed_list
from ..report import Panel, aggregate, format_mean_std, paired, plot_curves
from ..train import fit
from .subgraphs import collect_subgraph, find_chains
from .matching import CaseGNN, distance_heuristic_scores, hits_at_k, knn, match_batch, question_embeddings, txent_loss
from .questions import kg_questions, synthetic_questions


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
    comparisons = {d: {f"cbr_subg_minus_{b}": paired([r["cbr_subg"]["hits@1"] for r in rs],
                                                     [r[b]["hits@1"] for r in rs]) for b in METHODS[1:]}
                   for d, rs in runs.items()}
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
