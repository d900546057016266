"""PoF (Sato, Yamada, Tanaka, Inoue & Kawakami, "PoF: Post-Training of Feature Extractor for Improving
Generalization", ICML 2022): post-training of the feature extractor against a perturbed last layer.

The model is ``f(x) = W·φ_θ(x) + b``; the classifier ``w* = (W, b)`` is the last ``nn.Linear`` of an already
trained network. Post-training keeps ``w*`` fixed and updates only the extractor ``θ``. One iteration:

1. on a separate "weak-classifier" batch ``B'`` (256 samples drawn with replacement), compute
   ``φ_θ(B')`` without grad (extractor in train mode, as the official code: BN running stats move) and the raw
   classifier gradient ``g = ∇_w L_{B'}(θ, w*)``;
2. bracket: ``η = 1``; while ``L_{B'}(w* − ηg) ≤ L_{B'}(w*)``: ``η ← 2η``, stopping once ``η ≥ 100``
   (so ``η_max`` is the first doubling past the opposite bank of the valley, at most 128);
3. grid: ``η_j = j·η_max/16`` (j = 1..16), ``η* = argmin_j L_{B'}(w* − η_j g)``;
4. data-driven range: ``γ ~ U(0, γ_max)`` with ``γ_max = 2`` and ``w̃ = w* − γ·η*·g``. On a quadratic along
   ``g``, ``γ = 2`` reaches the point of the opposite bank with the same loss as ``w*`` ("taigan");
5. one optimiser step of the extractor on a normal batch ``B``: ``θ ← θ − lr·∇_θ L_B(θ, w̃)``, ``w̃`` constant.

Since ``E[γ] = 1`` and ``E[γ²] = 4/3``, ``E_γ L_B(θ, w̃) ≈ L_B(θ, w*) − η*·gᵀ∇_w L_B + (2/3)·η*²·gᵀH_w(θ)g``:
the extractor is trained to lower the loss *and* the classifier-space curvature ``H_w = ∇²_w L`` along
data-driven directions. The classifier tensors are never written (bit-identical after post-training).

Defaults (official train.py): ``gamma=2.0``, ``weak_clf_batch_size=256``, ``numPartition=16``,
``line_search_init_lr=1.0``, cap 100; momentum SGD (Nesterov, 0.9, wd 5e-4), batch 64, post-training LR
``0.1·0.2⁴``; classifier initialised ``N(0, 0.1²)``, bias 0.

Deviation from the released script: its training loop calls ``optimizer['clf'].step()`` on the PoF loss and
never ``optimizer['fet'].step()``; the classifier is reset to ``w*`` at the next iteration, so the extractor
never moves (only its BN running statistics, through the weak-batch forward). We implement the paper's
algorithm; ``official_release=True`` reproduces the released behaviour (no extractor step) as a control.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_digits, load_mnist, symmetric_label_noise
from .hessian import top_eigenvalue
from .models import linear
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, format_mean_std, paired, plot_curves
from .train import classification_metrics, cross_entropy_loss, epoch_batches, fit, predict_logits

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------
@dataclass
class LineSearch:
    """Result of :func:`classifier_line_search` (all tensors detached)."""

    eta_max: float          #: end of the bracket (first doubling with a higher loss, or the cap)
    eta_star: float         #: grid minimiser ``argmin_j L(w* − η_j g)``
    grid: Tensor            #: ``(num_partition,)`` step sizes ``η_j = j·η_max/num_partition``
    grid_losses: Tensor     #: ``(num_partition,)`` losses at the grid points
    loss0: float            #: ``L(w*)``
    grad_weight: Tensor     #: ``g_W`` shaped like the weight ``(C, D)``
    grad_bias: Optional[Tensor]  #: ``g_b`` shaped ``(C,)`` (``None`` without bias)


def _check_features(features: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a (N, D) tensor, got {getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must be a (C, D={features.shape[1]}) tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be a ({weight.shape[0]},) tensor or None, got {getattr(bias, 'shape', bias)}")


def classifier_line_search(features: Tensor, targets: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                           loss_fn: LossFn = F.cross_entropy, init_lr: float = 1.0, max_lr: float = 100.0,
                           num_partition: int = 16) -> LineSearch:
    """PoF's line search along the classifier gradient ``g = ∇_w L(w*)`` on fixed ``features (N, D)``.

    ``loss_fn(logits (N, C), targets)`` must return the mean loss. Returns the bracket ``η_max`` and the grid
    minimiser ``η*`` (steps 2–3 of the algorithm); ``weight (C, D)``/``bias (C,)`` are not modified.
    """
    _check_features(features, weight, bias)
    if not init_lr > 0 or not max_lr >= init_lr:
        raise ValueError(f"need 0 < init_lr <= max_lr, got init_lr={init_lr!r}, max_lr={max_lr!r}")
    if not isinstance(num_partition, int) or num_partition < 1:
        raise ValueError(f"num_partition must be a positive int, got {num_partition!r}")
    feats = features.detach()
    w0 = weight.detach()
    b0 = None if bias is None else bias.detach()
    with torch.enable_grad():
        w = w0.clone().requires_grad_(True)
        b = None if b0 is None else b0.clone().requires_grad_(True)
        loss = loss_fn(F.linear(feats, w, b), targets)
        if loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar (mean) loss")
        grads = torch.autograd.grad(loss, [w] if b is None else [w, b])
    gw = grads[0].detach()
    gb = None if b is None else grads[1].detach()
    loss0 = loss.item()

    @torch.no_grad()
    def loss_at(eta: float) -> float:
        return float(loss_fn(F.linear(feats, w0 - eta * gw, None if b0 is None else b0 - eta * gb), targets))

    eta = float(init_lr)
    while True:  # the official bracket: stop at the first doubling with a higher loss, or once η ≥ max_lr
        if loss_at(eta) > loss0:
            break
        eta *= 2.0
        if eta >= max_lr:
            break
    grid = torch.linspace(0.0, eta, num_partition + 1, dtype=torch.float64)[1:]
    losses = torch.tensor([loss_at(float(e)) for e in grid], dtype=torch.float64)
    j = int(torch.argmin(losses))
    return LineSearch(eta, float(grid[j]), grid, losses, loss0, gw, gb)


class PoF:
    """Post-training of ``extractor`` against a randomly perturbed, otherwise frozen ``classifier``.

    Args:
        extractor: ``φ_θ``, maps inputs to features ``(N, D)`` (any module; Monarch layers in the recipe).
        classifier: the last layer, an ``nn.Linear(D, C)``; its tensors are only read.
        optimizer: optimiser over the extractor's parameters only (must not hold the classifier's).
        gamma_max: ``γ ~ U(0, gamma_max)``; 2 covers the valley up to the opposite bank.
        num_partition, init_lr, max_lr: the line search (16, 1.0, 100 as in the official code).
        loss_fn: mean loss of ``(logits, targets)``, cross-entropy by default.
        generator: source of ``γ`` (seeded ``torch.Generator``).
        official_release: reproduce the released script (no extractor step; a control, not the method).
    """

    def __init__(self, extractor: nn.Module, classifier: nn.Linear, optimizer: torch.optim.Optimizer, *,
                 gamma_max: float = 2.0, num_partition: int = 16, init_lr: float = 1.0, max_lr: float = 100.0,
                 loss_fn: LossFn = F.cross_entropy, generator: Optional[torch.Generator] = None,
                 official_release: bool = False):
        if not isinstance(extractor, nn.Module):
            raise TypeError(f"extractor must be an nn.Module, got {type(extractor).__name__}")
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be the last nn.Linear(D, C) layer, got {type(classifier).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        clf_ids = {id(p) for p in classifier.parameters()}
        if any(id(p) in clf_ids for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("optimizer must not contain the classifier's parameters: PoF keeps w* = (W, b) fixed")
        if not gamma_max > 0:
            raise ValueError(f"gamma_max must be > 0, got {gamma_max!r}")
        self.extractor, self.classifier, self.optimizer = extractor, classifier, optimizer
        self.gamma_max, self.num_partition, self.init_lr, self.max_lr = float(gamma_max), num_partition, init_lr, max_lr
        self.loss_fn, self.generator, self.official_release = loss_fn, generator, bool(official_release)
        # one-time check of the line-search arguments
        if not isinstance(num_partition, int) or num_partition < 1:
            raise ValueError(f"num_partition must be a positive int, got {num_partition!r}")

    def perturbed_classifier(self, weak_x: Tensor, weak_y: Tensor) -> tuple[Tensor, Optional[Tensor], dict]:
        """Steps 1–4: ``(W̃, b̃, info)`` from a weak-classifier batch."""
        self.extractor.train()
        with torch.no_grad():
            feats = self.extractor(weak_x)
        w, b = self.classifier.weight, self.classifier.bias
        ls = classifier_line_search(feats, weak_y, w, b, loss_fn=self.loss_fn, init_lr=self.init_lr,
                                    max_lr=self.max_lr, num_partition=self.num_partition)
        gamma = float(torch.rand((), generator=self.generator)) * self.gamma_max
        step = gamma * ls.eta_star
        w_t = w.detach() - step * ls.grad_weight
        b_t = None if b is None else b.detach() - step * ls.grad_bias
        gnorm = float(ls.grad_weight.norm() ** 2 + (0.0 if b is None else ls.grad_bias.norm() ** 2)) ** 0.5
        info = {"eta_max": ls.eta_max, "eta_star": ls.eta_star, "gamma": gamma, "perturb_norm": step * gnorm}
        return w_t, b_t, info

    def step(self, x: Tensor, y: Tensor, weak_x: Tensor, weak_y: Tensor) -> dict:
        """One PoF iteration (steps 1–5); returns ``{"loss", "eta_max", "eta_star", "gamma", "perturb_norm"}``."""
        w_t, b_t, info = self.perturbed_classifier(weak_x, weak_y)
        self.extractor.train()
        loss = self.loss_fn(F.linear(self.extractor(x), w_t, b_t), y)
        self.optimizer.zero_grad(set_to_none=True)
        if not self.official_release:
            loss.backward()
            self.optimizer.step()
        info["loss"] = float(loss.detach())
        return info


def classifier_hessian_trace(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> float:
    """Exact trace of the cross-entropy Hessian w.r.t. the last layer ``(W, b)`` on fixed ``features (N, D)``.

    ``H_w = (1/N)·Σ_n (diag p_n − p_n p_nᵀ) ⊗ φ̃_n φ̃_nᵀ`` with ``φ̃ = [φ; 1]`` (``φ`` without bias), so
    ``tr H_w = (1/N)·Σ_n Σ_c p_nc(1 − p_nc)·‖φ̃_n‖²``. It does not depend on the labels.
    """
    _check_features(features, weight, bias)
    feats = features.detach().to(torch.float64)
    p = F.linear(feats, weight.detach().double(), None if bias is None else bias.detach().double()).softmax(-1)
    sq = (feats ** 2).sum(-1) + (0.0 if bias is None else 1.0)
    return float(((p * (1 - p)).sum(-1) * sq).mean())


# --------------------------------------------------------------------------------------------------
# The experiment: pretrain, then continued SGD vs PoF
# --------------------------------------------------------------------------------------------------
class FeatureClassifier(nn.Module):
    """``classifier(extractor(x))`` with a Monarch-MLP extractor (Linear → BN → ReLU blocks) and a dense head."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, depth: int = 2, nblocks: int = 4,
                 layer: str = "monarch", clf_std: float = 0.1):
        super().__init__()
        mods, d = [], in_features
        for _ in range(depth):
            mods += [linear(d, hidden, layer, nblocks), nn.BatchNorm1d(hidden), nn.ReLU()]
            d = hidden
        self.extractor = nn.Sequential(*mods)
        self.classifier = nn.Linear(hidden, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, clf_std)  # official Classifier init N(0, 0.1²), bias 0
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.extractor(x.flatten(1) if x.dim() > 2 else x))


