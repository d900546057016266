"""Ensemble distillation into a BatchEnsemble student, weight averaging, diversifying perturbation (Nam et al. 2022).

A deep ensemble of ``M`` teachers is distilled into one student that is a **BatchEnsemble** (BE) over the whole
network; at inference the members are **averaged in weight space** ("LatentBE") into a single plain network of the
same cost as one member, and during training a **diversifying input perturbation** moves each batch to where the
teachers disagree but the student's members still agree. Algorithm as in the official code
(cs-giung/distill-latentbe); this module is the PyTorch/Monarch version.

BatchEnsemble layer (:class:`BatchEnsemble`), for any wrapped ``nn.Linear``, ``nn.Conv2d``, :class:`MonarchLinear`
or :class:`BlockdiagLinear` with shared ("slow") weight ``W`` and bias ``b`` and per-member ("fast") vectors
``r_m ∈ R^{in}``, ``s_m ∈ R^{out}`` (``m = 1..M``, initialised to 1 as in the official config)::

    y_m = s_m ∘ (W (r_m ∘ x) + b)                 (conv: per channel; W(·) the layer without its bias)

The batch is member-major: rows ``[m·B, (m+1)·B)`` belong to member ``m`` (tile the input with
:func:`tile_members`).

**What "folding equals the member-averaged layer" means (exactly).** :meth:`BatchEnsemble.fold_mean_` averages the
members in *latent (factor) space*, ``r̄ = mean_m r_m``, ``s̄ = mean_m s_m``, and writes the plain layer::

    W' = diag(s̄) · W · diag(r̄),      b' = s̄ ∘ b

which is, for every input, *exactly* the BE layer whose members all carry ``(r̄, s̄)``. It is **not** the average of
the members' maps: ``mean_m diag(s_m) W diag(r_m) = W ∘ (mean_m s_m r_mᵀ) ≠ W ∘ (s̄ r̄ᵀ)`` unless the members agree
(and for a Monarch ``W`` the Hadamard product with a rank-``M`` matrix is in general not Monarch any more). For a
``MonarchLinear`` ``W = P2·BD(w2)·P1·BD(w1)`` the input scale acts on the columns of the *first* factor and the
output scale on the rows of the *second* factor after undoing ``P2``::

    w1'[kk, :, pp] = w1[kk, :, pp] · r̄[kk·p + pp]          (input index kk·p + pp)
    w2'[ll, ss, :] = s̄[ss·l + ll] · w2[ll, ss, :]          (P2: output index ss·l + ll)

so the folded layer is again a ``MonarchLinear`` with the same factor shapes and cost. Each folded factor is
*linear in one scale vector only*, hence folding every member separately and then averaging ``w1`` and ``w2``
**factor by factor** gives exactly the same layer as folding the averaged scales (tested); what must not be done is
averaging the members' *products* (dense maps). Padding positions of ragged sizes are never read, so their scale is
irrelevant.

Losses. Member ``m`` is distilled to teacher ``m`` (one-to-one pairing, not the ensemble mean), pure KD (α = 1)::

    L_KD = T² · mean_{m,b} CE(softmax(z_t^m / T), log_softmax(z_s^m / T)),    T = 4

The KD baseline (a plain student) uses the average over teachers of the same soft CE. Fast weights decay toward 1
(``0.5·||1 − r||²/M``, :func:`fast_weight_decay`) and their gradients are multiplied by ``M``
(:func:`scale_fast_grads_`) to undo the ``1/M`` share each member gets of the tiled batch.

Diversifying perturbation (:func:`diversifying_perturbation`, the official "TDiv-SDiv"): pick two distinct member
indices ``a ≠ b`` (the same for teachers and student members), then::

    TDiv(x) = mean_b CE(sg(p_{t_b}(x)), log p_{t_a}(x)),   SDiv(x) = mean_b CE(sg(p_{s_b}(x)), log p_{s_a}(x))
    δ = ∇_x (TDiv − SDiv);   δ ← δ / ||δ||₂ · ε·√D  (per example, D input entries: RMS step ε);   x ← clip(x + δ, 0, 1)

one normalised gradient-*ascent* step; the KD loss of that step is computed on the perturbed batch only (teachers
re-evaluated on it). The official ε is 1/255 on CIFAR in [0, 1]; digits are quantised at 1/16, so the recipe
sweeps ε.

Deviations from the official code: MLPs on 8×8 digits instead of WRN-28-4 on CIFAR-100 (so no BatchNorm), Adam
instead of SGD + cosine schedule, and weight decay applied only to the fast weights (toward 1).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, StructuredLinear

from .data import load_digits
from .models import MLP
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, paired, plot_curves
from .train import (classification_metrics, cross_entropy_loss, epoch_batches, fit, make_optimizer,
                    soft_cross_entropy)

SUPPORTED = (nn.Linear, nn.Conv2d, MonarchLinear, BlockdiagLinear)


# ----------------------------------------------------------------------------------------------------------------
# BatchEnsemble wrapper
# ----------------------------------------------------------------------------------------------------------------
def _io_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    if isinstance(layer, (nn.Linear, StructuredLinear)):
        return layer.in_features, layer.out_features
    raise TypeError(f"BatchEnsemble: layer must be one of nn.Linear, nn.Conv2d, MonarchLinear, BlockdiagLinear; "
                    f"got {type(layer).__name__}")


def _forward_nobias(layer: nn.Module, x: Tensor) -> Tensor:
    """The wrapped layer's map without its bias: ``W x``."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, layer.weight, None)
    if isinstance(layer, StructuredLinear):
        return layer._forward(x, layer._weights(), None)
    return F.linear(x, layer.weight)


