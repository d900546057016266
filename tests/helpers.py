"""Independent reference formulations used as test oracles (deliberately not the library's code path)."""
import torch


def blockdiag_dense(w: torch.Tensor) -> torch.Tensor:
    """Dense block-diagonal matrix ``(k·q, k·p)`` from ``w (k, q, p)``."""
    return torch.block_diag(*w.unbind(0))


def perm_view_transpose(rows: int, cols: int, dtype=torch.float64) -> torch.Tensor:
    """Permutation matrix P with ``(P v)`` = ``v.view(rows, cols).T.flatten()``."""
    n = rows * cols
    idx = torch.arange(n).view(rows, cols).T.reshape(-1)
    P = torch.zeros(n, n, dtype=dtype)
    P[torch.arange(n), idx] = 1
    return P


def monarch_dense_explicit(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``P2 · BD(w2) · P1 · BD(w1)`` built from explicit permutation and block-diagonal matrices."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    P1 = perm_view_transpose(r, l, w1.dtype)
    P2 = perm_view_transpose(l, s, w1.dtype)
    return P2 @ blockdiag_dense(w2) @ P1 @ blockdiag_dense(w1)


def monarch_einsum(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """fly's v2 formulation: einsum, rearrange '(r l) -> l r', einsum, rearrange '(l s) -> (s l)'."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    y = torch.einsum("...kp,kqp->...kq", x.unflatten(-1, (k, p)), w1).flatten(-2)
    z = y.unflatten(-1, (r, l)).transpose(-1, -2)  # (..., l, r)
    o = torch.einsum("...lr,lsr->...ls", z, w2)
    return o.transpose(-1, -2).flatten(-2)