@dataclass(frozen=True)
class Config:
    dataset: str = option("digits", "image dataset (digits: a 50/50 split)", choices=("digits", "mnist"))
    noise: float = option(0.0, "symmetric label-noise rate on the training set")
    hidden: int = option(256, "extractor width")
    depth: int = option(2, "extractor blocks (Monarch Linear -> BN -> ReLU)")
    nblocks: int = option(4, "Monarch blocks")
    pretrain_epochs: int = option(100, "pretraining epochs")
    post_epochs: int = option(20, "post-training epochs (every arm)")
    lr: float = option(0.05, "pretraining LR (x0.2 at 50% and 75% of the epochs)")
    post_lr: Optional[float] = option(None, "post-training LR (default: the final pretraining LR)")
    batch_size: int = option(64, "mini-batch size")
    weak_batch_size: tuple[int, ...] = option((256, 64), "weak-classifier batch size(s), one PoF arm each (256 = "
                                              "official; digits has ~900 training images, so 256 is ~28% of the data "
                                              "vs 0.5% on CIFAR)")
    gamma_max: float = option(2.0, "gamma ~ U(0, gamma_max)")
    num_partition: int = option(16, "line-search grid points")
    weight_decay: float = option(5e-4, "SGD weight decay")
    seeds: int = option(5, "number of seeds (seed, seed+1, ...)")
    hessian_iters: int = option(50, "power-iteration HVPs for lambda_max of H_w (at most)")
    official_release: bool = option(False, "reproduce the released script's bug (no extractor step) instead of PoF")


