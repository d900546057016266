"""The many-token Monarch forward with both factors resident in shared memory (``csrc/cuda/resident.cuh``) run
on the CPU emulation of ``tests/sim_harness.py`` (a thread per CUDA thread, ``mma.sync`` emulated from the PTX
fragment tables): plan, cp.async staging, fragment indexing, P1/P2 through shared memory, rounding, epilogue and
the persistent double-buffered tile loop, per element against float64 with poisoned outputs and NaN-poisoned
shared memory."""
import pytest
import torch

from monarch_kernels import cuda_cost
from sim_harness import H100_SMEM, H100_SMS, assert_close, expected, expected_z, factors, needs_sim, run_sim

pytestmark = needs_sim


# (k, q, p, l, s, r): square c = 1 (the 1024/32 layer itself: 16 tiles of 8 columns per warp, 225 KiB of
# shared memory), rank c = 2, fan-out with r = 64 (4 k-steps), one stage-2 block (l = 1: 6 of 8 warps idle),
# odd l = 3 with q = 24 (P1 wraps inside a tile), k = 1
SHAPES = [
    (32, 32, 32, 32, 32, 32),
    (4, 32, 16, 8, 16, 16),
    (4, 64, 16, 4, 64, 64),
    (2, 8, 16, 1, 8, 16),
    (2, 24, 16, 3, 8, 16),
    (1, 32, 16, 2, 8, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_float64(sim_binary, tmp_path, shape, dtype):
    """1 token, one whole tile, 37 tokens on 2 CTAs (3 tiles: a CTA walks two, both buffers, a ragged last
    tile whose rows past the tokens must not be stored) and 75 tokens (5 tiles: a CTA walks three, so the x
    buffer it read first is refilled)."""
    gen = torch.Generator().manual_seed(sum(shape))
    k, q, p, l, s, r = shape
    w1, w2 = factors(*shape, dtype, gen)
    for tokens in (1, 16, 37, 75):
        x = torch.randn(tokens, k * p, generator=gen).to(dtype)
        plan, out = run_sim(sim_binary, "resident", tmp_path, x, w1, w2, sms=2)
        assert plan["supported"] and plan["tiles"] == -(-tokens // 16) and plan["ctas"] == min(2, plan["tiles"])
        assert_close(out, expected(x, w1, w2, None, l * s, "none"), dtype)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_bias_activation_strided_rows(sim_binary, tmp_path, act):
    """Bias (indexed by the output column after P2) and each activation; x rows with a pitch wider than n_in
    (a column slice of a wider tensor); 5 tiles on 3 CTAs."""
    gen = torch.Generator().manual_seed(5)
    k, q, p, l, s, r = 8, 16, 16, 4, 16, 32
    w1, w2 = factors(k, q, p, l, s, r, torch.bfloat16, gen)
    x = torch.randn(70, k * p + 24, generator=gen).to(torch.bfloat16)[:, : k * p]
    bias = torch.randn(l * s, generator=gen).to(torch.bfloat16)
    plan, out = run_sim(sim_binary, "resident", tmp_path, x, w1, w2, bias, act=act, sms=3)
    assert plan["supported"] and plan["tiles"] == 5 and plan["ctas"] == 3
    assert_close(out, expected(x, w1, w2, bias, l * s, act), torch.bfloat16)


def test_nan_and_inf_propagate(sim_binary, tmp_path):
    """A NaN or an infinity in one token row reaches that row's outputs only (tokens are independent)."""
    gen = torch.Generator().manual_seed(11)
    shape = (4, 32, 16, 8, 16, 16)
    w1, w2 = factors(*shape, torch.float16, gen)
    x = torch.randn(20, 64, generator=gen).to(torch.float16)
    x[0, 5] = float("nan")
    x[17, 40] = float("inf")
    _, out = run_sim(sim_binary, "resident", tmp_path, x, w1, w2, sms=1)
    exp = expected(x, w1, w2, None, 128, "none")
    assert exp[0].isnan().all() and exp[1:17].isfinite().all() and not exp[17].isfinite().all()
    assert_close(out, exp, torch.float16)


def test_plan_declines_and_matches_the_cost_model(sim_binary, tmp_path):
    """The plan declines fp32, blocks that are not whole mma tiles or wider than 64, ragged features, more than
    16 tiles of 8 columns per warp, misaligned or column-strided rows, and factors past shared memory; the cost
    model's mirror (:func:`monarch_kernels.cuda_cost.resident_plan`) agrees on every aligned case."""
    gen = torch.Generator().manual_seed(3)
    bf = torch.bfloat16
    cases = [  # (tokens, (k, q, p, l, s, r), n_out, dtype, smem)
        (40, (32, 32, 32, 32, 32, 32), 1024, bf, H100_SMEM),
        (40, (32, 32, 32, 32, 32, 32), 1024, bf, 229888 - 2),  # 1024/32 needs 229888 bytes
        (40, (4, 32, 16, 8, 16, 16), 128, torch.float32, H100_SMEM),
        (40, (4, 32, 8, 8, 16, 16), 128, bf, H100_SMEM),   # p = 8
        (40, (4, 32, 16, 8, 12, 16), 96, bf, H100_SMEM),   # s = 12
        (40, (2, 64, 128, 2, 64, 64), 128, bf, H100_SMEM),  # p = 128
        (40, (4, 32, 16, 8, 16, 16), 120, bf, H100_SMEM),  # n_out < l·s
        (40, (64, 32, 16, 64, 32, 32), 2048, bf, H100_SMEM),  # 32 tiles of 8 columns per warp
        (40, (8, 64, 64, 8, 64, 64), 512, bf, H100_SMEM),  # 176.5 KiB: taken
        (40, (16, 64, 64, 16, 64, 64), 1024, bf, H100_SMEM),  # 2 x 144 KiB padded: past shared memory
    ]
    for tokens, shape, n_out, dtype, smem in cases:
        k, q, p, l, s, r = shape
        w1 = torch.zeros(k, q, p, dtype=dtype)
        w2 = torch.zeros(l, s, r, dtype=dtype)
        x = torch.randn(tokens, k * p, generator=gen).to(dtype)
        plan, _ = run_sim(sim_binary, "resident", tmp_path, x, w1, w2, n_out=n_out, sms=2, smem=smem,
                          plan_only=True)
        mirror = cuda_cost.resident_plan(tokens, shape, k * p, n_out, "bfloat16" if dtype == bf else "float32",
                                         2, smem)
        if mirror is None:
            assert not plan["supported"], (shape, n_out, plan)
        else:
            assert plan == {"supported": True, **mirror}, (shape, plan, mirror)
    x = torch.randn(20, 64, generator=gen).to(bf)
    w1, w2 = factors(4, 32, 16, 8, 16, 16, bf, gen)
    assert not run_sim(sim_binary, "resident", tmp_path, x, w1, w2, misalign=True)[0]["supported"]
    strided = torch.randn(20, 128, generator=gen).to(bf)[:, ::2]
    assert not run_sim(sim_binary, "resident", tmp_path, strided, w1, w2)[0]["supported"]


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_keeps_the_intermediate(sim_binary, tmp_path, shape):
    """A training forward (``a.z`` set) stores the intermediate in stage 2's column order (``ll·r + rr``, as the
    backward reads it) beside an unchanged output: 37 tokens on 2 CTAs (both buffers, a ragged last tile whose
    rows past the tokens must not be stored); z and out poisoned with NaN before the launch. Shapes with the
    swizzle key varying inside a row (32 blocks of 32), r = 64 and an odd l = 3."""
    gen = torch.Generator().manual_seed(7 + sum(shape))
    k, q, p, l, s, r = shape
    w1, w2 = factors(*shape, torch.bfloat16, gen)
    x = torch.randn(37, k * p, generator=gen).to(torch.bfloat16)
    bias = torch.randn(l * s, generator=gen).to(torch.bfloat16)
    plan, out, z = run_sim(sim_binary, "resident", tmp_path, x, w1, w2, bias, act="gelu", sms=2, keep_z=True)
    assert plan["supported"] and plan["ctas"] == 2
    assert_close(z, expected_z(x, w1, w2), torch.bfloat16)
    assert_close(out, expected(x, w1, w2, bias, l * s, "gelu"), torch.bfloat16)
    # the few-token row-split kernel keeps no intermediate: it declines such a call
    assert not run_sim(sim_binary, "rowsplit", tmp_path, x[:4], w1, w2, keep_z=True)[0]["supported"]


# ------------------------------------------------------------------------------------ the cluster form


@pytest.mark.parametrize("nb", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cluster_matches_float64(sim_binary, tmp_path, nb, dtype):
    """Square Monarch with c = 1 (nb blocks of nb x nb: clusters of nb / 8 CTAs, 4096/64 at nb = 64): 1 token,
    and 70 tokens (3 tiles of 32, the last ragged) on 2 clusters (one walks two tiles: both x buffers, the
    split cluster barrier's pairing across tiles), bias + GELU on the second."""
    gen = torch.Generator().manual_seed(nb)
    shape = (nb,) * 6
    w1, w2 = factors(*shape, dtype, gen)
    bias = torch.randn(nb * nb, generator=gen).to(dtype)
    for tokens, b, act in ((1, None, "none"), (70, bias, "gelu")):
        x = torch.randn(tokens, nb * nb, generator=gen).to(dtype)
        plan, out = run_sim(sim_binary, "cluster", tmp_path, x, w1, w2, b, act=act, sms=2 * (nb // 8))
        assert plan["supported"] and plan["cluster"] == nb // 8 and plan["clusters"] == min(2, plan["tiles"])
        assert_close(out, expected(x, w1, w2, b, nb * nb, act), dtype)


@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
def test_cluster_strided_rows_and_nan(sim_binary, tmp_path, act):
    """x rows of a wider tensor; a NaN in one token row and an infinity in another stay in their rows."""
    gen = torch.Generator().manual_seed(9)
    w1, w2 = factors(*(16,) * 6, torch.bfloat16, gen)
    x = torch.randn(40, 256 + 16, generator=gen).to(torch.bfloat16)[:, :256]
    x[3, 7] = float("nan")
    x[35, 200] = float("inf")
    bias = torch.randn(256, generator=gen).to(torch.bfloat16)
    plan, out = run_sim(sim_binary, "cluster", tmp_path, x, w1, w2, bias, act=act, sms=2)
    exp = expected(x, w1, w2, bias, 256, act)
    assert plan["supported"] and plan["clusters"] == 1 and not exp[3].isfinite().all()
    assert_close(out, exp, torch.bfloat16)


def test_cluster_plan_declines_and_matches_the_cost_model(sim_binary, tmp_path):
    """Only square c = 1 Monarch with 16, 32 or 64 blocks, fp16/bf16, aligned rows, enough SMs for one cluster;
    the one-CTA kernel's plan is independent (1024/32 is taken by both). The cost model's mirror
    (:func:`monarch_kernels.cuda_cost.cluster_plan`) agrees on every aligned case."""
    gen = torch.Generator().manual_seed(4)
    bf = torch.bfloat16
    cases = [  # (tokens, (k, q, p, l, s, r), dtype, sms, smem)
        (50, (64,) * 6, bf, H100_SMS, H100_SMEM),
        (50, (64,) * 6, bf, 7, H100_SMEM),           # fewer SMs than a cluster
        (50, (64,) * 6, bf, H100_SMS, 199680 - 2),   # 4096/64 needs 199,680 bytes
        (50, (32,) * 6, bf, H100_SMS, H100_SMEM),
        (50, (32,) * 6, torch.float32, H100_SMS, H100_SMEM),
        (50, (8,) * 6, bf, H100_SMS, H100_SMEM),      # nb = 8
        (50, (32, 64, 32, 32, 64, 64), bf, H100_SMS, H100_SMEM),  # c = 2
        (50, (48,) * 6, bf, H100_SMS, H100_SMEM),     # nb = 48
    ]
    for tokens, shape, dtype, sms, smem in cases:
        k, q, p, l, s, r = shape
        w1 = torch.zeros(k, q, p, dtype=dtype)
        w2 = torch.zeros(l, s, r, dtype=dtype)
        x = torch.randn(tokens, k * p, generator=gen).to(dtype)
        plan, _ = run_sim(sim_binary, "cluster", tmp_path, x, w1, w2, n_out=l * s, sms=sms, smem=smem,
                          plan_only=True)
        mirror = cuda_cost.cluster_plan(tokens, shape, k * p, l * s, "bfloat16" if dtype == bf else "float32",
                                        sms, smem)
        if mirror is None:
            assert not plan["supported"], (shape, sms, smem, plan)
        else:
            assert plan == {"supported": True, **mirror}, (shape, plan, mirror)


@pytest.mark.parametrize("nb", [16, 64])
def test_cluster_keeps_the_intermediate(sim_binary, tmp_path, nb):
    """The cluster form with ``a.z`` set: each CTA stores its 8 stage-2 blocks' columns of the intermediate once
    the pushes have landed — 70 tokens (3 tiles, the last ragged) on 2 clusters, z and out poisoned."""
    gen = torch.Generator().manual_seed(100 + nb)
    w1, w2 = factors(*(nb,) * 6, torch.float16, gen)
    x = torch.randn(70, nb * nb, generator=gen).to(torch.float16)
    plan, out, z = run_sim(sim_binary, "cluster", tmp_path, x, w1, w2, sms=2 * (nb // 8), keep_z=True)
    assert plan["supported"] and plan["clusters"] == 2
    assert_close(z, expected_z(x, w1, w2), torch.float16)
    assert_close(out, expected(x, w1, w2, None, nb * nb, "none"), torch.float16)


@pytest.mark.parametrize("clusters", [1, 3])
def test_cluster_walks_many_tiles(sim_binary, tmp_path, clusters):
    """330 tokens (11 tiles of 32, the last ragged) on 1 or 3 clusters of 2 CTAs (nb = 16): each cluster walks 11
    or 3-4 tiles, so the three intermediate buffers wrap around several times and every tile's pushes overlap
    the previous tile's stage 2; bias + GELU, the kept intermediate too."""
    gen = torch.Generator().manual_seed(40 + clusters)
    w1, w2 = factors(*(16,) * 6, torch.bfloat16, gen)
    x = torch.randn(330, 256, generator=gen).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen).to(torch.bfloat16)
    plan, out, z = run_sim(sim_binary, "cluster", tmp_path, x, w1, w2, bias, act="gelu", sms=2 * clusters,
                           keep_z=True)
    assert plan["supported"] and plan["tiles"] == 11 and plan["clusters"] == clusters
    assert_close(out, expected(x, w1, w2, bias, 256, "gelu"), torch.bfloat16)
    assert_close(z, expected_z(x, w1, w2), torch.bfloat16)
