"""The dynamics network ``f(u; θ^e)`` with ``θ^e = θ_c + W ξ^e`` over Monarch factors (CoDA §3), its shared and
per-environment baselines, and the regulariser ``λ_m Σ_i ‖W_i‖ + λ_c ‖Ξ‖²``."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels import monarch_linear
from monarch_kernels.layers import MonarchLinear



def swish(x: Tensor, beta: Tensor) -> Tensor:
    """Official learnable swish: ``x · sigmoid(x · softplus(β)) / 1.1``."""
    return x * torch.sigmoid(x * F.softplus(beta)) / 1.1


class _RootNet(nn.Module):
    """θ_c: ``state → h (dense) → h (Monarch) ×(depth−1) → state (dense)`` with one swish slope per hidden layer."""

    def __init__(self, state_dim: int, hidden: int, depth: int, nblocks: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(state_dim, hidden)])
        for _ in range(depth - 1):
            self.layers.append(MonarchLinear(hidden, hidden, nblocks=nblocks))
        self.layers.append(nn.Linear(hidden, state_dim))
        self.betas = nn.Parameter(torch.full((depth,), 0.5))
        with torch.no_grad():  # official init_weights(init_type="default"): weights default, biases 0
            for layer in self.layers:
                layer.bias.zero_()


MODES = ("coda", "shared", "independent")
APPLY = ("dense", "factors")


class HyperMonarchDynamics(nn.Module):
    """``f(u; θ^e)`` for ``n_env`` environments at once, θ^e from one of three parameterisations:

    * ``mode="coda"``: ``θ^e = θ_c + W ξ^e`` (``self.hyper.weight`` is W of shape ``(P, code_dim)``,
      ``self.codes`` is Ξ of shape ``(n_env, code_dim)``, zero-initialised);
    * ``mode="shared"``: ``θ^e = θ_c`` (one model for all environments: ERM, no context);
    * ``mode="independent"``: one independently initialised θ^e per environment (trained from scratch).

    ``forward(t, u)`` takes ``u (n_env, B, state_dim)`` and returns ``du/dt`` of the same shape, so an instance is
    a torchdiffeq RHS; :meth:`bind` precomputes the per-environment weights once per forecast (much faster).
    """

    def __init__(self, n_env: int, state_dim: int = 2, hidden: int = 64, depth: int = 3, nblocks: int = 4,
                 code_dim: int = 2, mode: str = "coda", apply: str = "dense", factor: float = 1.0):
        super().__init__()
        for name, v in (("n_env", n_env), ("state_dim", state_dim), ("hidden", hidden), ("depth", depth),
                        ("nblocks", nblocks), ("code_dim", code_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HyperMonarchDynamics: {name} must be a positive int, got {v!r}")
        if depth < 2:
            raise ValueError(f"HyperMonarchDynamics: depth (hidden layers) must be >= 2, got {depth}")
        if mode not in MODES:
            raise ValueError(f"HyperMonarchDynamics: mode must be one of {MODES}, got {mode!r}")
        if apply not in APPLY:
            raise ValueError(f"HyperMonarchDynamics: apply must be one of {APPLY}, got {apply!r}")
        self.n_env, self.state_dim, self.mode, self.apply, self.factor = n_env, state_dim, mode, apply, factor
        self.root = _RootNet(state_dim, hidden, depth, nblocks)
        self.param_names = [n for n, _ in self.root.named_parameters()]
        self.param_shapes = [p.shape for _, p in self.root.named_parameters()]
        self.n_params = sum(p.numel() for p in self.root.parameters())
        if mode == "coda":
            self.codes = nn.Parameter(torch.zeros(n_env, code_dim))
            self.hyper = nn.Linear(code_dim, self.n_params, bias=False)
        elif mode == "independent":  # E independently initialised copies of θ, stacked on a leading env dim
            copies = [self.root] + [_RootNet(state_dim, hidden, depth, nblocks) for _ in range(n_env - 1)]
            self.env_theta = nn.ParameterList(
                [nn.Parameter(torch.stack([dict(c.named_parameters())[n].detach() for c in copies]))
                 for n in self.param_names])
            self.root.requires_grad_(False)

    # -- parameters ---------------------------------------------------------------------------------
    def theta_c(self) -> Tensor:
        """θ_c flattened, shape ``(P,)`` (the order of ``param_names``)."""
        return torch.cat([p.reshape(-1) for p in self.root.parameters()])

    def hyper_delta(self, codes: Optional[Tensor] = None) -> Tensor:
        """``W ξ^e`` for every environment, shape ``(E, P)``."""
        if self.mode != "coda":
            raise ValueError(f"hyper_delta needs mode='coda', this model has mode={self.mode!r}")
        codes = self.codes if codes is None else codes
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[1] != self.hyper.in_features:
            raise ValueError(f"codes must have shape (E, {self.hyper.in_features}), "
                             f"got {getattr(codes, 'shape', codes)}")
        return self.hyper(codes)

    def env_params(self, codes: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{name: (E or 1, *shape)}``: the parameters θ^e of every environment (leading dim 1 = shared).

        For ``mode="coda"``: ``θ_c + reshape(W ξ^e)``; ``codes`` replaces Ξ (e.g. fresh contexts for adaptation).
        """
        if self.mode == "shared":
            return {n: p.unsqueeze(0) for n, p in self.root.named_parameters()}
        if self.mode == "independent":
            return dict(zip(self.param_names, self.env_theta))
        delta = self.hyper_delta(codes)
        out, start = {}, 0
        for (n, p), shape in zip(self.root.named_parameters(), self.param_shapes):
            k = p.numel()
            out[n] = p.unsqueeze(0) + delta[:, start:start + k].reshape(-1, *shape)
            start += k
        return out

    # -- the right-hand side ------------------------------------------------------------------------
    def bind(self, codes: Optional[Tensor] = None, apply: Optional[str] = None) -> Callable[[Tensor, Tensor], Tensor]:
        """A torchdiffeq RHS ``f(t, u)`` for ``u (E, B, state_dim)`` with θ^e computed once (and, for
        ``apply="dense"``, the Monarch matrices materialised once per environment)."""
        apply = apply or self.apply
        if apply not in APPLY:
            raise ValueError(f"apply must be one of {APPLY}, got {apply!r}")
        th = self.env_params(codes)
        n_layers = len(self.root.layers)
        mats, biases = [], []
        for i, layer in enumerate(self.root.layers):
            b = th[f"layers.{i}.bias"]
            biases.append(b.unsqueeze(1))  # (E, 1, out)
            if isinstance(layer, MonarchLinear):
                w1, w2 = th[f"layers.{i}.w1"], th[f"layers.{i}.w2"]
                if apply == "dense":
                    eye = torch.eye(layer.in_features, dtype=w1.dtype, device=w1.device)
                    mats.append(torch.stack([monarch_linear(eye, w1[e], w2[e], out_features=layer.out_features)
                                             for e in range(w1.shape[0])]))  # (E, in, out) = M_eᵀ
                else:
                    mats.append((w1, w2, layer.out_features))
            else:
                mats.append(th[f"layers.{i}.weight"].transpose(1, 2))  # (E, in, out)
        slopes = F.softplus(th["betas"])  # (E, depth), once per forecast
        factor = self.factor
        if apply == "dense":
            # swish(z) = z·σ(a z)/1.1 = silu(a z)/(1.1 a): fold a into this layer's weight and bias and 1/(1.1 a)
            # into the next layer's weight, so every evaluation is baddbmm + silu per layer (7 ops in all)
            fused_w, fused_b = [], []
            for i in range(n_layers):
                w, bias = mats[i], biases[i]
                if i > 0:
                    w = w / (1.1 * slopes[:, i - 1]).view(-1, 1, 1)
                if i < n_layers - 1:
                    w, bias = w * slopes[:, i].view(-1, 1, 1), bias * slopes[:, i].view(-1, 1, 1)
                fused_w.append(w)
                fused_b.append(bias)

            def rhs(_t, u: Tensor) -> Tensor:
                h = u
                for i in range(n_layers):
                    w = fused_w[i]
                    h = torch.baddbmm(fused_b[i], h, w if w.shape[0] == h.shape[0] else w.expand(h.shape[0], -1, -1))
                    if i < n_layers - 1:
                        h = F.silu(h)
                return h * factor if factor != 1.0 else h

            return rhs

        def rhs(_t, u: Tensor) -> Tensor:  # apply="factors": monarch_linear on the adapted factors, per env
            h = u
            for i in range(n_layers):
                m = mats[i]
                if isinstance(m, tuple):
                    w1, w2, n_out = m
                    b = biases[i]
                    h = torch.stack([monarch_linear(h[e], w1[e if w1.shape[0] > 1 else 0],
                                                    w2[e if w2.shape[0] > 1 else 0],
                                                    b[e if b.shape[0] > 1 else 0, 0], out_features=n_out)
                                     for e in range(h.shape[0])])
                else:
                    h = torch.matmul(h, m) + biases[i]
                if i < n_layers - 1:
                    h = h * torch.sigmoid(h * slopes[:, i].view(-1, 1, 1)) / 1.1  # swish(h, β_i)
            return h * factor if factor != 1.0 else h

        return rhs

    def forward(self, t: Tensor, u: Tensor) -> Tensor:
        self._check_state(u)
        return self.bind()(t, u)

    def _check_state(self, u: Tensor) -> None:
        if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[0] != self.n_env or u.shape[2] != self.state_dim:
            raise ValueError(f"u must have shape (n_env={self.n_env}, B, {self.state_dim}), "
                             f"got {getattr(u, 'shape', u)}")


def group_lasso_rows(weight: Tensor) -> Tensor:
    """``Σ_i ‖W_{i,:}‖₂`` over the rows of the hypernetwork weight ``(P, d_ξ)`` (official ``l12m``).

    The gradient of a zero row is 0 (the minimum-norm subgradient), never NaN."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (P, code_dim) tensor, got {getattr(weight, 'shape', weight)}")
    sq = weight.pow(2).sum(1)
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq)).sum()


def code_l2(codes: Tensor) -> Tensor:
    """``‖Ξ‖_F²`` (official ``l2c``)."""
    return codes.pow(2).sum()


def coda_regulariser(model: HyperMonarchDynamics, lambda_m: float = 1e-6, lambda_c: float = 1e-4) -> Tensor:
    """``λ_m Σ_i ‖W_{i,:}‖₂ + λ_c ‖Ξ‖_F²`` (zero for the non-CoDA modes)."""
    if model.mode != "coda":
        return torch.zeros(())
    return lambda_m * group_lasso_rows(model.hyper.weight) + lambda_c * code_l2(model.codes)