QUICK = {"pretrain_epochs": 6, "post_epochs": 2, "seeds": 1, "hidden": 64}
METRICS = ("test_accuracy", "test_nll", "test_ece", "train_loss", "hessian_trace", "hessian_lambda_max", "feature_norm")


def _sgd(params, lr, wd):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def evaluate(model: FeatureClassifier, split, y_train: Tensor, cfg: Config, seed: int) -> dict:
    """Test metrics and the classifier-space curvature ``tr H_w``, ``λ_max H_w`` on the training features."""
    model.eval()
    test = classification_metrics(predict_logits(model, split.x_test), split.y_test)
    with torch.no_grad():
        feats = torch.cat([model.extractor(split.x_train[i:i + 1024]) for i in range(0, len(split.x_train), 1024)])
    w = model.classifier.weight.detach().clone().requires_grad_(True)
    b = model.classifier.bias.detach().clone().requires_grad_(True)
    loss_fn = lambda: F.cross_entropy(F.linear(feats, w, b), y_train)  # noqa: E731
    lam, _ = top_eigenvalue(loss_fn, [w, b], iters=cfg.hessian_iters, tol=1e-6,
                            generator=torch.Generator().manual_seed(seed))
    return {"test_accuracy": test["accuracy"], "test_nll": test["nll"], "test_ece": test["ece"],
            "train_loss": loss_fn().item(), "hessian_trace": classifier_hessian_trace(feats, w, b),
            "hessian_lambda_max": lam, "feature_norm": float(feats.norm(dim=1).mean())}


