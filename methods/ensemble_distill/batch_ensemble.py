"""BatchEnsemble over any linear, conv or Monarch layer, and folding its members' latent average into one plain
layer of the same class and cost."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels.layers import BlockdiagLinear, MonarchLinear, StructuredLinear



SUPPORTED = (nn.Linear, nn.Conv2d, MonarchLinear, BlockdiagLinear)


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
