"""Ensemble distillation into a BatchEnsemble student, weight averaging, diversifying perturbation (Nam et al. 2022).

A deep ensemble of ``M`` teachers is distilled into one student that is a **BatchEnsemble** (BE) over the whole
network; at inference the members are **averaged in weight space** ("LatentBE") into a single plain network of the
same cost as one member, and during training a **diversifying input perturbation** moves each batch to where the
teachers disagree but the student's members still agree. Algorithm as in the official code
(cs-giung/distill-latentbe, read for ``research/methods-a.md`` §3); this module is the PyTorch/Monarch version.

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

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, StructuredLinear

from .data import load_digits
from .models import MLP
from .recipe import Recipe, RunContext
from .train import classification_metrics, make_optimizer, minibatches

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
        import copy

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
def soft_cross_entropy(target_logits: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``mean_rows CE(softmax(target/T), log_softmax(logits/T))`` over the last dim (no ``T²``, target detached)."""
    if target_logits.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: target_logits {tuple(target_logits.shape)} and logits "
                         f"{tuple(logits.shape)} must have the same shape (..., C)")
    p = (target_logits.detach() / temperature).softmax(-1)
    return -(p * (logits / temperature).log_softmax(-1)).sum(-1).mean()


def member_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """One-to-one KD: ``T²·mean_{m,b} CE(softmax(z_t^m/T), log_softmax(z_s^m/T))``; both ``(M, B, C)``."""
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


def _probs_metrics(probs: Tensor, y: Tensor) -> dict:
    m = classification_metrics(probs.clamp_min(1e-12).log(), y)
    return m


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--members", type=int, default=4, help="teachers = BE members")
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--layer", default="monarch", choices=["dense", "monarch", "blockdiag"],
                   help="hidden layers of teachers and students")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=60, help="student epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--fast-wd", type=float, default=5e-4, help="decay of the fast weights toward 1")
    p.add_argument("--eps", type=float, nargs="+", default=[1 / 64, 1 / 16],
                   help="RMS perturbation steps (one KD+avg+perturb variant each)")
    p.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian corruption of test inputs")
    p.add_argument("--seeds", type=int, default=3)


