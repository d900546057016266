"""PoF (Sato et al., ICML 2022): post-training of the feature extractor against a perturbed last layer.

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

import argparse
import copy
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recipe import Recipe, RunContext

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
        from .models import linear

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    p.add_argument("--noise", type=float, default=0.0, help="symmetric label-noise rate on the training set")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--post-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05, help="pretraining LR (x0.2 at 50%% and 75%% of the epochs)")
    p.add_argument("--post-lr", type=float, default=None, help="post-training LR (default: the final pretraining LR)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weak-batch-size", type=int, nargs="+", default=[256, 64],
                   help="weak-classifier batch size(s); one PoF arm each (256 = official; digits has only ~900 "
                        "training images, so 256 is ~28%% of the data vs 0.5%% on CIFAR)")
    p.add_argument("--gamma-max", type=float, default=2.0)
    p.add_argument("--num-partition", type=int, default=16)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--hessian-iters", type=int, default=50)
    p.add_argument("--official-release", action="store_true",
                   help="reproduce the released script's bug (no extractor step) instead of the paper's PoF")


def _sgd(params, lr, wd):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def _evaluate(model: FeatureClassifier, split, y_train, args, seed) -> dict:
    from .hessian import top_eigenvalue
    from .train import classification_metrics, predict_logits

    model.eval()
    test = classification_metrics(predict_logits(model, split.x_test), split.y_test)
    with torch.no_grad():
        feats = torch.cat([model.extractor(split.x_train[i:i + 1024]) for i in range(0, len(split.x_train), 1024)])
    w = model.classifier.weight.detach().clone().requires_grad_(True)
    b = model.classifier.bias.detach().clone().requires_grad_(True)
    loss_fn = lambda: F.cross_entropy(F.linear(feats, w, b), y_train)  # noqa: E731
    lam, _ = top_eigenvalue(loss_fn, [w, b], iters=args.hessian_iters, tol=1e-6,
                            generator=torch.Generator().manual_seed(seed))
    return {"test_accuracy": test["accuracy"], "test_nll": test["nll"], "test_ece": test["ece"],
            "train_loss": loss_fn().item(), "hessian_trace": classifier_hessian_trace(feats, w, b),
            "hessian_lambda_max": lam, "feature_norm": float(feats.norm(dim=1).mean())}


def _run_seed(split, y_train, args, seed, ctx: RunContext) -> dict:
    from .train import minibatches, train_classifier

    device = ctx.device
    torch.manual_seed(seed)
    model = FeatureClassifier(split.x_train.shape[1], args.hidden, split.num_classes, args.depth,
                              args.nblocks).to(device)
    gen = torch.Generator().manual_seed(seed + 17)
    opt = _sgd(model.parameters(), args.lr, args.weight_decay)
    drops = [int(0.5 * args.pretrain_epochs), int(0.75 * args.pretrain_epochs)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=drops, gamma=0.2)
    for _ in ctx.progress(range(args.pretrain_epochs), desc=f"pretrain seed {seed}"):
        train_classifier(model, split.x_train, y_train, epochs=1, batch_size=args.batch_size, optimizer=opt,
                         generator=gen)
        sched.step()
    post_lr = args.post_lr if args.post_lr is not None else sched.get_last_lr()[0]
    results = {"pretrained": _evaluate(model, split, y_train, args, seed)}

    # (i) continued SGD on the whole network (same LR, batches and epochs as PoF)
    sgd_model = copy.deepcopy(model)
    sgd_opt = _sgd(sgd_model.parameters(), post_lr, args.weight_decay)
    train_classifier(sgd_model, split.x_train, y_train, epochs=args.post_epochs, batch_size=args.batch_size,
                     optimizer=sgd_opt, generator=torch.Generator().manual_seed(seed + 23),
                     progress=ctx.progress, desc=f"sgd seed {seed}")
    results["sgd"] = _evaluate(sgd_model, split, y_train, args, seed)

    # (ii) control: extractor-only SGD with the classifier frozen at w* and *unperturbed* (PoF with γ = 0)
    frozen_model = copy.deepcopy(model)
    train_classifier(frozen_model, split.x_train, y_train, epochs=args.post_epochs, batch_size=args.batch_size,
                     optimizer=_sgd(frozen_model.extractor.parameters(), post_lr, args.weight_decay),
                     generator=torch.Generator().manual_seed(seed + 23), progress=ctx.progress,
                     desc=f"frozen seed {seed}")
    results["sgd_frozen_clf"] = _evaluate(frozen_model, split, y_train, args, seed)

    # (iii) PoF: extractor only, classifier frozen at w*; one arm per weak-classifier batch size
    x_tr, y_tr = split.x_train.to(device), y_train.to(device)
    for wb in args.weak_batch_size:
        pof_model = copy.deepcopy(model)
        w_before = [t.detach().clone() for t in pof_model.classifier.parameters()]
        pof = PoF(pof_model.extractor, pof_model.classifier,
                  _sgd(pof_model.extractor.parameters(), post_lr, args.weight_decay),
                  gamma_max=args.gamma_max, num_partition=args.num_partition,
                  generator=torch.Generator().manual_seed(seed + 29), official_release=args.official_release)
        bgen, wgen = torch.Generator().manual_seed(seed + 23), torch.Generator().manual_seed(seed + 31)
        perturb, etas = [], []
        for _ in ctx.progress(range(args.post_epochs), desc=f"pof (weak batch {wb}) seed {seed}"):
            for idx in minibatches(len(x_tr), args.batch_size, bgen):
                widx = torch.randint(0, len(x_tr), (wb,), generator=wgen)  # with replacement
                info = pof.step(x_tr[idx], y_tr[idx], x_tr[widx], y_tr[widx])
                perturb.append(info["perturb_norm"])
                etas.append(info["eta_max"])
        if not all(torch.equal(a, b) for a, b in zip(w_before, pof_model.classifier.parameters())):
            raise RuntimeError("PoF changed the classifier weights")  # the invariant the method relies on
        arm = _evaluate(pof_model, split, y_train, args, seed)
        arm["mean_perturb_norm"] = float(np.mean(perturb))
        arm["mean_eta_max"] = float(np.mean(etas))
        results[f"pof_wb{wb}"] = arm
    results["post_lr"] = post_lr
    return results


def run(args: argparse.Namespace, ctx: RunContext) -> dict:
    from .data import load_digits, load_mnist, symmetric_label_noise

    if args.quick:
        args.pretrain_epochs, args.post_epochs, args.seeds, args.hidden, args.hessian_iters = 6, 2, 1, 64, 20
    per_seed = []
    for i in range(args.seeds):
        seed = args.seed + i
        split = (load_digits(seed, test_fraction=0.5) if args.dataset == "digits" else load_mnist(seed)).flat()
        y_train = split.y_train
        if args.noise > 0:

            y_train = symmetric_label_noise(y_train, args.noise, split.num_classes,
                                            torch.Generator().manual_seed(seed + 101))
        res = _run_seed(split, y_train, args, seed, ctx)
        per_seed.append(res)
        ctx.log(f"[pof] seed {seed}: " + "; ".join(
            f"{k} acc {v['test_accuracy']:.4f} nll {v['test_nll']:.4f} tr(H_w) {v['hessian_trace']:.3g} "
            f"lmax {v['hessian_lambda_max']:.3g}" for k, v in res.items() if isinstance(v, dict)))

    keys = ["test_accuracy", "test_nll", "test_ece", "train_loss", "hessian_trace", "hessian_lambda_max",
            "feature_norm"]
    arms = [f"pof_wb{wb}" for wb in args.weak_batch_size]
    names = ["pretrained", "sgd", "sgd_frozen_clf"] + arms
    summary = {"arms": names}
    for name in names:
        for k in keys:
            vals = np.array([r[name][k] for r in per_seed], dtype=np.float64)
            summary[f"{name}_{k}_mean"] = float(vals.mean())
            summary[f"{name}_{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    for arm in arms:
        for base in ("sgd", "sgd_frozen_clf"):
            for k in ("hessian_trace", "hessian_lambda_max", "test_nll", "test_accuracy"):
                diffs = np.array([r[arm][k] - r[base][k] for r in per_seed])
                summary[f"{arm}_minus_{base}_{k}_mean"] = float(diffs.mean())
                summary[f"{arm}_minus_{base}_{k}_seeds_negative"] = int((diffs < 0).sum())
            summary[f"{arm}_lowers_trace_vs_{base}"] = bool(
                summary[f"{arm}_hessian_trace_mean"] < summary[f"{base}_hessian_trace_mean"])
            summary[f"{arm}_lowers_lambda_max_vs_{base}"] = bool(
                summary[f"{arm}_hessian_lambda_max_mean"] < summary[f"{base}_hessian_lambda_max_mean"])
        summary[f"{arm}_mean_perturb_norm"] = float(np.mean([r[arm]["mean_perturb_norm"] for r in per_seed]))
        summary[f"{arm}_mean_eta_max"] = float(np.mean([r[arm]["mean_eta_max"] for r in per_seed]))
    summary.update({
        "post_lr": per_seed[0]["post_lr"], "dataset": args.dataset, "label_noise": args.noise, "seeds": args.seeds,
        "weak_batch_sizes": list(args.weak_batch_size), "official_release": args.official_release,
        "classifier_bit_identical": True,  # checked per seed and arm above (RuntimeError otherwise)
    })
    _plot(per_seed, names, ctx)
    return summary


def _plot(per_seed: list, names: list, ctx: RunContext) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("hessian_trace", "tr H_w (classifier space)"), ("hessian_lambda_max", "λ_max H_w"),
              ("test_nll", "test NLL"), ("test_accuracy", "test accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.5))
    for ax, (k, title) in zip(axes, panels):
        vals = np.array([[r[n][k] for n in names] for r in per_seed])
        for row in vals:
            ax.plot(names, row, color="0.7", lw=0.8, marker="o", ms=3)
        ax.bar(names, vals.mean(0), alpha=0.5, color=["C7", "C0", "C1"] + [f"C{i + 2}" for i in range(len(names) - 3)])
        ax.tick_params(axis="x", labelrotation=20)
        if k == "test_accuracy":  # differences are fractions of a point: zoom in
            ax.set_ylim(max(0.0, vals.min() - 0.02), min(1.0, vals.max() + 0.01))
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(ctx.plot_path("pof.png"), dpi=120)
    plt.close(fig)


RECIPE = Recipe("pof", add_arguments, run,
                "PoF (Sato et al. 2022): post-train a Monarch feature extractor against a perturbed last layer")
