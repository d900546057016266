"""Projection: exact recovery, optimality, DFT as a Monarch matrix, bad input."""
import math

import pytest
import torch

import monarch_kernels as mk
from conftest import rel_err
from helpers import monarch_dense_explicit

SHAPES = [
    ((4, 4, 4), (4, 4, 4)),
    ((8, 192, 96), (24, 16, 64)),
    ((4, 12, 12), (4, 48, 12)),
    ((4, 12, 48), (4, 12, 12)),
    ((3, 5, 7), (5, 6, 3)),
    ((4, 5, 8), (4, 6, 5)),
    ((2, 9, 3), (3, 4, 6)),
]


@pytest.mark.parametrize("s1,s2", SHAPES)
def test_recovers_random_monarch_exactly(s1, s2):
    w1, w2 = torch.randn(s1, dtype=torch.float64), torch.randn(s2, dtype=torch.float64)
    M = mk.monarch_to_dense(w1, w2)
    p1, p2 = mk.project(M, w1_shape=s1, w2_shape=s2)
    assert p1.shape == s1 and p2.shape == s2
    assert rel_err(mk.monarch_to_dense(p1, p2), M) < 1e-12


@pytest.mark.parametrize("n_in,n_out,nb", [(48, 192, 4), (192, 48, 4), (64, 64, 8), (30, 30, 3)])
def test_monarch_linear_layout(n_in, n_out, nb):
    sh = mk.monarch_factor_shapes(n_in, n_out, nb)
    w1, w2 = torch.randn(sh.w1_shape, dtype=torch.float64), torch.randn(sh.w2_shape, dtype=torch.float64)
    M = mk.monarch_to_dense(w1, w2)
    p1, p2 = mk.project(M, nb)
    assert rel_err(mk.monarch_to_dense(p1, p2), M) < 1e-12


def _sq_err(W, w1, w2):
    return (W - mk.monarch_to_dense(w1, w2)).pow(2).sum().item()


@pytest.mark.parametrize("s1,s2", [((4, 12, 12), (4, 48, 12)), ((4, 5, 8), (4, 6, 5)), ((3, 5, 7), (5, 6, 3))])
def test_optimal_on_random_dense(s1, s2):
    n_out, n_in = s2[0] * s2[1], s1[0] * s1[2]
    W = torch.randn(n_out, n_in, dtype=torch.float64)
    w1, w2 = mk.project(W, w1_shape=s1, w2_shape=s2)
    best = _sq_err(W, w1, w2)
    assert best < W.pow(2).sum().item()
    gen = torch.Generator().manual_seed(7)
    for eps in (1e-4, 1e-2, 1e-1, 1.0):
        for _ in range(5):
            d1 = eps * torch.randn(s1, generator=gen, dtype=torch.float64)
            d2 = eps * torch.randn(s2, generator=gen, dtype=torch.float64)
            assert _sq_err(W, w1 + d1, w2 + d2) >= best - 1e-9
    # stationarity: the gradient of the squared error vanishes at the optimum
    a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    loss = (W - mk.monarch_to_dense(a, b)).pow(2).sum()
    ga, gb = torch.autograd.grad(loss, (a, b))
    assert ga.norm() < 1e-9 * W.norm() and gb.norm() < 1e-9 * W.norm()


def test_error_equals_discarded_singular_values():
    """Square b = √n layout: the squared error is the sum of the discarded σ² of every sub-block."""
    m = 6
    W = torch.randn(m * m, m * m, dtype=torch.float64)
    w1, w2 = mk.project(W, w1_shape=(m, m, m), w2_shape=(m, m, m))
    # sub-block (l, k) holds W[s·m + l, k·m + p] over (s, p); its best rank-1 fit leaves σ_2² + ...
    blocks = W.reshape(m, m, m, m).permute(1, 2, 0, 3)
    S = torch.linalg.svdvals(blocks)
    assert math.isclose(_sq_err(W, w1, w2), S[..., 1:].pow(2).sum().item(), rel_tol=1e-10)


