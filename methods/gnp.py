"""GNP (Zhao, Zhang & Hu, "Penalizing Gradient Norm for Efficiently Improving Generalization in Deep Learning",
ICML 2022): penalising the gradient norm for better generalisation; SAM is α = 1.

Objective and update (paper, eqs. for the penalised loss and its finite-difference gradient)::

    L(θ) = L_S(θ) + λ·‖∇L_S(θ)‖₂
    ∇L(θ) = ∇L_S(θ) + λ·H·∇L_S(θ)/‖∇L_S(θ)‖,   H v ≈ (∇L_S(θ + r·v) − ∇L_S(θ)) / r,   v = ∇L_S/‖∇L_S‖
    g = (1 − α)·∇L_S(θ) + α·∇L_S(θ + r·v),      α = λ / r

* α = 0 is the base optimiser; α = 1 is exactly SAM with ρ = r; each step costs two forward/backward passes.
* For a quadratic ``L_S = ½θᵀAθ`` the finite difference is exact: ``g = ∇L_S + α·r·A·v``.
* ``g`` replaces ``p.grad`` and the *base* optimiser takes the step (SGD, momentum, Adam, ...), so weight decay,
  momentum and LR schedules are the base optimiser's. The norm ‖∇L_S‖ is the global norm over every parameter
  the base optimiser trains (for Monarch layers: the factors ``w1, w2``, i.e. flatness in factor space).
* Batch-norm: when ``model`` is given, BN running statistics are those of the unperturbed pass only (the
  perturbed pass still normalises with its own batch statistics, as in the official code and in SAM).

Defaults from the paper's CIFAR recipes: ``r = 0.1`` (0.05 on ImageNet), ``α = 0.8``, SGD momentum 0.9.

Where we deviate from the official JAX code (zhaoyang-0204/gnp, training_core.py ``get_gnp_gradient``):

* its default ``gnp.norm_perturbations=True`` uses the *normalised* gradient in the first term,
  ``g = (1−α)·∇L_S/‖∇L_S‖ + α·∇L_S(θ + r·v)``, which is not the paper's formula; we implement the paper by
  default and reproduce the official runs with ``normalize_first_term=True``;
* it adds the coupled L2 penalty ``½·l2·‖θ‖²`` to the loss of *both* passes (so the ascent direction includes
  weight decay), computes perturbations per device shard and clips the global norm at 5; here weight decay is
  whatever the base optimiser does and there is one device (put an L2 term in the closure to mimic it).

Dropout masks differ between the two passes (as in the official code and common SAM implementations).

Usage::

    opt = GNP(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), r=0.05, alpha=0.8, model=model)
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)      # zero_grad, both passes and the base step happen inside
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_image_dataset, symmetric_label_noise
from .hessian import gradient_norm, hutchinson_trace, top_eigenvalue
from .models import MLP
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, curve_band, format_mean_std, paired, plot_curves
from .train import classification_metrics, epoch_batches, fit, predict_logits


# --------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------
def _bn_modules(model: Optional[nn.Module]) -> list[nn.Module]:
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _snapshot_buffers(mods: list[nn.Module]) -> list[dict]:
    return [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in mods]


def _restore_buffers(mods: list[nn.Module], snap: list[dict]) -> None:
    with torch.no_grad():
        for m, s in zip(mods, snap):
            for k, b in m.named_buffers(recurse=False):
                if k in s:
                    b.copy_(s[k])


class GNP(torch.optim.Optimizer):
    """Gradient-norm-penalty wrapper around any ``torch.optim.Optimizer`` (SAM when ``alpha=1``).

    Args:
        base_optimizer: the optimiser whose step is taken with the GNP gradient ``g`` (its param groups, LR
            and state are shared: LR schedulers may be attached to either object).
        r: finite-difference radius (SAM's ρ when ``alpha=1``), ``r > 0``.
        alpha: ``λ / r`` in ``[0, 1]`` (values above 1 extrapolate and are allowed but unusual).
        model: optional module whose batch-norm running statistics must come from the unperturbed pass only.
        normalize_first_term: reproduce the official code's default ``(1−α)·∇L/‖∇L‖`` first term.
        eps: added to ‖∇L‖ before dividing.

    After each :meth:`step`, ``last_grad_norm`` holds ‖∇L_S(θ)‖ of the first pass.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, r: float = 0.05, alpha: float = 0.8, *,
                 model: Optional[nn.Module] = None, normalize_first_term: bool = False, eps: float = 1e-12):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer instance, "
                            f"got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, GNP):
            raise TypeError("base_optimizer must not itself be a GNP wrapper")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 or not math.isfinite(r):
            raise ValueError(f"r must be a positive finite float, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite float >= 0 (λ/r, usually in [0, 1]), got {alpha!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.base_optimizer = base_optimizer
        self.r, self.alpha, self.eps = float(r), float(alpha), float(eps)
        self.model = model
        self.normalize_first_term = bool(normalize_first_term)
        self.last_grad_norm: Optional[float] = None
        # Share the base optimiser's groups (the same dicts) so schedulers and zero_grad act on both.
        super().__init__(base_optimizer.param_groups, {})
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def compute_gradient(self, closure: Callable[[], Tensor]) -> Tensor:
        """Run both passes and leave ``g`` in every ``p.grad`` (no optimiser step); returns the first-pass loss."""
        if not callable(closure):
            raise TypeError("GNP.step needs a closure that computes the loss, calls backward() and returns the loss")
        closure = torch.enable_grad()(closure)
        params = self._params()
        self.zero_grad(set_to_none=True)
        loss = closure()
        g1 = [None if p.grad is None else p.grad.detach().clone() for p in params]
        gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g1 if g is not None))
        self.last_grad_norm = gnorm
        first_scale = 1.0 / (gnorm + self.eps) if self.normalize_first_term else 1.0
        if self.alpha == 0.0 or gnorm == 0.0:
            # α = 0: the base gradient (no second pass). ‖∇L‖ = 0: the ascent direction is undefined and g = 0.
            if self.alpha != 0.0 or self.normalize_first_term:
                for p, g in zip(params, g1):
                    if g is not None:
                        p.grad = g * ((1.0 - self.alpha) * first_scale)
            return loss.detach()
        scale = self.r / (gnorm + self.eps)
        backup = [p.detach().clone() for p in params]
        for p, g in zip(params, g1):
            if g is not None:
                p.add_(g, alpha=scale)  # θ + r·∇L/‖∇L‖
        bn = _bn_modules(self.model)
        snap = _snapshot_buffers(bn)
        self.zero_grad(set_to_none=True)
        closure()
        _restore_buffers(bn, snap)  # running statistics from the unperturbed pass only
        for p, b, g in zip(params, backup, g1):
            p.copy_(b)
            g2 = p.grad
            if g2 is None and g is None:
                continue
            g2 = torch.zeros_like(p) if g2 is None else g2
            if self.alpha == 1.0:
                p.grad = g2.clone()  # SAM: only the ascent-point gradient survives
            else:
                first = torch.zeros_like(p) if g is None else g * ((1.0 - self.alpha) * first_scale)
                p.grad = first.add_(g2, alpha=self.alpha)
        return loss.detach()

    def step(self, closure: Optional[Callable[[], Tensor]] = None):  # type: ignore[override]
        """One GNP update: ``g`` from two passes of ``closure``, then ``base_optimizer.step()``."""
        if closure is None:
            raise TypeError("GNP.step needs a closure: it evaluates the loss at θ and at θ + r·∇L/‖∇L‖")
        loss = self.compute_gradient(closure)
        self.base_optimizer.step()
        return loss