def _train_teacher(split, hidden, layer, epochs, lr, bs, gen) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MLP(split.x_train.shape[1], hidden, split.num_classes, depth=2, layer=layer)
    opt = make_optimizer(model.parameters(), "adam", lr=lr)
    for _ in range(epochs):
        model.train()
        for idx in minibatches(len(split.x_train), bs, gen):
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _train_student(variant: str, split, teachers, args, gen, eps: float = 0.0, progress=None) -> tuple[nn.Module, dict]:
    """variant: 'kd' (plain student, ensemble KD) or 'be' (BE student, member KD, folded); eps > 0 adds the
    diversifying perturbation. Returns the deployed plain model and diagnostics."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    M = len(teachers)
    model = MLP(split.x_train.shape[1], args.student_hidden, split.num_classes, depth=2, layer=args.layer)
    if variant == "be":
        batch_ensemble_(model, M)
    fast = {id(p) for p in fast_parameters(model)}
    opt = make_optimizer(model.parameters(), "adam", lr=args.lr)
    for p in teachers:
        p.requires_grad_(False)
    for _ in range(args.epochs):
        model.train()
        for idx in minibatches(len(split.x_train), args.batch_size, gen):
            xb = split.x_train[idx]
            if eps > 0:
                xb = diversifying_perturbation(xb, teachers, model, eps, random_pair(M, gen))
            with torch.no_grad():
                t = teacher_logits(teachers, xb)
            if variant == "be":
                loss = member_kd_loss(member_logits(model, xb, M), t, args.temperature)
                loss = loss + args.fast_wd * fast_weight_decay(model)
            else:
                loss = ensemble_kd_loss(model(xb), t, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if variant == "be":
                scale_fast_grads_(model)
            opt.step()
        if progress is not None:
            progress.update(1)
    diag = {}
    if variant == "be":
        model.eval()
        with torch.no_grad():
            s = member_logits(model, split.x_test, M).softmax(-1)
            diag["member_disagreement"] = float((s.argmax(-1) != s.mean(0).argmax(-1)).float().mean())
            diag["be_ensemble_probs"] = s.mean(0)
        fold_batch_ensembles_(model)
        assert not fast & {id(p) for p in model.parameters()}
    return model.eval(), diag


def _evaluate(model_probs: Tensor, ens_probs: Tensor, y: Tensor) -> dict:
    m = _probs_metrics(model_probs, y)
    m["kl_to_ensemble"] = kl_to_ensemble(ens_probs, model_probs.clamp_min(1e-12).log())
    return m


def run(args, ctx: RunContext) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if args.quick:
        args.teacher_epochs, args.epochs, args.seeds, args.eps = 5, 5, 1, [1 / 16]
    eps_list = list(args.eps)
    variants = ["kd", "kd+avg"] + [f"kd+avg+perturb(eps={e:.3g})" for e in eps_list]
    conditions = ("clean", "noisy")
    results = {v: {c: [] for c in conditions} for v in ["teachers(DE)", "be_ensemble(unfolded)"] + variants}
    disagreement = {v: [] for v in variants[1:]}
    bar = ctx.progress(total=args.seeds * (len(variants) * args.epochs), desc="ensemble_distill")
    for si in range(args.seeds):
        seed = args.seed + si
        gen = torch.Generator().manual_seed(seed)
        split = load_digits(seed).flat()
        noise_gen = torch.Generator().manual_seed(10_000 + seed)
        x_noisy = (split.x_test + args.noise * torch.randn(split.x_test.shape, generator=noise_gen)).clamp(0, 1)
        tests = {"clean": split.x_test, "noisy": x_noisy}
        teachers = [_train_teacher(split, args.teacher_hidden, args.layer, args.teacher_epochs, args.lr,
                                   args.batch_size, gen) for _ in range(args.members)]
        with torch.no_grad():
            ens = {c: teacher_logits(teachers, x).softmax(-1).mean(0) for c, x in tests.items()}
        for c in conditions:
            results["teachers(DE)"][c].append(_evaluate(ens[c], ens[c], split.y_test))
        for v in variants:
            if v == "kd":
                model, diag = _train_student("kd", split, teachers, args, gen, progress=bar)
            else:
                eps = eps_list[variants.index(v) - 2] if v.startswith("kd+avg+") else 0.0
                model, diag = _train_student("be", split, teachers, args, gen, eps=eps, progress=bar)
                disagreement[v].append(diag["member_disagreement"])
            with torch.no_grad():
                for c, x in tests.items():
                    results[v][c].append(_evaluate(model(x).softmax(-1), ens[c], split.y_test))
            if v == "kd+avg":  # the unfolded BE ensemble (M× inference cost) as a reference, clean inputs only
                results["be_ensemble(unfolded)"]["clean"].append(
                    _evaluate(diag["be_ensemble_probs"], ens["clean"], split.y_test))
        ctx.log(f"seed {seed}: " + ", ".join(
            f"{v} nll={results[v]['clean'][-1]['nll']:.3f}/{results[v]['noisy'][-1]['nll']:.3f}" for v in variants))
    bar.close()

    def agg(rows: list[dict]) -> dict:
        if not rows:
            return {}
        out = {}
        for k in rows[0]:
            vals = np.array([r[k] for r in rows])
            out[k] = {"mean": float(vals.mean()), "std": float(vals.std())}
        return out

    table = {v: {c: agg(results[v][c]) for c in conditions if results[v][c]} for v in results}
    # effect checks (honest flags, not tuned): does averaging/perturbation lower NLL and KL vs plain KD?
    effects = {}
    best = min(variants[2:], key=lambda v: table[v]["noisy"]["nll"]["mean"]) if len(variants) > 2 else None
    for c in conditions:
        for metric in ("nll", "kl_to_ensemble"):
            kd, avg = table["kd"][c][metric]["mean"], table["kd+avg"][c][metric]["mean"]
            effects[f"{c}_{metric}_avg_lt_kd"] = avg < kd
            if best is not None:
                effects[f"{c}_{metric}_perturb_lt_avg"] = table[best][c][metric]["mean"] < avg
    metrics = {
        "dataset": "digits", "members": args.members, "seeds": args.seeds, "layer": args.layer,
        "noise_std": args.noise, "eps": eps_list, "table": table,
        "member_disagreement_before_fold": {v: float(np.mean(d)) for v, d in disagreement.items() if d},
        "best_perturb_variant": best, "effects": effects,
    }

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = ["teachers(DE)"] + variants
    xpos = np.arange(len(names))
    for ax, metric in zip(axes, ("accuracy", "nll", "kl_to_ensemble")):
        for j, c in enumerate(conditions):
            vals = [table[n][c][metric]["mean"] for n in names]
            errs = [table[n][c][metric]["std"] for n in names]
            ax.bar(xpos + (j - 0.5) * 0.38, vals, 0.38, yerr=errs, label=c)
        ax.set_xticks(xpos, names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(f"ensemble distillation on digits ({args.members} teachers, {args.seeds} seeds, {args.layer} MLPs)")
    fig.tight_layout()
    fig.savefig(ctx.plot_path("ensemble_distill.png"), dpi=120)
    plt.close(fig)
    return metrics


RECIPE = Recipe("ensemble_distill", add_arguments, run,
                "Ensemble distillation into a BatchEnsemble student, latent weight averaging and diversifying "
                "perturbation (Nam et al. 2022) on digits")