@torch.no_grad()
def fold_scales_(layer: nn.Module, r: Tensor, s: Tensor) -> nn.Module:
    """In place, turn ``layer`` (map ``x ↦ W x + b``) into ``x ↦ s ∘ (W (r ∘ x) + b)``, i.e.
    ``W ← diag(s)·W·diag(r)`` and ``b ← s ∘ b``, keeping the layer's class and structure.

    ``r``: ``(in_features,)`` (``in_channels`` for a conv), ``s``: ``(out_features,)``. A ``MonarchLinear`` stays
    Monarch (``r`` scales the columns of ``w1``, ``s`` the rows of ``w2`` after undoing ``P2``); a
    ``BlockdiagLinear`` stays block-diagonal (its optional channel shuffle is applied to ``r``).
    """
    n_in, n_out = _io_features(layer)
    for name, v, n in (("r", r, n_in), ("s", s, n_out)):
        if not isinstance(v, Tensor) or v.shape != (n,):
            raise ValueError(f"fold_scales_: {name} must be a tensor of shape ({n},), got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    if isinstance(layer, nn.Conv2d):
        w = layer.weight  # (out, in/groups, kh, kw)
        out_pg, in_pg = n_out // layer.groups, w.shape[1]
        group = torch.arange(n_out, device=w.device) // out_pg
        col = group[:, None] * in_pg + torch.arange(in_pg, device=w.device)[None, :]  # input channel of w[o, j]
        w.mul_((s[:, None] * r[col])[:, :, None, None].to(w.dtype))
    elif isinstance(layer, MonarchLinear):
        sh = layer.shape
        r_pad = F.pad(r, (0, sh.n_in - n_in), value=1.0).view(sh.k, 1, sh.p)  # input index kk·p + pp
        s_pad = F.pad(s, (0, sh.n_out - n_out), value=1.0).view(sh.s, sh.l).T  # [ll, ss] = s[ss·l + ll]
        layer.w1.mul_(r_pad.to(layer.w1.dtype))
        layer.w2.mul_(s_pad[:, :, None].to(layer.w2.dtype))
    elif isinstance(layer, BlockdiagLinear):
        k, q, p = layer.weight.shape
        r_eff = layer._shuffle(r) if layer.shuffle else F.pad(r, (0, k * p - n_in), value=1.0)
        s_pad = F.pad(s, (0, k * q - n_out), value=1.0)
        layer.weight.mul_((s_pad.view(k, q, 1) * r_eff.view(k, 1, p)).to(layer.weight.dtype))
    else:  # nn.Linear
        layer.weight.mul_((s[:, None] * r[None, :]).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.mul_(s.to(layer.bias.dtype))
    return layer


class BatchEnsemble(nn.Module):
    """BatchEnsemble over ``layer`` with ``members`` members: ``y_m = s_m ∘ (W(r_m ∘ x) + b)``.

    Input ``(members·B, in, ...)`` for linear layers (features last) or ``(members·B, C_in, H, W)`` for a conv,
    member-major (rows ``m·B .. (m+1)·B − 1`` are member ``m``); output likewise. ``r``: ``(members, in)``,
    ``s``: ``(members, out)``, initialised to 1 (``init="ones"``, the official choice) or to random ±1
    (``init="random_sign"``, the original BatchEnsemble). The wrapped layer's parameters are shared.
    """

    def __init__(self, layer: nn.Module, members: int, init: str = "ones", generator: Optional[torch.Generator] = None):
        super().__init__()
        n_in, n_out = _io_features(layer)
        if not isinstance(members, int) or isinstance(members, bool) or members < 1:
            raise ValueError(f"BatchEnsemble: members must be a positive int, got {members!r}")
        if init not in ("ones", "random_sign"):
            raise ValueError(f"BatchEnsemble: init must be 'ones' or 'random_sign', got {init!r}")
        self.layer, self.members = layer, members
        ref = next(layer.parameters())
        r = torch.ones(members, n_in, dtype=ref.dtype)
        s = torch.ones(members, n_out, dtype=ref.dtype)
        if init == "random_sign":
            r = torch.randint(0, 2, r.shape, generator=generator).to(r.dtype) * 2 - 1
            s = torch.randint(0, 2, s.shape, generator=generator).to(s.dtype) * 2 - 1
        self.r = nn.Parameter(r.to(ref.device))
        self.s = nn.Parameter(s.to(ref.device))
        self.is_conv = isinstance(layer, nn.Conv2d)

    def _per_row(self, v: Tensor, x: Tensor) -> Tensor:
        """``(members, C)`` -> broadcastable against ``x`` with rows member-major."""
        b = x.shape[0] // self.members
        v = v.repeat_interleave(b, dim=0)  # (members·B, C)
        if self.is_conv:
            return v[:, :, None, None]
        return v.view(v.shape[0], *([1] * (x.dim() - 2)), v.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] % self.members:
            raise ValueError(f"BatchEnsemble: input batch must be a multiple of members={self.members} "
                             f"(member-major tiling, see tile_members), got shape {tuple(x.shape)}")
        h = _forward_nobias(self.layer, x * self._per_row(self.r, x))
        if self.layer.bias is not None:
            h = h + (self.layer.bias[:, None, None] if self.is_conv else self.layer.bias)
        return h * self._per_row(self.s, h)

    @torch.no_grad()
    def member_layer(self, m: int) -> nn.Module:
        """A plain copy of the layer computing member ``m``'s map (``W_m = diag(s_m) W diag(r_m)``)."""
        return fold_scales_(copy.deepcopy(self.layer), self.r[m].clone(), self.s[m].clone())

    @torch.no_grad()
    def fold_mean_(self) -> nn.Module:
        """Average the members in latent space and fold them into the wrapped layer, in place.

        Afterwards ``self.layer`` computes ``x ↦ s̄ ∘ (W(r̄ ∘ x) + b)`` with ``r̄, s̄`` the member means (exactly
        the BE layer whose members all carry ``r̄, s̄``), every ``r_m, s_m`` is reset to 1 (so this wrapper keeps
        computing the same map), and the plain layer — of the original class, a ``MonarchLinear`` stays Monarch —
        is returned.
        """
        fold_scales_(self.layer, self.r.mean(0), self.s.mean(0))
        self.r.fill_(1.0)
        self.s.fill_(1.0)
        return self.layer

    def extra_repr(self) -> str:
        return f"members={self.members}"


def batch_ensemble_(model: nn.Module, members: int, init: str = "ones",
                    generator: Optional[torch.Generator] = None) -> nn.Module:
    """Wrap every ``nn.Linear``/``nn.Conv2d``/``MonarchLinear``/``BlockdiagLinear`` of ``model`` in a
    :class:`BatchEnsemble` (in place; returns ``model``). The model's input must then be tiled member-major."""
    for name, child in list(model.named_children()):
        if isinstance(child, SUPPORTED):
            setattr(model, name, BatchEnsemble(child, members, init, generator))
        elif not isinstance(child, BatchEnsemble):
            batch_ensemble_(child, members, init, generator)
    return model


@torch.no_grad()
def fold_batch_ensembles_(model: nn.Module) -> nn.Module:
    """Replace every :class:`BatchEnsemble` in ``model`` by its folded plain layer (:meth:`~BatchEnsemble.fold_mean_`);
    in place, returns ``model`` — now a plain network of one member's cost that takes untiled inputs."""
    if isinstance(model, BatchEnsemble):
        return model.fold_mean_()
    for name, child in list(model.named_children()):
        if isinstance(child, BatchEnsemble):
            setattr(model, name, child.fold_mean_())
        else:
            fold_batch_ensembles_(child)
    return model


def tile_members(x: Tensor, members: int) -> Tensor:
    """``(B, ...)`` -> ``(members·B, ...)``, member-major (member ``m`` sees the whole batch)."""
    return x.repeat(members, *([1] * (x.dim() - 1)))


def member_logits(model: nn.Module, x: Tensor, members: int) -> Tensor:
    """Run a BE model on ``x (B, ...)`` tiled for every member; returns ``(members, B, C)``."""
    out = model(tile_members(x, members))
    return out.view(members, x.shape[0], *out.shape[1:])


def fast_parameters(model: nn.Module) -> list[Tensor]:
    return [p for m in model.modules() if isinstance(m, BatchEnsemble) for p in (m.r, m.s)]


def fast_weight_decay(model: nn.Module) -> Tensor:
    """Official regulariser of the fast weights: ``Σ_layers 0.5·(||1 − r||² + ||1 − s||²)/M``."""
    terms = [0.5 * ((1 - m.r).pow(2).sum() + (1 - m.s).pow(2).sum()) / m.members
             for m in model.modules() if isinstance(m, BatchEnsemble)]
    if not terms:
        raise ValueError("fast_weight_decay: model contains no BatchEnsemble layer")
    return torch.stack(terms).sum()


def scale_fast_grads_(model: nn.Module, factor: Optional[float] = None) -> None:
    """Multiply the gradients of all fast weights by ``factor`` (default: each layer's ``members``), as the
    official code does to undo the ``1/M`` share of the tiled batch."""
    for m in model.modules():
        if isinstance(m, BatchEnsemble):
            for p in (m.r, m.s):
                if p.grad is not None:
                    p.grad.mul_(m.members if factor is None else factor)


# ----------------------------------------------------------------------------------------------------------------
# Losses and the diversifying perturbation
# ----------------------------------------------------------------------------------------------------------------
def member_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """One-to-one KD: ``T²·mean_{m,b} CE(softmax(z_t^m/T), log_softmax(z_s^m/T))`` (Hinton et al. 2015's loss,
    :func:`methods.train.soft_cross_entropy`); both ``(M, B, C)``."""
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"member_kd_loss: student_logits and teacher_logits must both be (M, B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return temperature ** 2 * soft_cross_entropy(teacher_logits, student_logits, temperature)


def ensemble_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """KD baseline: a single student ``(B, C)`` against every teacher ``(M, B, C)``, averaged over teachers."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"ensemble_kd_loss: expected student (B, C) and teachers (M, B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return member_kd_loss(student_logits.expand_as(teacher_logits), teacher_logits, temperature)


def teacher_logits(teachers: Sequence[nn.Module], x: Tensor) -> Tensor:
    return torch.stack([t(x) for t in teachers])


def diversifying_perturbation(x: Tensor, teachers: Sequence[nn.Module], student: nn.Module, eps: float,
                              pair: tuple[int, int], clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> Tensor:
    """One normalised gradient-ascent step on ``TDiv − SDiv`` (see module docstring); returns the new inputs.

    ``x``: ``(B, ...)``; ``teachers``: ``M`` modules; ``student``: a BE model with ``M`` members (its members'
    logits come from :func:`member_logits`); ``pair = (a, b)``, ``a ≠ b``: member ``b`` is the (stop-gradient)
    target for member ``a``; ``eps``: RMS step per input entry (``||δ||₂ = eps·√D``); ``clip``: input range
    (``None`` for no clipping). Teachers and student are used in eval mode and are not updated.
    """
    m = len(teachers)
    a, b = pair
    if not (0 <= a < m and 0 <= b < m and a != b):
        raise ValueError(f"diversifying_perturbation: pair must be two distinct member indices in [0, {m}), got {pair}")
    if not eps > 0:
        raise ValueError(f"diversifying_perturbation: eps must be > 0, got {eps}")
    modes = [mod.training for mod in (*teachers, student)]
    for mod in (*teachers, student):
        mod.eval()
    x_adv = x.detach().clone().requires_grad_(True)
    t_a, t_b = teachers[a](x_adv), teachers[b](x_adv)
    s = member_logits(student, x_adv, m)
    objective = soft_cross_entropy(t_b, t_a) - soft_cross_entropy(s[b], s[a])
    (grad,) = torch.autograd.grad(objective, x_adv)
    for mod, mode in zip((*teachers, student), modes):
        mod.train(mode)
    flat = grad.flatten(1)
    d = flat.shape[1]
    delta = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12) * (eps * math.sqrt(d))
    out = x.detach() + delta.view_as(x)
    return out.clamp(*clip) if clip is not None else out


def random_pair(members: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct member indices ``(a, b)`` drawn uniformly."""
    a, b = torch.randperm(members, generator=generator)[:2].tolist()
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------------------------
def kl_to_ensemble(ensemble_probs: Tensor, logits: Tensor) -> float:
    """``mean_x KL(p_DE(x) || p_student(x))``."""
    logp = logits.log_softmax(-1)
    return float((ensemble_probs * (ensemble_probs.clamp_min(1e-12).log() - logp)).sum(-1).mean())


def probs_metrics(probs: Tensor, ens_probs: Tensor, y: Tensor) -> dict:
    """Accuracy, NLL, ECE of predicted probabilities and their KL from the ensemble's."""
    m = classification_metrics(probs.clamp_min(1e-12).log(), y)
    m["kl_to_ensemble"] = kl_to_ensemble(ens_probs, probs.clamp_min(1e-12).log())
    return m


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    members: int = option(4, "teachers = BE members")
    teacher_hidden: int = option(256, "teacher MLP width")
    student_hidden: int = option(128, "student MLP width")
    layer: str = option("monarch", "hidden layers of teachers and students", choices=("dense", "monarch", "blockdiag"))
    teacher_epochs: int = option(40, "teacher epochs")
    epochs: int = option(60, "student epochs")
    batch_size: int = option(64, "mini-batch size")
    lr: float = option(1e-3, "Adam learning rate")
    temperature: float = option(4.0, "KD temperature T")
    fast_wd: float = option(5e-4, "decay of the fast weights toward 1")
    eps: tuple[float, ...] = option((1 / 64, 1 / 16), "RMS perturbation steps (one KD+avg+perturb variant each)")
    noise: float = option(0.3, "std of the Gaussian corruption of test inputs")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")


QUICK = {"teacher_epochs": 5, "epochs": 5, "seeds": 1, "eps": (1 / 16,)}


def train_teacher(split, cfg: Config, gen: torch.Generator) -> tuple[nn.Module, int]:
    """One ensemble member: a Monarch MLP trained with cross-entropy (returns it in eval mode, and its epochs)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MLP(split.x_train.shape[1], cfg.teacher_hidden, split.num_classes, depth=2, layer=cfg.layer)
    hist = fit(model, make_optimizer(model.parameters(), "adam", lr=cfg.lr),
               epoch_batches(split.x_train, split.y_train, batch_size=cfg.batch_size, generator=gen),
               epochs=cfg.teacher_epochs, loss_fn=cross_entropy_loss)
    return model.eval(), hist.epochs


def train_student(variant: str, split, teachers, cfg: Config, gen: torch.Generator, eps: float = 0.0,
                  progress=None) -> tuple[nn.Module, dict]:
    """variant: 'kd' (plain student, ensemble KD) or 'be' (BE student, member KD, folded); eps > 0 adds the
    diversifying perturbation. Returns the deployed plain model and diagnostics."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    M = len(teachers)
    model = MLP(split.x_train.shape[1], cfg.student_hidden, split.num_classes, depth=2, layer=cfg.layer)
    if variant == "be":
        batch_ensemble_(model, M)
    fast = {id(p) for p in fast_parameters(model)}
    opt = make_optimizer(model.parameters(), "adam", lr=cfg.lr)
    for p in teachers:
        p.requires_grad_(False)

    def step(m, batch):
        (xb,) = batch
        if eps > 0:
            xb = diversifying_perturbation(xb, teachers, m, eps, random_pair(M, gen))
        with torch.no_grad():
            t = teacher_logits(teachers, xb)
        if variant == "be":
            loss = member_kd_loss(member_logits(m, xb, M), t, cfg.temperature) + cfg.fast_wd * fast_weight_decay(m)
        else:
            loss = ensemble_kd_loss(m(xb), t, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "be":
            scale_fast_grads_(m)
        opt.step()
        return loss

    hist = fit(model, None, epoch_batches(split.x_train, batch_size=cfg.batch_size, generator=gen),
               epochs=cfg.epochs, step=step, on_epoch_end=lambda _e: progress.update(1) if progress else None)
    diag = {"epochs": hist.epochs, "eps": eps, "hidden": model.net[0].layer.out_features if variant == "be"
            else model.net[0].out_features}
    if variant == "be":
        model.eval()
        with torch.no_grad():
            s = member_logits(model, split.x_test, M).softmax(-1)
            diag["member_disagreement"] = float((s.argmax(-1) != s.mean(0).argmax(-1)).float().mean())
            diag["be_ensemble_probs"] = s.mean(0)
        fold_batch_ensembles_(model)
        assert not fast & {id(p) for p in model.parameters()}
    return model.eval(), diag


def run_seed(seed: int, cfg: Config, ctx: RunContext, bar) -> dict:
    """Teachers, then every student variant, evaluated on clean and Gaussian-corrupted test inputs."""
    gen = torch.Generator().manual_seed(seed)
    split = load_digits(seed).flat()
    noise_gen = torch.Generator().manual_seed(10_000 + seed)
    x_noisy = (split.x_test + cfg.noise * torch.randn(split.x_test.shape, generator=noise_gen)).clamp(0, 1)
    tests = {"clean": split.x_test, "noisy": x_noisy}
    teachers, epochs = zip(*[train_teacher(split, cfg, gen) for _ in range(cfg.members)])
    ctx.observe(teacher_epochs=epochs[0], members=len(teachers))
    with torch.no_grad():
        ens = {c: teacher_logits(teachers, x).softmax(-1).mean(0) for c, x in tests.items()}
    res = {"teachers(DE)": {c: probs_metrics(ens[c], ens[c], split.y_test) for c in tests}}
    perturbed = []
    for v, variant, eps in [("kd", "kd", 0.0), ("kd+avg", "be", 0.0)] + [
            (f"kd+avg+perturb(eps={e:.3g})", "be", e) for e in cfg.eps]:
        model, diag = train_student(variant, split, teachers, cfg, gen, eps=eps, progress=bar)
        ctx.observe(epochs=diag["epochs"], student_hidden=diag["hidden"])
        with torch.no_grad():
            res[v] = {c: probs_metrics(model(x).softmax(-1), ens[c], split.y_test) for c, x in tests.items()}
        if variant == "be":
            res[v]["member_disagreement_before_fold"] = diag["member_disagreement"]
        if diag["eps"] > 0:
            perturbed.append(diag["eps"])
        if v == "kd+avg":  # the unfolded BE ensemble (M× inference cost) as a reference, clean inputs only
            res["be_ensemble(unfolded)"] = {"clean": probs_metrics(diag["be_ensemble_probs"], ens["clean"],
                                                                   split.y_test)}
    ctx.observe(eps=perturbed)
    return res


def run(cfg: Config, ctx: RunContext) -> dict:
    variants = ["kd", "kd+avg"] + [f"kd+avg+perturb(eps={e:.3g})" for e in cfg.eps]
    bar = ctx.progress(total=cfg.seeds * len(variants) * cfg.epochs, desc="ensemble_distill")
    per_seed = []
    for seed in seed_list(ctx.seed, cfg.seeds):
        per_seed.append(run_seed(seed, cfg, ctx, bar))
        ctx.log(f"seed {seed}: " + ", ".join(f"{v} nll={per_seed[-1][v]['clean']['nll']:.3f}/"
                                              f"{per_seed[-1][v]['noisy']['nll']:.3f}" for v in variants))
    bar.close()
    ctx.observe(seeds=len(per_seed))
    table = {v: aggregate([r[v] for r in per_seed]) for v in per_seed[0]}
    # paired over seeds (same teachers): does averaging / the perturbation lower NLL and KL vs plain KD?
    comparisons = {f"{a}_minus_{b}": {c: {k: paired([r[a][c][k] for r in per_seed], [r[b][c][k] for r in per_seed])
                                          for k in ("nll", "kl_to_ensemble", "accuracy")} for c in ("clean", "noisy")}
                   for a, b in [("kd+avg", "kd")] + [(v, "kd+avg") for v in variants[2:]]}
    names = ["teachers(DE)"] + variants
    plot_curves(ctx.plot_path("ensemble_distill.png"), [
        Panel(k, kind="bar", groups={c: {n: table[n][c][k] for n in names} for c in ("clean", "noisy")})
        for k in ("accuracy", "nll", "kl_to_ensemble")],
        title=f"ensemble distillation on digits ({cfg.members} teachers, {cfg.seeds} seeds, {cfg.layer} MLPs)")
    return {"dataset": "digits", "members": cfg.members, "seeds": seed_list(ctx.seed, cfg.seeds), "eps": list(cfg.eps),
            "table": table, "paired": comparisons,
            "per_seed": [{v: {c: r[v][c] for c in ("clean", "noisy") if c in r[v]} for v in r} for r in per_seed]}


RECIPE = Recipe("ensemble_distill", Config, run, quick=QUICK,
                description="Ensemble distillation into a BatchEnsemble student, latent weight averaging and "
                            "diversifying perturbation (Nam et al. 2022) on digits")
