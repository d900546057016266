"""Training recipes built on :mod:`layers` (one module per paper) and their shared helpers.

Run them with ``python -m methods list`` and ``python -m methods <name> [--quick] [--seed N] [--out DIR]``.
Shared helpers: :mod:`methods.recipe` (the contract: settings as a config dataclass, CLI, run folder, seeding),
:mod:`methods.report` (seed summaries, paired comparisons, plots, latency timers), :mod:`methods.train` (the one
training loop ``fit``, schedules, losses, evaluation), :mod:`methods.data` (offline datasets),
:mod:`methods.models` (small models shared with ``bench/``), :mod:`methods.tasks` (the Monarch recipe's GPT and ViT
tasks, also trained by :mod:`methods.distributed`), :mod:`methods.hessian` (curvature tools).
"""

#: recipe name -> (module, one-line summary). The module defines ``RECIPE`` (a :class:`methods.recipe.Recipe`).
RECIPES = {
    "monarch": ("methods.monarch",
                "Monarch (Dao et al. 2022): sparse training, dense-to-sparse, reverse sparsification"),
    "depthshrinker": ("methods.depthshrinker", "DepthShrinker (Fu et al. 2022): remove activations, merge blocks"),
    "ocm": ("methods.ocm", "OCM (Guo et al. 2022): online continual learning via mutual information"),
    "irem": ("methods.irem", "IREM (Du et al. 2022): iterative reasoning as energy minimisation"),
    "pof": ("methods.pof", "PoF (Sato et al. 2022): post-training of the feature extractor for flat minima"),
    "ensemble_distill": ("methods.ensemble_distill",
                         "Ensemble distillation with weight averaging and diversifying perturbation"),
    "sss": ("methods.sss", "SSS (Andreis et al. 2022): set-based stochastic subsampling"),
    "coda": ("methods.coda", "CoDA (Kirchmeyer et al. 2022): context-informed dynamics adaptation"),
    "selfcond": ("methods.selfcond", "Self-conditioning (Suau et al. 2022): expert units steer LM generation"),
    "tam": ("methods.tam", "TAM (Song et al. 2022): topology-aware margin loss for imbalanced node classification"),
    "prowd": ("methods.prowd", "ProWD (Yoon et al. 2022): bitwidth-heterogeneous federated learning"),
    "gnp": ("methods.gnp", "GNP (Zhao et al. 2022): gradient-norm penalty (SAM as a special case)"),
    "cbr_subg": ("methods.cbr_subg", "CBR-SUBG (Das et al. 2022): case-based reasoning over subgraphs for KBQA"),
    "pauc": ("methods.pauc", "Partial-AUC DRO (Zhu et al. 2022): SOPA, SOPA-s, SOTA-s"),
}