def gnp_gradient(params, closure: Callable[[], Tensor], r: float, alpha: float, *,
                 model: Optional[nn.Module] = None, normalize_first_term: bool = False) -> list[Tensor]:
    """Functional form: the GNP gradient ``g`` for ``params`` (a list of tensors shaped like ``params``).

    ``closure`` computes the loss and calls ``backward()``; parameters are left unchanged and their ``.grad``
    holds ``g`` afterwards."""
    params = list(params)
    opt = GNP(torch.optim.SGD(params, lr=0.0), r=r, alpha=alpha, model=model,
              normalize_first_term=normalize_first_term)
    opt.compute_gradient(closure)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


# --------------------------------------------------------------------------------------------------
# The experiment: noisy-label digits/MNIST, SGD vs SAM vs GNP
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    dataset: str = option("digits", "image dataset", choices=("digits", "mnist"))
    noise: float = option(0.3, "symmetric label-noise rate on the training set")
    epochs: int = option(100, "training epochs")
    batch_size: int = option(128, "mini-batch size")
    lr: float = option(0.05, "SGD learning rate (cosine-annealed to 0)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    r: float = option(0.05, "GNP radius r (also SAM's rho)")
    alpha: float = option(0.8, "GNP alpha = lambda / r")
    normalize_first_term: bool = option(False, "the official code's default: (1-alpha)*grad/||grad|| first term")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")
    hidden: int = option(256, "MLP width")
    depth: int = option(2, "hidden layers (Monarch except the dense input layer)")
    nblocks: int = option(4, "Monarch blocks")
    hessian_iters: int = option(30, "power-iteration HVPs for lambda_max (at most)")
    hutchinson_samples: int = option(16, "Rademacher probes for tr(H)")


QUICK = {"epochs": 6, "seeds": 1, "hidden": 64}
METRICS = ("test_accuracy", "test_nll", "train_acc_noisy_labels", "train_acc_clean_labels", "train_loss",
           "grad_norm", "hessian_lambda_max", "hessian_trace", "ms_per_step")


def optimizers(cfg: Config) -> dict:
    """The three arms: SGD, SAM (GNP with α = 1, ρ = r) and GNP, as keyword arguments of :class:`GNP`."""
    return {"sgd": None, "sam": dict(r=cfg.r, alpha=1.0),
            "gnp": dict(r=cfg.r, alpha=cfg.alpha, normalize_first_term=cfg.normalize_first_term)}


def train_one(gnp_kw: Optional[dict], split, y_noisy: Tensor, cfg: Config, seed: int, ctx: RunContext,
              desc: str) -> dict:
    """Train a Monarch MLP on the noisy labels with SGD (``gnp_kw=None``) or the GNP wrapper, cosine-annealed
    per step; returns test metrics, the clean test-accuracy curve and the sharpness of the noisy training loss."""
    torch.manual_seed(seed)
    model = MLP(split.x_train.shape[1], cfg.hidden, split.num_classes, depth=cfg.depth, layer="monarch",
                nblocks=cfg.nblocks, activation=nn.ReLU).to(ctx.device)
    base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = base if gnp_kw is None else GNP(base, model=model, **gnp_kw)
    steps = cfg.epochs * math.ceil(len(split.x_train) / cfg.batch_size)

    def step(m, batch):
        xb, yb = batch
        if gnp_kw is None:
            loss = F.cross_entropy(m(xb), yb)
            base.zero_grad(set_to_none=True)
            loss.backward()
            base.step()
            return loss

        def closure():
            loss_ = F.cross_entropy(m(xb), yb)
            loss_.backward()
            return loss_
        return opt.step(closure)

    hist = fit(model, None, epoch_batches(split.x_train, y_noisy, batch_size=cfg.batch_size,
                                          generator=torch.Generator().manual_seed(seed + 7919)),
               epochs=cfg.epochs, step=step, schedule=torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps),
               evaluate=lambda m: classification_metrics(predict_logits(m, split.x_test), split.y_test), eval_every=1,
               progress=ctx.progress, desc=desc)
    test = hist.evals[-1][1]
    train_logits = predict_logits(model, split.x_train)
    model.eval()
    xtr, ytr = split.x_train.to(ctx.device), y_noisy.to(ctx.device)
    loss_fn = lambda: F.cross_entropy(model(xtr), ytr)  # noqa: E731  full-batch noisy training loss
    params = [p for p in model.parameters() if p.requires_grad]
    lam, _ = top_eigenvalue(loss_fn, params, iters=cfg.hessian_iters, tol=1e-4,
                            generator=torch.Generator().manual_seed(seed))
    trace, _ = hutchinson_trace(loss_fn, params, samples=cfg.hutchinson_samples,
                                generator=torch.Generator().manual_seed(seed + 1))
    return {
        "test_accuracy": test["accuracy"], "test_nll": test["nll"],
        "train_acc_noisy_labels": float((train_logits.argmax(-1) == y_noisy).float().mean()),
        "train_acc_clean_labels": float((train_logits.argmax(-1) == split.y_train).float().mean()),
        "train_loss": loss_fn().item(), "grad_norm": gradient_norm(loss_fn, params), "hessian_lambda_max": lam,
        "hessian_trace": trace, "ms_per_step": 1e3 * statistics.median(hist.step_times),
        "curve": [e["accuracy"] for _, e in hist.evals], "hidden": model.net[0].out_features,
    }


def run(cfg: Config, ctx: RunContext) -> dict:
    arms = optimizers(cfg)
    per_seed = {name: [] for name in arms}
    for seed in seed_list(ctx.seed, cfg.seeds):
        split = load_image_dataset(cfg.dataset, seed=seed).flat()
        y_noisy = symmetric_label_noise(split.y_train, cfg.noise, split.num_classes,
                                        torch.Generator().manual_seed(seed + 101))
        for name, gnp_kw in arms.items():
            res = train_one(gnp_kw, split, y_noisy, cfg, seed, ctx, desc=f"{name} seed {seed}")
            per_seed[name].append(res)
            ctx.log(f"[gnp] seed {seed} {name:4s} test acc {res['test_accuracy']:.4f} |grad| {res['grad_norm']:.3g} "
                    f"lambda_max {res['hessian_lambda_max']:.3g} tr(H) {res['hessian_trace']:.3g} "
                    f"{res['ms_per_step']:.1f} ms/step")
    first = per_seed["sgd"][0]
    ctx.observe(seeds=len(per_seed["sgd"]), epochs=len(first["curve"]), hidden=first["hidden"])
    summary = {name: aggregate([{k: r[k] for k in METRICS} for r in runs]) for name, runs in per_seed.items()}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[k] for r in per_seed[a]], [r[k] for r in per_seed[b]])
                                      for k in ("test_accuracy", "hessian_lambda_max", "hessian_trace")}
                   for a, b in (("sam", "sgd"), ("gnp", "sgd"), ("gnp", "sam"))}
    for name in arms:
        ctx.log(f"[gnp] {name}: test accuracy {format_mean_std(summary[name]['test_accuracy'])}, "
                f"lambda_max {format_mean_std(summary[name]['hessian_lambda_max'], 2)}")
    plot_curves(ctx.plot_path("gnp.png"), [
        Panel(f"{cfg.dataset}, {int(100 * cfg.noise)}% label noise",
              {name: curve_band([r["curve"] for r in runs]) for name, runs in per_seed.items()},
              xlabel="epoch", ylabel="clean test accuracy"),
        Panel("sharpness at the end of training", {n: summary[n]["hessian_lambda_max"] for n in arms}, kind="bar",
              ylabel="λ_max of the train-loss Hessian")])
    return {"dataset": cfg.dataset, "label_noise": cfg.noise, "seeds": seed_list(ctx.seed, cfg.seeds),
            "summary": summary, "paired": comparisons,
            "per_seed": {n: [{k: r[k] for k in METRICS} | {"curve": r["curve"]} for r in runs]
                         for n, runs in per_seed.items()}}


RECIPE = Recipe("gnp", Config, run, quick=QUICK,
                description="GNP (Zhao et al. 2022): gradient-norm penalty vs SAM vs SGD on noisy-label digits, "
                            "Monarch MLP")