def post_train_pof(model: FeatureClassifier, x: Tensor, y: Tensor, weak_batch: int, post_lr: float, cfg: Config,
                   seed: int, progress=None) -> tuple[FeatureClassifier, dict]:
    """PoF post-training of a copy of ``model`` (same batches as the SGD arms); the weak-classifier batch is drawn
    with replacement at every step. Checks that the classifier stays bit-identical."""
    pof_model = copy.deepcopy(model)
    w_before = [t.detach().clone() for t in pof_model.classifier.parameters()]
    pof = PoF(pof_model.extractor, pof_model.classifier,
              _sgd(pof_model.extractor.parameters(), post_lr, cfg.weight_decay),
              gamma_max=cfg.gamma_max, num_partition=cfg.num_partition,
              generator=torch.Generator().manual_seed(seed + 29), official_release=cfg.official_release)
    wgen, infos = torch.Generator().manual_seed(seed + 31), []

    def step(_m, batch):
        widx = torch.randint(0, len(x), (weak_batch,), generator=wgen)  # with replacement
        infos.append(pof.step(*batch, x[widx], y[widx]))
        return infos[-1]["loss"]

    hist = fit(pof_model, None, epoch_batches(x, y, batch_size=cfg.batch_size,
                                              generator=torch.Generator().manual_seed(seed + 23)),
               epochs=cfg.post_epochs, step=step, progress=progress, desc=f"pof (weak batch {weak_batch}) seed {seed}")
    if not all(torch.equal(a, b) for a, b in zip(w_before, pof_model.classifier.parameters())):
        raise RuntimeError("PoF changed the classifier weights")  # the invariant the method relies on
    return pof_model, {"mean_perturb_norm": statistics.fmean(i["perturb_norm"] for i in infos),
                       "mean_eta_max": statistics.fmean(i["eta_max"] for i in infos), "epochs": hist.epochs}


