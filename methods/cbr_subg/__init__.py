"""CBR-SUBG: knowledge-base question answering by case-based reasoning over subgraphs (Das, Godbole, Naik, Tower, Jia,
Zaheer, Hajishirzi & McCallum, "Knowledge Base Question Answering by Case-based Reasoning over Subgraphs", ICML
2022).

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
4. **R-GCN** (:class:`CaseGNN`): a Monarch input projection (:class:`monarch_kernels.layers.MonarchLinear`) to
   width ``d``, then ``L`` PyG :class:`torch_geometric.nn.RGCNConv` layers (mean aggregation, root weight, inverse
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

Modules: :mod:`.subgraphs` (KB, relation chains, adaptive subgraphs, node features), :mod:`.matching` (simulated
retrieval, the R-GCN, structural distance, TXent, hits@k), :mod:`.questions` (synthetic and KG question sets),
:mod:`.recipe` (``python -m methods cbr_subg``).
"""
from .subgraphs import KB, Question, build_graph, collect_subgraph, find_chains, follow_chains
from .matching import CaseGNN, hits_at_k, knn, structural_distance, txent_loss
from .questions import (PATTERN_TYPES,
    execute_pattern, ground_pattern, kg_questions, sample_question_graph, sample_schema, synthetic_questions)
from .recipe import RECIPE

__all__ = [
    "KB", "Question", "build_graph", "collect_subgraph", "find_chains", "follow_chains", "CaseGNN", "hits_at_k",
    "knn", "structural_distance", "txent_loss", "PATTERN_TYPES", "execute_pattern", "ground_pattern",
    "kg_questions", "sample_question_graph", "sample_schema", "synthetic_questions", "RECIPE",
]