@pytest.mark.parametrize("n1,n2", [(4, 4), (8, 8), (3, 5), (5, 3), (3, 9), (5, 17)])
def test_dft_is_monarch_up_to_input_permutation(n1, n2):
    """F[a, b] = ω^{ab}, n = n1·n2: with inputs reordered b1·n2 + b2 -> b1 + n1·b2, F is Monarch with
    w1 (n1, n2, n2), w2 (n2, n1, n1) (Cooley–Tukey), so the projection is exact."""
    n = n1 * n2
    idx = torch.arange(n, dtype=torch.float64)
    F = torch.exp(-2j * math.pi * torch.outer(idx, idx) / n)
    b1, b2 = torch.meshgrid(torch.arange(n1), torch.arange(n2), indexing="ij")
    perm = (b1 + n1 * b2).reshape(-1)
    target = F[:, perm]
    w1, w2 = mk.project(target, w1_shape=(n1, n2, n2), w2_shape=(n2, n1, n1))
    assert rel_err(mk.monarch_to_dense(w1, w2), target) < 1e-12
    # without the permutation it is not Monarch in this layout
    w1u, w2u = mk.project(F, w1_shape=(n1, n2, n2), w2_shape=(n2, n1, n1))
    if min(n1, n2) > 2:
        assert rel_err(mk.monarch_to_dense(w1u, w2u), F) > 0.1


def test_half_precision_projects_in_float32():
    sh = mk.monarch_factor_shapes(32, 32, 4)
    w1, w2 = torch.randn(sh.w1_shape), torch.randn(sh.w2_shape)
    M = mk.monarch_to_dense(w1, w2).to(torch.bfloat16)
    p1, p2 = mk.project(M, 4)
    assert p1.dtype == torch.bfloat16
    assert rel_err(mk.monarch_to_dense(p1.float(), p2.float()), M.float()) < 2e-2


def test_bad_input():
    with pytest.raises(ValueError, match="not divisible by nblocks=4"):
        mk.project(torch.randn(32, 30), 4)
    with pytest.raises(ValueError, match="2-D"):
        mk.project(torch.randn(4, 4, 4), 2)
    with pytest.raises(ValueError, match="either nblocks or both"):
        mk.project(torch.randn(8, 8))
    with pytest.raises(ValueError, match="k·p = in"):
        mk.project(torch.randn(8, 8), w1_shape=(2, 4, 3), w2_shape=(2, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        mk.project(torch.ones(8, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="must not exceed"):
        mk.project(torch.randn(8, 8), 16)


def test_surplus_rank_slots_stay_zero_and_projection_is_exact():
    """w1 (2, 8, 3), w2 (2, 2, 8): every 2 × 3 sub-matrix A[ll, kk] receives c = 4 rank slots but has rank
    <= min(s, p) = 2, so every 4 × 6 matrix is Monarch in this layout and the projection must reproduce it
    exactly; the two surplus slots of each sub-matrix must stay zero (not copies of the last singular pair)."""
    s1, s2 = (2, 8, 3), (2, 2, 8)
    k, q, p = s1
    l, s, r = s2
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(l * s, k * p, generator=gen, dtype=torch.float64)
    w1, w2 = mk.project(W, w1_shape=s1, w2_shape=s2)
    assert rel_err(monarch_dense_explicit(w1, w2), W) < 1e-12
    # slot of stage-2 input (ll, rr): the rank-th input routed from block kk = (rr·l + ll) // q to ll
    for ll in range(l):
        seen = {}
        for rr in range(r):
            kk, qq = divmod(rr * l + ll, q)
            slot = seen.get(kk, 0)
            seen[kk] = slot + 1
            if slot >= min(s, p):
                assert w2[ll, :, rr].abs().max() == 0 and w1[kk, qq].abs().max() == 0, (ll, rr, slot)


@pytest.mark.parametrize("s1,s2", [((4, 5, 8), (4, 6, 5)), ((3, 5, 7), (5, 6, 3))])
def test_factors_split_singular_values_evenly(s1, s2):
    """Each rank-one term σ·u·vᴴ is stored as (√σ u) in w2 and (√σ vᴴ) in w1, so the column w2[ll, :, rr] and the
    row w1[kk, qq, :] it pairs with have the same norm (balanced factors, as documented)."""
    k, q, p = s1
    l, s, r = s2
    W = torch.randn(l * s, k * p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w1, w2 = mk.project(W, w1_shape=s1, w2_shape=s2)
    checked = 0
    for ll in range(l):
        for rr in range(r):
            kk, qq = divmod(rr * l + ll, q)
            col, row = w2[ll, :, rr].norm().item(), w1[kk, qq].norm().item()
            assert math.isclose(col, row, rel_tol=1e-10, abs_tol=1e-12), (ll, rr, col, row)
            checked += col > 1e-6
    assert checked > r  # the pairs compared are not all zero


def test_inconsistent_middle_width_is_rejected():
    """k·p = in and l·s = out hold but l·r != k·q: the factors cannot be chained, so project must refuse."""
    with pytest.raises(ValueError, match="l·r = k·q"):
        mk.project(torch.randn(8, 8), w1_shape=(2, 4, 4), w2_shape=(2, 4, 3))