def run_seed(split, y_train: Tensor, cfg: Config, seed: int, ctx: RunContext) -> dict:
    """Pretrain, then post-train three ways from the same network with the same LR, batches and epochs:
    continued SGD, extractor-only SGD against the frozen unperturbed classifier (PoF with γ = 0), and PoF."""
    device = ctx.device
    torch.manual_seed(seed)
    model = FeatureClassifier(split.x_train.shape[1], cfg.hidden, split.num_classes, cfg.depth, cfg.nblocks).to(device)
    opt = _sgd(model.parameters(), cfg.lr, cfg.weight_decay)
    drops = [int(0.5 * cfg.pretrain_epochs), int(0.75 * cfg.pretrain_epochs)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=drops, gamma=0.2)
    pre = fit(model, opt, epoch_batches(split.x_train, y_train, batch_size=cfg.batch_size,
                                        generator=torch.Generator().manual_seed(seed + 17)),
              epochs=cfg.pretrain_epochs, loss_fn=cross_entropy_loss, on_epoch_end=lambda _e: sched.step(),
              progress=ctx.progress, desc=f"pretrain seed {seed}")
    post_lr = cfg.post_lr if cfg.post_lr is not None else sched.get_last_lr()[0]
    results = {"pretrained": evaluate(model, split, y_train, cfg, seed)}
    for arm, params_of in (("sgd", lambda m: m.parameters()), ("sgd_frozen_clf", lambda m: m.extractor.parameters())):
        arm_model = copy.deepcopy(model)
        post = fit(arm_model, _sgd(params_of(arm_model), post_lr, cfg.weight_decay),
                   epoch_batches(split.x_train, y_train, batch_size=cfg.batch_size,
                                 generator=torch.Generator().manual_seed(seed + 23)),
                   epochs=cfg.post_epochs, loss_fn=cross_entropy_loss, progress=ctx.progress, desc=f"{arm} seed {seed}")
        results[arm] = evaluate(arm_model, split, y_train, cfg, seed)
    x_tr, y_tr = split.x_train.to(device), y_train.to(device)
    for wb in cfg.weak_batch_size:
        pof_model, info = post_train_pof(model, x_tr, y_tr, wb, post_lr, cfg, seed, ctx.progress)
        results[f"pof_wb{wb}"] = {**evaluate(pof_model, split, y_train, cfg, seed), **info}
    ctx.observe(pretrain_epochs=pre.epochs, post_epochs=post.epochs, hidden=model.classifier.in_features,
                weak_batch_size=[int(a[len("pof_wb"):]) for a in results if a.startswith("pof_wb")])
    return {**results, "post_lr": post_lr}


def run(cfg: Config, ctx: RunContext) -> dict:
    per_seed = []
    for seed in seed_list(ctx.seed, cfg.seeds):
        split = (load_digits(seed, test_fraction=0.5) if cfg.dataset == "digits" else load_mnist(seed)).flat()
        y_train = split.y_train
        if cfg.noise > 0:
            y_train = symmetric_label_noise(y_train, cfg.noise, split.num_classes,
                                            torch.Generator().manual_seed(seed + 101))
        per_seed.append(run_seed(split, y_train, cfg, seed, ctx))
        ctx.log(f"[pof] seed {seed}: " + "; ".join(
            f"{k} acc {v['test_accuracy']:.4f} nll {v['test_nll']:.4f} tr(H_w) {v['hessian_trace']:.3g} "
            f"lmax {v['hessian_lambda_max']:.3g}" for k, v in per_seed[-1].items() if isinstance(v, dict)))
    ctx.observe(seeds=len(per_seed))
    arms = ["pretrained", "sgd", "sgd_frozen_clf"] + [f"pof_wb{wb}" for wb in cfg.weak_batch_size]
    summary = {a: aggregate([{k: r[a][k] for k in METRICS} for r in per_seed]) for a in arms}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[a][k] for r in per_seed], [r[b][k] for r in per_seed])
                                      for k in ("hessian_trace", "hessian_lambda_max", "test_nll", "test_accuracy")}
                   for a in arms[3:] for b in ("sgd", "sgd_frozen_clf")}
    for a in arms:
        ctx.log(f"[pof] {a}: tr H_w {format_mean_std(summary[a]['hessian_trace'])}, "
                f"test acc {format_mean_std(summary[a]['test_accuracy'])}")
    plot_curves(ctx.plot_path("pof.png"), [
        Panel(title, {a: summary[a][k] for a in arms}, kind="bar") for k, title in (
            ("hessian_trace", "tr H_w (classifier space)"), ("hessian_lambda_max", "λ_max H_w"),
            ("test_nll", "test NLL"), ("test_accuracy", "test accuracy"))], panel_size=(4.0, 3.6))
    return {"dataset": cfg.dataset, "label_noise": cfg.noise, "seeds": seed_list(ctx.seed, cfg.seeds), "arms": arms,
            "summary": summary, "paired": comparisons, "post_lr": per_seed[0]["post_lr"],
            "pof_diagnostics": {a: aggregate([{k: r[a][k] for k in ("mean_perturb_norm", "mean_eta_max")}
                                              for r in per_seed]) for a in arms[3:]},
            "classifier_bit_identical": True}  # checked per seed and arm (RuntimeError otherwise)


RECIPE = Recipe("pof", Config, run, quick=QUICK,
                description="PoF (Sato et al. 2022): post-train a Monarch feature extractor against a perturbed "
                            "last layer")
