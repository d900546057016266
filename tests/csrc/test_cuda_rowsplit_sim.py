"""The row-split few-token Monarch forward (``csrc/cuda/decode_rowsplit.cuh``) run on the CPU emulation of
``tests/sim_harness.py``: plan, indexing, P1/P2, chunking, shuffle reductions, rounding and epilogue checked per
element against float64, with poisoned outputs and NaN-poisoned shared memory."""
import pytest
import torch

from monarch_kernels import cuda_cost
from sim_harness import H100_SMEM, assert_close, expected, factors, needs_sim, run_sim

pytestmark = needs_sim


# (k, q, p, l, s, r): square c = 1, rank c = 2, fan-out / fan-in GPT-2-like, 1-wide blocks, r < k, odd widths
SHAPES = [
    (8, 8, 8, 8, 8, 8),
    (4, 8, 16, 4, 24, 8),
    (4, 48, 12, 4, 48, 48),
    (4, 12, 48, 4, 12, 12),
    (16, 1, 1, 4, 3, 4),
    (8, 2, 4, 16, 5, 1),
    (5, 6, 7, 3, 9, 10),
    (2, 64, 64, 2, 40, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64(sim_binary, tmp_path, shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    k, q, p, l, s, r = shape
    w1, w2 = factors(*shape, dtype, gen)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, k * p, generator=gen).to(dtype)
        plan, out = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2)
        assert plan["supported"], plan
        assert_close(out, expected(x, w1, w2, None, l * s, "none"), dtype)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_bias_activation_ragged_strided(sim_binary, tmp_path, act):
    """n_in < k·p (missing inputs are zero), n_out < l·s (truncated), x with a row pitch and column stride 2,
    bias and an activation; the same call with misaligned operands (element loads instead of vectors)."""
    gen = torch.Generator().manual_seed(7)
    k, q, p, l, s, r = 4, 16, 16, 8, 12, 8
    w1, w2 = factors(k, q, p, l, s, r, torch.bfloat16, gen)
    n_in, n_out = 61, 90
    base = torch.randn(5, 2 * n_in + 6, generator=gen).to(torch.bfloat16)
    x = base[:, : 2 * n_in : 2]
    bias = torch.randn(n_out, generator=gen).to(torch.bfloat16)
    exp = expected(x, w1, w2, bias, n_out, act)
    for misalign in (False, True):
        plan, out = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2, bias, n_out, act, misalign=misalign)
        assert plan["x_vec"] == 0 and plan["s1_vec"] == 0 and plan["w1_vec"] == int(not misalign)
        assert_close(out, exp, torch.bfloat16)


def test_vector_paths_and_splits(sim_binary, tmp_path):
    """Aligned 16-byte rows take the vector loads (stage 1's branch-free path, several rows per lane group,
    rows past r clamped to a valid one and dropped); few stage-2 blocks are split across CTAs (splits > 1), and
    every split writes its own rows (the poisoned output would show a missing one)."""
    gen = torch.Generator().manual_seed(3)
    k, q, p, l, s, r = 4, 16, 32, 2, 64, 32
    w1, w2 = factors(k, q, p, l, s, r, torch.float16, gen)
    x = torch.randn(4, k * p, generator=gen).to(torch.float16)
    bias = torch.randn(l * s, generator=gen).to(torch.float16)
    plan, out = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2, bias)
    assert plan["x_vec"] == plan["w1_vec"] == plan["w2_vec"] == plan["s1_vec"] == 1  # the branch-free stage 1
    assert plan["splits"] == 4 and plan["s_per"] == 16
    assert_close(out, expected(x, w1, w2, bias, l * s, "none"), torch.float16)


def test_nan_and_inf_propagate(sim_binary, tmp_path):
    gen = torch.Generator().manual_seed(11)
    shape = (8, 8, 8, 8, 8, 8)
    w1, w2 = factors(*shape, torch.float32, gen)
    x = torch.randn(3, 64, generator=gen)
    x[0, 5] = float("nan")
    x[2, 17] = float("inf")
    _, out = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2)
    exp = expected(x, w1, w2, None, 64, "none")
    assert exp[0].isnan().all() and exp[1].isfinite().all() and not exp[2].isfinite().all()
    assert_close(out, exp, torch.float32)


def test_plan_declines_and_matches_the_cost_model(sim_binary, tmp_path):
    """The plan declines past 16 tokens, past its per-CTA stage-1 bytes and past the shared memory; the cost
    model's mirror (:func:`monarch_kernels.cuda_cost.rowsplit_plan`) agrees with it on every case."""
    gen = torch.Generator().manual_seed(5)
    cases = [  # (tokens, (k, q, p, l, s, r), smem)
        (17, (8, 8, 8, 8, 8, 8), H100_SMEM),
        (16, (8, 8, 8, 8, 8, 8), 16 * 8 * 4 - 4),
        (16, (8, 8, 8, 8, 8, 8), 16 * 8 * 4),
        (1, (4, 256, 256, 4, 256, 256), H100_SMEM),   # 1/l of w1 = 128 KiB: taken
        (1, (2, 512, 512, 2, 512, 512), H100_SMEM),   # 512 KiB + x: declined
        (16, (64, 64, 64, 64, 64, 64), H100_SMEM),
        (3, (5, 6, 7, 3, 9, 10), H100_SMEM),
    ]
    sms = 8
    for tokens, shape, smem in cases:
        k, q, p, l, s, r = shape
        w1 = torch.zeros(k, q, p, dtype=torch.bfloat16)
        w2 = torch.zeros(l, s, r, dtype=torch.bfloat16)
        x = torch.randn(tokens, k * p, generator=gen).to(torch.bfloat16)
        plan, _ = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2, sms=sms, smem=smem, plan_only=True)
        mirror = cuda_cost.rowsplit_plan(tokens, shape, k * p, "bfloat16", sms, smem)
        if mirror is None:
            assert not plan["supported"], (tokens, shape, plan)
        else:
            assert plan["supported"] and plan["splits"] == mirror["splits"], (tokens, shape, plan, mirror)


def test_ragged_input_with_aligned_rows_takes_the_general_stage1(sim_binary, tmp_path):
    """n_in < k·p with otherwise vector-loadable rows: x_vec, but stage 1 must bound x (s1_vec off)."""
    gen = torch.Generator().manual_seed(13)
    k, q, p, l, s, r = 4, 8, 16, 4, 8, 8
    w1, w2 = factors(k, q, p, l, s, r, torch.bfloat16, gen)
    x = torch.randn(2, 56, generator=gen).to(torch.bfloat16)
    plan, out = run_sim(sim_binary, "rowsplit", tmp_path, x, w1, w2)
    assert plan["x_vec"] == 1 and plan["s1_vec"] == 0
    assert_close(out, expected(x, w1, w2, None, l * s, "none"), torch.bfloat16)
