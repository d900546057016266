"""The cost model on hand-computed cases: sector accounting, the roofline time of a launch, dense cuBLAS, one
grouped and one scattered block-diagonal launch, the estimator registry."""
import dataclasses
import math

import pytest

from monarch_kernels import cost_model as cm
from monarch_kernels.shapes import MonarchShape
from monarch_kernels.triton import plan

DEV = cm.H100_SXM


def test_sectors():
    assert cm.sectors(2, 10) == 320  # ten scattered 2-byte accesses: ten whole sectors
    assert cm.sectors(64, 3) == 192
    assert cm.sectors(48, 1) == 64  # a 48-byte run touches two sectors
    assert cm.rows_bytes(4, 24, 2) == 4 * 64


def test_kernel_time_is_the_binding_term_plus_the_launch_gap():
    k = cm.Kernel("k", flops=6e9, useful_flops=6e9, hbm_bytes=3e6, l2_bytes=15e6, flop_rate=1e15, mem_eff=0.5)
    # HBM 3e6 / (3e12 · 0.5) = 2 µs, L2 15e6 / 7.5e12 = 2 µs, FLOPs 6e9 / 1e15 = 6 µs -> FLOP-bound
    assert k.time(DEV) == pytest.approx(6e-6 + DEV.launch_s)
    assert k.bound(DEV) == "FLOP"


def test_dense_forward_hand_computed():
    pr = cm.Problem.linear(1024, 1024, 1024, 4)
    c = cm.dense("fwd", pr, "bfloat16")
    flops = 2 * 1024**3
    bytes_ = 3 * 1024 * 1024 * 2  # x, W, y once each
    assert c.flops == flops and c.hbm_bytes == bytes_ and c.launches == 1
    assert c.time(DEV) == pytest.approx(max(bytes_ / 3e12, flops / 790e12) + 2e-6)
    assert cm.dense("fwdbwd", pr).flops == 3 * flops


def test_natural_block_diagonal_launch_hand_computed():
    """T=128, one 64x64 block, bf16: one 128x64 tile, every byte once."""
    k = cm.bd_cost("bd", 128, 1, 64, 64, "bfloat16", DEV)
    assert k.flops == k.useful_flops == 2 * 128 * 64 * 64
    assert k.hbm_bytes == 128 * 64 * 2 * 2 + 64 * 64 * 2  # x + y + w
    assert k.l2_bytes == k.hbm_bytes


def test_single_block_programs_take_wide_padded_tiles():
    """One block per program, 16-bit: a 128 x 128 fp32 accumulator fits (SINGLE_DOT_BYTES), and a 192-wide block
    is covered by two 128-wide tiles (a third padded) rather than three 64-wide ones, because the input is then
    read twice instead of three times: GPT-2 fc2's stage 1 (4 blocks 768 -> 192, token-major P1 store). fp32
    and interleaved groups keep their budgets and the 1/8 padding rule."""
    T, k, q, p = 16384, 4, 192, 768
    lp = plan.bd_launch(T, k, q, p, 2, None, (k, q), out_token_major=True)
    assert lp.tile.group == 1 and (lp.tile.block_m, lp.tile.block_n) == (128, 128)
    kern = cm.bd_cost("stage 1", T, k, q, p, "bfloat16", DEV, out_perm=(k, q), y_token_major=True)
    x_once, w = T * k * p * 2, k * q * p * 2
    assert kern.flops == 2 * T * k * 256 * p  # 192 padded to 256
    assert kern.l2_bytes == x_once * 2 + (T // 128) * w + T * k * q * 2
    fp32 = plan.bd_launch(T, k, q, p, 4, None, (k, q), out_token_major=True)
    assert fp32.tile.block_n == 64 and fp32.tile.block_m * fp32.tile.block_n * 4 <= plan.DOT_BYTES
    grouped = plan.bd_launch(T, 4, 768, 192, 2, None, (768, 4))  # fc1's stage 2: P2 interleaves 4 blocks
    assert grouped.tile.group == 4 and grouped.tile.block_n == 64
    # padding up to a third: 96 in one 128-wide tile; 80 (128 would pad 60%) in three 32-wide ones
    assert plan.bd_launch(T, k, 96, p, 2, None, (k, 96), out_token_major=True).tile.block_n == 128
    assert plan.bd_launch(T, k, 80, p, 2, None, (k, 80), out_token_major=True).tile.block_n == 32


def test_training_forward_prices_the_tile_that_saves_the_pre_activation():
    """With ``pre_out`` (a training forward keeping the pre-activation) the model plans stage 2 as the kernel
    does (``save_pre``): at 1000 -> 3000 in 4 blocks a 32-row tile at the ``mma`` rate (a warpgroup MMA needs 64
    rows), 333 tokens padded to 352 rather than 384, and the weights read from L2 once per 32 tokens instead of
    once per 64 (11 row tiles, not 6) besides the pre-activation written beside the output (HBM and L2 alike)."""
    T, l, s, r = 333, 4, 750, 250
    kw = dict(out_perm=(s, l), activation=True, x_token_major=True)
    plain = cm.bd_cost("stage 2", T, l, s, r, "bfloat16", DEV, **kw)
    saving = cm.bd_cost("stage 2", T, l, s, r, "bfloat16", DEV, pre_out=True, **kw)
    padded = 2 * l * 768 * 256  # FLOPs per token row: 750 columns in 64-wide tiles, 250 deep in 64-deep steps
    assert (plain.flops, saving.flops) == (384 * padded, 352 * padded)
    assert saving.flop_rate == DEV.triton_flops["mma"] < plain.flop_rate == DEV.triton_flops["wgmma"]
    w = l * s * r * 2
    assert (saving.l2_bytes - plain.l2_bytes) - (saving.hbm_bytes - plain.hbm_bytes) == (11 - 6) * w
    assert saving.hbm_bytes - plain.hbm_bytes >= T * l * s * 2


def test_scattered_store_costs_a_sector_per_element():
    """w (4, 5, 8) written through P1 = view-transpose (4, 5): 5 rows per block do not align with 4 -> the
    scattered layout, one 32-byte sector per 2-byte element, in HBM and L2."""
    lp = plan.bd_launch(64, 4, 5, 8, 2, None, (4, 5))
    assert lp.out.mode == plan.SCATTERED
    k = cm.bd_cost("bd", 64, 4, 5, 8, "bfloat16", DEV, out_perm=(4, 5))
    x, w = 64 * 32 * 2, 4 * 5 * 8 * 2
    assert k.hbm_bytes == x + w + 64 * 20 * 32


def test_grouped_runs_half_sectors_in_l2_whole_in_hbm():
    """64 blocks of 64 through P2 = (64, 64): group 8 in bf16 (4 in fp32), 16-byte runs: each run moves half
    a sector through L2 (the partner group's program writes the other half), HBM sees every sector once."""
    for item, dtype in ((2, "bfloat16"), (4, "float32")):
        lp = plan.bd_launch(4096, 64, 64, 64, item, None, (64, 64))
        assert lp.out.mode == plan.GROUPED and lp.out.group * item == 16
        k = cm.bd_cost("bd", 4096, 64, 64, 64, dtype, DEV, out_perm=(64, 64))
        once, w = 4096 * 4096 * item, 64 * 64 * 64 * item
        assert k.hbm_bytes == 2 * once + w
        assert k.l2_bytes == once + 2 * once + lp.grid[1] * w


def test_token_major_store_moves_whole_sectors_without_groups():
    """The same P1 store into a token-major buffer (the two-kernel intermediate): no block group, a 128-row
    tile (weights re-read half as often as with groups of 8 at 64 rows), and every run a whole row tile of
    tokens, so L2 moves each output byte once instead of twice."""
    lp = plan.bd_launch(4096, 64, 64, 64, 2, None, (64, 64), out_token_major=True)
    assert lp.tile.group == 1 and lp.tile.block_m == 128
    k = cm.bd_cost("bd", 4096, 64, 64, 64, "bfloat16", DEV, out_perm=(64, 64), y_token_major=True)
    once, w = 4096 * 4096 * 2, 64 * 64 * 64 * 2
    assert k.hbm_bytes == 2 * once + w
    assert k.l2_bytes == 2 * once + (4096 // 128) * w
    grouped = cm.bd_cost("bd", 4096, 64, 64, 64, "bfloat16", DEV, out_perm=(64, 64))
    assert grouped.l2_bytes - k.l2_bytes == once + (4096 // 64 - 4096 // 128) * w
    # the stage that reads it back prices the token-major input by the same rule
    r = cm.bd_cost("bd", 4096, 64, 64, 64, "bfloat16", DEV, x_token_major=True)
    assert r.l2_bytes == cm.bd_cost("bd", 4096, 64, 64, 64, "bfloat16", DEV).l2_bytes


def test_weight_gradient_tile_and_whole_row_gather():
    """dw2 of GPT-2's fc1 (4 blocks of 768 x 192, P2ᵀ-gathered g covering every block): the tile minimising
    (q-tiles · p-tiles) · (block_m + block_n) within the 16 KB of interleaved accumulators is 32 x 32 (16 x 64
    moves 20% more); the gathered rows of a tile are one contiguous run (G_FULL), priced as whole sectors."""
    T, k, q, p = 4096, 4, 768, 192
    lp = plan.wgrad_launch(T, k, q, p, 2, (q, k), DEV.num_sms)
    assert lp.g_full and (lp.tile.block_m, lp.tile.block_n, lp.tile.group) == (32, 32, 4)
    assert lp.tiles * (32 + 32) < (q // 16) * (p // 64) * (16 + 64)
    kern = cm.wgrad_cost("dw2", T, k, q, p, "bfloat16", DEV, g_perm=(q, k), n_g=k * q).kernels[0]
    g_once, x_once = T * k * q * 2, T * k * p * 2
    partial = lp.splits * k * q * p * 4
    assert kern.l2_bytes == g_once * (p // 32) + x_once * (q // 32) + partial
    assert kern.hbm_bytes == g_once + x_once + partial
    # a natural gradient keeps the largest tile that fits one plain accumulator
    assert (plan.wgrad_tile(64, 64, 64, 1).block_m, plan.wgrad_tile(64, 64, 64, 1).block_n) == (64, 64)


def test_token_major_gradient_takes_plain_weight_gradient_tiles():
    """The same dw2 with ``g`` copied token-major first: no block group, so one plain accumulator of up to
    32 KB (128 x 64 here: 6 x 3 tiles instead of 24 x 6), every gradient column a run of the token step
    (whole sectors); the copy reads ``g`` once and writes it once, and the model takes it for fc1-like
    shapes and, since the grouped gathers run at the interleaved kernels' measured third of the bandwidth
    (``interleaved_eff``), for square Monarch too."""
    T, k, q, p = 4096, 4, 768, 192
    lp = plan.wgrad_launch(T, k, q, p, 2, (q, k), DEV.num_sms, g_token_major=True)
    assert lp.g.group == 1 and (lp.tile.block_m, lp.tile.block_n) == (128, 64)
    kern = cm.wgrad_cost("dw2", T, k, q, p, "bfloat16", DEV, g_perm=(q, k), n_g=k * q, g_token_major=True).kernels[0]
    g_once, x_once = T * k * q * 2, T * k * p * 2
    partial = lp.splits * k * q * p * 4
    assert kern.l2_bytes == g_once * (p // 64) + x_once * (q // 128) + partial
    assert kern.hbm_bytes == g_once + x_once + partial
    copy = cm._token_major_copy("copy", 1000, 24, "bfloat16", DEV)
    assert copy.hbm_bytes == 1000 * 64 + 24 * 2016  # 48-byte rows -> 2 sectors; 2000-byte columns -> 63
    fc1 = cm.Problem.linear(16384, 768, 3072, 4)
    readers = cm._g_readers(fc1, "bfloat16", DEV, "token_major")
    assert [kk.name for kk in readers.kernels][:2] == ["g -> token-major", "dy = P1T BD(w2)T P2T g"]
    assert readers.time() < cm._g_readers(fc1, "bfloat16", DEV, "grouped").time()
    assert cm.g_readers(cm.Problem.linear(16384, 4096, 4096, 64)) == "token_major"
    square = cm.Problem.linear(16384, 4096, 4096, 64)
    grouped = cm._g_readers(square, "bfloat16", DEV, "grouped")
    assert grouped.kernels[0].mem_eff == pytest.approx(DEV.mem_eff * DEV.interleaved_eff)


def test_backward_gemms_on_cublas_where_the_model_says():
    """On the token-major copy of ``g``, ``dy`` and ``dw2`` as cuBLAS batched GEMMs are priced with every
    operand read once (``_bmm``: the copy plus l GEMMs of T x s x r and s x r x T); at GPT-2's fc1 and fc2
    that beats the Triton tiles (capped by four interleaved blocks), at square Monarch shapes Triton's plain
    tiles on the copy win (cuBLAS reaches 0.44 of the bandwidth on 64-wide blocks). ``dx``/``dw1`` likewise
    (``dxw_choice``: fused kernel at 4096/64, cuBLAS at fc2). A ragged width has no block views, so cuBLAS is
    never priced there; the backward prices the picks."""
    T, item = 16384, 2
    fc1, fc2 = cm.Problem.linear(T, 768, 3072, 4), cm.Problem.linear(T, 3072, 768, 4)
    sq = cm.Problem.linear(T, 4096, 4096, 64)
    readers = cm._g_readers(fc1, "bfloat16", DEV, "bmm")
    assert [kk.name for kk in readers.kernels] == ["g -> token-major", "dy = P1T BD(w2)T P2T g (cuBLAS)",
                                                   "dw2 = (P2T g)T z (cuBLAS)"]
    dy = readers.kernels[1]
    assert dy.flops == 2.0 * 4 * T * 192 * 768  # l blocks of (T x s) @ (s x r)
    assert dy.hbm_bytes == 4 * (T * 768 + 192 * 768 + T * 192) * item
    assert cm.g_readers(fc1) == cm.g_readers(fc2) == "bmm" and cm.g_readers(sq) == "token_major"
    assert cm.dxw_choice(fc2) == "bmm" and cm.dxw_choice(sq) == "fused"
    for pr in (fc1, fc2, sq):
        for how in cm.G_READERS:
            assert cm._g_readers(pr, "bfloat16", DEV, cm.g_readers(pr)).time() <= \
                cm._g_readers(pr, "bfloat16", DEV, how).time()
        for how in cm.DXW:
            assert cm._DXW[cm.dxw_choice(pr)](pr, "bfloat16", DEV).time() <= cm._DXW[how](pr, "bfloat16", DEV).time()
    ragged = cm.Problem(T, 3071, 767, fc2.shape)
    assert not cm.bmm_applies(ragged, "g") and not cm.bmm_applies(ragged, "x")
    assert cm.g_readers(ragged) != "bmm" and cm.dxw_choice(ragged) != "bmm"
    names = {kk.name for kk in cm.estimate("triton", "two_kernel", "bwd", fc2).kernels}
    assert {"dy = P1T BD(w2)T P2T g (cuBLAS)", "dx = BD(w1)T dy (cuBLAS)", "dw1 (cuBLAS)"} <= names
    # a training step after an activation: the derivative's pass writes g token-major, so no copy is charged
    steps = {act: cm.estimate("triton", "two_kernel", "fwdbwd", dataclasses.replace(fc1, activation=act))
             for act in ("none", "gelu")}
    copies = {act: [kk for kk in st.kernels if kk.name == "g -> token-major"] for act, st in steps.items()}
    assert len(copies["none"]) == 1 and copies["gelu"] == []


def test_paired_stages_overlap_hbm_and_l2(monkeypatch):
    """One launch for two grids is bound by the larger of their summed terms: an HBM-bound and an L2-bound
    launch of 10 µs each take 10 µs + one gap together, not 20 µs + two. The two-kernel forward pairs stage 1
    of each chunk with stage 2 of the previous one: chunks sized for two intermediates in L2, chunks + 1
    launches, the first stage 1 and the last stage 2 alone; without pairing, two launches per chunk."""
    monkeypatch.setattr(plan, "CHUNK_IN_L2", True)
    hbm = cm.Kernel("hbm", 0.0, 0.0, 10e-6 * DEV.hbm_bw, 0.0, 1.0)
    l2 = cm.Kernel("l2", 2.0, 2.0, 0.0, 10e-6 * DEV.l2_bw, 1e6)
    both = cm.paired("both", hbm, l2)
    assert both.time(DEV) == pytest.approx(10e-6 + DEV.launch_s)
    assert both.flops / both.flop_rate == pytest.approx(2e-6)
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    chunk = plan.chunk_tokens(16384, 4096, 2, DEV.l2_bytes, 128, 2)
    assert 2 * chunk * 4096 * 2 <= plan.L2_SHARE * DEV.l2_bytes < 2 * (chunk + 128) * 4096 * 2
    monkeypatch.setattr(plan, "ONE_LAUNCH", False)
    fwd = cm.estimate("triton", "two_kernel", "fwd", pr)
    chunks = -(-16384 // chunk)
    names = [k.name for k in fwd.kernels]
    assert len(names) == chunks + 1 and names[0].startswith("stage 1") and names[-1].startswith("stage 2")
    assert all(n.startswith("stage 1 beside") for n in names[1:-1])
    monkeypatch.setattr(plan, "PAIR_STAGES", False)
    apart = cm.estimate("triton", "two_kernel", "fwd", pr)
    assert apart.launches == 2 * -(-16384 // plan.chunk_tokens(16384, 4096, 2, DEV.l2_bytes, 128))
    # a paired launch runs at the slower grid's efficiency (the interleaved P2 store's, measured on an H200:
    # the chained and paired schedules took 1.5-1.9x the unchunked launches' device time, CHUNK_IN_L2 is off)
    assert fwd.kernels[1].mem_eff == pytest.approx(DEV.mem_eff * DEV.interleaved_eff)
    assert fwd.useful_flops == apart.useful_flops


def test_chained_launch_drops_the_gaps_between_its_steps(monkeypatch):
    """``Chained``: steps of 10 µs (HBM-bound) and 4 µs (L2-bound) in one launch take 14 µs + one gap, not
    14 µs + two. The chunked two-kernel forward (``CHUNK_IN_L2``) with ``ONE_LAUNCH`` is a counter reset plus
    one launch whose steps are exactly the separate schedule's launches: the same bytes and FLOPs, ``chunks``
    gaps fewer, one tiny launch more; with one chunk there is nothing to chain."""
    monkeypatch.setattr(plan, "CHUNK_IN_L2", True)
    a = cm.Kernel("a", 0.0, 0.0, 10e-6 * DEV.hbm_bw, 0.0, 1.0)
    b = cm.Kernel("b", 0.0, 0.0, 0.0, 4e-6 * DEV.l2_bw, 1.0)
    both = cm.chained("a then b", [a, b])
    assert both.time(DEV) == pytest.approx(14e-6 + DEV.launch_s)
    assert (both.hbm_bytes, both.l2_bytes) == (a.hbm_bytes, b.l2_bytes)
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    chained = cm.estimate("triton", "two_kernel", "fwd", pr)
    monkeypatch.setattr(plan, "ONE_LAUNCH", False)
    apart = cm.estimate("triton", "two_kernel", "fwd", pr)
    assert [k.name for k in chained.kernels] == ["chain counters reset",
                                                 f"{apart.launches - 1} chunks' stages in one launch"]
    assert list(chained.kernels[1].steps) == apart.kernels
    reset = chained.kernels[0]
    assert reset.hbm_bytes == 4 * (2 + 2 * (apart.launches - 1)) and reset.flops == 0
    assert chained.time() == pytest.approx(apart.time() - (apart.launches - 2) * DEV.launch_s + reset.time(DEV)
                                           - DEV.launch_s)
    for field in ("flops", "useful_flops", "hbm_bytes"):
        assert getattr(chained, field) == pytest.approx(getattr(apart, field) + getattr(reset, field))
    small = cm.Problem.linear(1024, 4096, 4096, 64)  # one chunk: two plain launches either way (and a copy)
    monkeypatch.setattr(plan, "ONE_LAUNCH", True)
    names = [k.name for k in cm.estimate("triton", "two_kernel", "fwd", small).kernels]
    assert [n[:7] for n in names[:2]] == ["stage 1", "stage 2"]
    assert names[2:] in ([], ["transpose into the row-major output"])


def test_useful_flops_and_paths():
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    assert pr.useful_fwd_flops() == 2 * 16384 * 2 * 64 * 64 * 64
    for path in ("fused", "two_kernel"):
        c = cm.estimate("triton", path, "fwd", cm.Problem.linear(2048, 1024, 1024, 32))
        assert c.useful_flops == cm.Problem.linear(2048, 1024, 1024, 32).useful_fwd_flops()
        assert c.flops >= c.useful_flops


def test_training_step_prices_what_the_eager_backward_runs(monkeypatch):
    """``fwdbwd`` is an eager training step: on the two-kernel path the forward keeps z (every chunk's
    intermediate also written to HBM: the whole z instead of the last chunk's write-back) and, with an
    activation, the pre-activation (stage 2 stores the output's bytes twice), and the backward recomputes
    neither. The fused square path keeps z (each program's stage-1 outputs, token-major) but not the
    pre-activation: with an activation the backward runs its stage 2 from z. (Chunks on, so that the
    intermediate of the forward alone stays in L2; without them, at this size, it reaches HBM anyway and
    keeping it costs no byte more.)"""
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    unchunked = cm._two_kernel_forward(pr, "bfloat16", DEV, keep=True).hbm_bytes
    assert unchunked == cm.estimate("triton", "two_kernel", "fwd", pr).hbm_bytes
    est = lambda op, p=pr, path="two_kernel": cm.estimate("triton", path, op, p)
    assert est("fwdbwd").time() < est("fwd").time() + est("bwd").time()  # the kept z saves the recompute
    monkeypatch.setattr(plan, "CHUNK_IN_L2", True)
    est = lambda op, p=pr, path="two_kernel": cm.estimate("triton", path, op, p)
    step, fwd, bwd = est("fwdbwd"), est("fwd"), est("bwd")
    recompute = "z = P1 BD(w1) x (recomputed)"
    assert [k.name for k in step.kernels] == [k.name for k in fwd.kernels] + [k.name for k in bwd.kernels
                                                                              if k.name != recompute]
    chunk = plan.chunk_tokens(16384, 4096, 2, DEV.l2_bytes, 128, 2)  # two chunks live: stages paired
    z_total, z_chunk = 16384 * 4096 * 2, chunk * 4096 * 2
    kept = cm._two_kernel_forward(pr, "bfloat16", DEV, keep=True)
    assert kept.hbm_bytes - fwd.hbm_bytes == pytest.approx(z_total - z_chunk)
    gelu = cm.Problem.linear(16384, 4096, 4096, 64, activation="gelu")
    names = [k.name for k in est("fwdbwd", gelu).kernels]
    assert "pre-activation = P2 BD(w2) z + bias" not in names and recompute not in names
    kept_gelu = cm._two_kernel_forward(gelu, "bfloat16", DEV, keep=True)
    extra = kept_gelu.hbm_bytes - cm._two_kernel_forward(gelu, "bfloat16", DEV).hbm_bytes
    assert extra == pytest.approx(z_total - z_chunk + 16384 * 4096 * 2)  # z, and the pre-activation once
    sq = cm.Problem.linear(4096, 1024, 1024, 32)
    fused = lambda op, p=sq: est(op, p, "fused")
    kept_sq = cm._fused_forward(sq, "bfloat16", DEV, keep=True)
    assert kept_sq.hbm_bytes - fused("fwd").hbm_bytes == 4096 * 1024 * 2  # z, written once
    backward = [k.name for k in fused("bwd").kernels if k.name != recompute]
    assert [k.name for k in fused("fwdbwd").kernels] == [k.name for k in fused("fwd").kernels] + backward
    sq_gelu = cm.Problem.linear(4096, 1024, 1024, 32, activation="gelu")
    names = [k.name for k in fused("fwdbwd", sq_gelu).kernels]
    assert recompute not in names and names.count("pre-activation = P2 BD(w2) z + bias") == 1


def test_reference_pays_the_permutation_copies():
    """The torch reference moves x, y, y (copy), z, o, o (copy), out: more HBM bytes than the two-kernel
    path's x, z, z, y, y (token-major), out, and its permutation copies run at a quarter of the bandwidth
    (``permute_copy_eff``, measured): over three times the two-kernel forward's time at 4096/64. Its backward
    copies twice, P2ᵀ of g (output width) and P1ᵀ of dz (stage-1 width: 768 for GPT-2's fc2, not its 3072-wide
    input), and its bmm write natural order without copies."""
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    ref = cm.estimate("torch", "reference", "fwd", pr)
    assert ref.launches == 4
    two = cm.estimate("triton", "two_kernel", "fwd", pr)
    assert ref.hbm_bytes > two.hbm_bytes and ref.time() > 3 * two.time()
    copies = [k for k in ref.kernels if k.name.endswith("copy")]
    assert len(copies) == 2 and all(k.mem_eff == DEV.permute_copy_eff for k in copies)
    fc2 = cm.Problem.linear(1024, 3072, 768, 4)
    bwd = {k.name: k for k in cm.estimate("torch", "reference", "bwd_input", fc2).kernels}
    assert list(bwd) == ["ref P2T copy", "ref dZ bmm", "ref P1T copy", "ref dX bmm"]
    assert bwd["ref P1T copy"].hbm_bytes == 2 * 1024 * 768 * 2 == bwd["ref P2T copy"].hbm_bytes


def test_reference_training_step_keeps_its_intermediate():
    """Eager training with the reference keeps the forward's stage-1 intermediate (monarch_fwd_saving), so its
    training step is the forward plus a backward without the stage-1 bmm and P1 copy that a standalone
    backward (which gets only x) pays."""
    pr = cm.Problem.linear(4096, 1024, 1024, 32)
    est = lambda op: cm.estimate("torch", "reference", op, pr)
    step, fwd, bwd = est("fwdbwd"), est("fwd"), est("bwd")
    assert step.launches == fwd.launches + bwd.launches - 2
    assert {k.name for k in bwd.kernels} - {k.name for k in step.kernels} == {"ref bmm1 (z)"}
    assert step.time() < fwd.time() + bwd.time()
    # with an activation its backward gets the pre-activation from z: one more bmm and P2 copy
    gelu = cm.Problem.linear(4096, 1024, 1024, 32, activation="gelu")
    act_step = cm.estimate("torch", "reference", "fwdbwd", gelu)
    assert act_step.launches == step.launches + 2
    assert {k.name for k in act_step.kernels} - {k.name for k in step.kernels} == {"ref bmm2 (pre-activation)"}


def test_registry():
    seen = []

    def fake(op, problem, dtype, dev):
        seen.append(op)
        return cm.Cost([cm.Kernel("fake", 1.0, 1.0, 0.0, 0.0, 1.0)])

    cm.register_estimator("test-backend", "decode", fake)
    try:
        c = cm.estimate("test-backend", "decode", "fwd", cm.Problem.linear(1, 64, 64, 4))
        assert seen == ["fwd"] and c.launches == 1
        with pytest.raises(ValueError, match="no cost estimator"):
            cm.estimate("nope", "x", "fwd", cm.Problem.linear(1, 64, 64, 4))
        with pytest.raises(ValueError, match="op must be one of"):
            cm.estimate("test-backend", "decode", "backward", cm.Problem.linear(1, 64, 64, 4))
    finally:
        del cm._ESTIMATORS[("test-backend", "decode")]


def test_problem_uses_monarch_linear_factors():
    pr = cm.Problem.linear(8, 768, 3072, 4)
    assert pr.shape == MonarchShape(4, 192, 192, 4, 768, 192)
    assert not math.isnan(cm.estimate("triton", cm.triton_path(pr), "fwd", pr).time())


def test_fused_mlp_forward_priced_by_hand():
    """GPT-2's MLP (768 -> 3072 -> 768, 4 blocks, GELU), 16384 bf16 tokens: fc1's stage 1, fc2's w1 regrouped,
    the hidden-layer kernel (128 token tiles x 4 fc2 blocks; per program 4 fc1 blocks x 6 chunks of 32 hidden
    rows: a 128 x 32 x 192 dot and a 128 x 256 x 32 one, q2 = 192 padded to 256), fc2's stage 2; the hidden
    activation never in HBM, so the fused forward moves a third of the layers' bytes."""
    dev = cm.H100_SXM
    fc1, fc2 = cm.Problem.linear(16384, 768, 3072, 4, "gelu"), cm.Problem.linear(16384, 3072, 768, 4)
    cost = cm.mlp_forward(fc1, fc2, "bfloat16", dev)
    names = [k.name for k in cost.kernels]
    assert names[:3] == ["fc1 stage 1 (P1 in a token-major store)", "fc2 w1 regrouped",
                         "fc1 stage 2 + activation + fc2 stage 1 (hidden layer on chip)"]
    assert names[3].startswith("stage 2")
    hidden = cost.kernels[2]
    assert hidden.flops == 2.0 * 128 * 4 * 4 * 6 * 128 * 32 * (192 + 256)
    assert hidden.useful_flops == 2.0 * 16384 * (4 * 768 * 192 + 4 * 192 * 768)
    z, w = 16384 * 768 * 2, 4 * 768 * 192 * 2  # z1 and z2; each weight factor of the hidden layer
    assert hidden.hbm_bytes == 2 * z + 2 * w
    assert hidden.l2_bytes == 4 * z + 128 * 2 * w + z
    assert hidden.flop_rate == dev.triton_flops["wgmma"]
    layers = (cm.estimate("triton", cm.triton_path(fc1), "fwd", fc1, "bfloat16", dev)
              + cm.estimate("triton", cm.triton_path(fc2), "fwd", fc2, "bfloat16", dev))
    assert cost.hbm_bytes < layers.hbm_bytes / 2 and cost.time(dev) < layers.time(dev)
    with pytest.raises(ValueError, match="does not take"):
        cm.mlp_forward(fc1, fc2, "float32", dev)
    with pytest.raises(ValueError, match="does not take"):  # p2 = 6 is not a multiple of l1 = 4
        cm.mlp_forward(cm.Problem.linear(64, 64, 96, 4), cm.Problem.linear(64, 96, 64, 16), "bfloat16", dev)


def test_fused_mlp_training_step_priced_by_hand():
    """The same MLP in training: the hidden layer's backward kernel (128 token tiles x 4 fc1 blocks; per program
    4 fc2 blocks x 6 chunks of 32 hidden rows, three dots each: 128 x 32 x 192 for the pre-activation and
    for da, 128 x 192 x 32 for dz1, r1 = q2 = 192 in 64-wide chunks, no padding) reads z1 and dy2 and writes the
    activation, dpre (3072 wide each) and dz1 once; from L2 z1 once (registers), dy2 once per fc1 block, both
    weight slices once per token tile. The step is the fused forward, fc2's stage-2 gradients, that kernel, two
    batched GEMMs, fc1's dx and dw1 and the two bias gradients; it moves under 70% of the bytes of the layers'
    steps (with their bias gradients) with the GELU derivative's pass between them, in under 70% of their time."""
    dev = cm.H100_SXM
    T = 16384
    fc1, fc2 = cm.Problem.linear(T, 768, 3072, 4, "gelu", bias=True), cm.Problem.linear(T, 3072, 768, 4, bias=True)
    k = cm.mlp_hidden_backward(fc1, fc2, "bfloat16", dev)
    assert k.flops == 2.0 * 128 * 4 * 4 * 6 * 128 * 32 * (192 + 192 + 192)
    assert k.useful_flops == 2.0 * T * (4 * 192 * 768 + 4 * 768 * 192)
    z, h, w, part = T * 768 * 2, T * 3072 * 2, 4 * 768 * 192 * 2, 128 * 3072 * 4
    assert k.hbm_bytes == z + z + 2 * h + z + 2 * w + part  # z1, dy2 in; a, dpre, dz1 out; weights; partials
    assert k.l2_bytes == z + 4 * z + 2 * h + z + 128 * 2 * w + part
    no_bias = dataclasses.replace(fc1, bias=False)
    assert cm.mlp_hidden_backward(no_bias, fc2, "bfloat16", dev).hbm_bytes == k.hbm_bytes - part
    step = cm.mlp_training_step(fc1, fc2, "bfloat16", dev)
    names = [kern.name for kern in step.kernels]
    forward = cm.mlp_forward(fc1, fc2, "bfloat16", dev)
    assert names[:len(forward.kernels)] == [kern.name for kern in forward.kernels]
    assert k.name in names and "fc2 dw1 = dy2T a (cuBLAS)" in names and "fc1 dw2 = (P2T dpre)T z1 (cuBLAS)" in names
    # fc2's bias gradient rides on the token-major copy of g that cuBLAS reads (256 tiles of 64 tokens: fp32
    # partials written and read), not on a pass of its own over g's 25 MB
    assert cm.g_readers(fc2, "bfloat16", dev) == "bmm"
    assert names[-2:] == ["fc2 bias gradient (the copy's partials summed)", "fc1 bias gradient (partials summed)"]
    assert step.kernels[-2].hbm_bytes == 2 * 256 * 768 * 4 + 768 * 2
    assert cm._bias_grad("fc2", T, 768, "bfloat16", dev, copied=False).hbm_bytes == T * 768 * 2 + 768 * 2
    # without biases neither gradient is priced
    bare = cm.mlp_training_step(no_bias, dataclasses.replace(fc2, bias=False), "bfloat16", dev)
    assert [kern.name for kern in bare.kernels] == names[:-2]
    layers = (cm.estimate("triton", cm.triton_path(fc1), "fwdbwd", fc1, "bfloat16", dev)
              + cm.estimate("triton", cm.triton_path(fc2), "fwdbwd", fc2, "bfloat16", dev)
              + cm.Cost([cm.activation_pass(T, 3072, "bfloat16", dev, backward=True)]))
    assert step.hbm_bytes < 0.7 * layers.hbm_bytes and step.time(dev) < 0.7 * layers.time(dev)


def test_bias_gradient_priced_where_each_backend_computes_it(monkeypatch):
    """A layer with a bias pays ``Σ_t g`` in the passes that produce weight gradients and nowhere else: dense and
    the reference one read of ``g`` (``g.sum(0)``: T·n_out·2 bytes in, n_out·2 out); the Triton backward the
    fp32 column sums its token-major copy of ``g`` writes (4096/64 reads ``g`` from a copy: 256 tiles of 64
    tokens, written and read), or, where ``g`` is read as given, the same one read of ``g``."""
    T, n, item = 16384, 4096, 2
    plain, biased = cm.Problem.linear(T, n, n, 64), cm.Problem.linear(T, n, n, 64, bias=True)
    summed = T * n * item + n * item
    partials = 2 * (T // plan.COPY_TILE.block_m) * n * 4 + n * item
    assert plan.COPY_TILE.block_m == 64 and cm.g_readers(biased) == "token_major"

    def extra(cost_of, op):
        """The kernels the bias adds (everything else priced as without it)."""
        with_bias, without = cost_of(op, biased), cost_of(op, plain)
        rest = [(k.name, k.hbm_bytes) for k in without.kernels]
        added = [(k.name, k.hbm_bytes) for k in with_bias.kernels]
        for kern in rest:
            added.remove(kern)
        assert with_bias.hbm_bytes - without.hbm_bytes == sum(b for _, b in added)
        return added

    dense = lambda op, pr: cm.dense(op, pr, "bfloat16", DEV)
    ref = lambda op, pr: cm.estimate("torch", "reference", op, pr, "bfloat16", DEV)
    tri = lambda op, pr: cm.estimate("triton", "two_kernel", op, pr, "bfloat16", DEV)
    for op in ("fwd", "bwd_input"):
        assert extra(dense, op) == extra(ref, op) == extra(tri, op) == []
    for op in ("bwd", "fwdbwd", "bwd_weight"):
        assert extra(dense, op) == [("dense bias gradient (g summed)", summed)]
        assert extra(ref, op) == [("ref bias gradient (g summed)", summed)]
        assert extra(tri, op) == [("layer bias gradient (the copy's partials summed)", partials)]
    monkeypatch.setattr(cm, "g_readers", lambda *a, **k: "grouped")
    for op in ("bwd", "fwdbwd", "bwd_weight"):
        assert extra(tri, op) == [("layer bias gradient (g summed)", summed)]
    # block-diagonal calls: g.sum(0) on every backend, training only
    for backend in ("triton", "torch"):
        fwd = cm.blockdiag_cost(backend, T, 4, 256, 256, "bfloat16", DEV, training=False, bias=True)
        assert fwd.hbm_bytes == cm.blockdiag_cost(backend, T, 4, 256, 256, "bfloat16", DEV).hbm_bytes
        step, biased_step = (cm.blockdiag_cost(backend, T, 4, 256, 256, "bfloat16", DEV, training=True, bias=b)
                             for b in (False, True))
        assert biased_step.hbm_bytes - step.hbm_bytes == T * 1024 * item + 1024 * item


def test_g_readers_weigh_the_bias_gradient_and_a_free_copy(monkeypatch):
    """The pick of how ``dy`` and ``dw2`` read ``g`` prices what each option implies around it: at 256 -> 1024
    with 2 blocks (fp32, 32768 tokens) the grouped gathers of ``g`` as given win by a little, but a bias gradient
    is one more read of ``g`` there against the copy's partial sums, and a ``g`` that an activation's derivative
    writes token-major costs no copy; either tips it to cuBLAS on the copy. The pick is the cheapest of the
    options so priced, and the backward that follows it costs no more than under the bias-blind pick."""
    plain = cm.Problem.linear(32768, 256, 1024, 2)
    biased = dataclasses.replace(plain, bias=True)
    total = lambda pr, how, arrives=False: (cm._g_readers(pr, "float32", DEV, how, arrives) + cm.bias_grad(
        "layer", pr, "float32", DEV, copied=how != "grouped")).time()
    assert cm.g_readers(plain, "float32") == "grouped"
    assert cm.g_readers(biased, "float32") == "bmm"
    assert cm.g_readers(plain, "float32", arrives_token_major=True) == "bmm"
    for pr, arrives in ((plain, False), (biased, False), (plain, True), (biased, True)):
        pick = cm.g_readers(pr, "float32", DEV, arrives)
        assert total(pr, pick, arrives) == min(total(pr, how, arrives) for how in cm.G_READERS)
    # with a pick blind to both forced, the biased backward and the step through a gelu would cost more
    bwd = cm.estimate("triton", "two_kernel", "bwd", biased, "float32", DEV).time()
    step_act = dataclasses.replace(plain, activation="gelu")
    step = cm.estimate("triton", "two_kernel", "fwdbwd", step_act, "float32", DEV).time()
    blind = cm.g_readers
    monkeypatch.setattr(cm, "g_readers", lambda pr, dtype="bfloat16", dev=DEV, arrives=False: blind(
        dataclasses.replace(pr, bias=False), dtype, dev))
    assert cm.estimate("triton", "two_kernel", "bwd", biased, "float32", DEV).time() > bwd
    assert cm.estimate("triton", "two_kernel", "fwdbwd", step_act, "float32", DEV).time() > step


# ------------------------------------------------------------------------ mutation sweep of the cost model


def test_h200_constants_scale_the_l2_rate_with_the_copy_rate():
    """The H200's L2 bandwidth is not measured: it is the H100's 7.5 TB/s scaled by the copy rates (4.25 / 3.0
    TB/s), i.e. 10.625 TB/s, 2.5x the copy rate on both devices; an L2-bound launch of 10.625 MB takes 1 µs."""
    assert cm.H200.l2_bw == pytest.approx(10.625e12)
    assert cm.H200.l2_bw / cm.H200.hbm_bw == pytest.approx(2.5) == cm.H100_SXM.l2_bw / cm.H100_SXM.hbm_bw
    kern = cm.Kernel("l2", 0.0, 0.0, 0.0, 10.625e6, 1.0)
    assert kern.time(cm.H200) == pytest.approx(1e-6 + cm.H200.launch_s)
    assert cm.device_for("NVIDIA H200").l2_bytes == 60 * 2**20


def test_bias_gradient_partials_of_a_ragged_token_count():
    """100 tokens make two 64-token tiles of the copy (the second one ragged), so 768 columns sum two fp32
    partial rows each: 2 x 768 x 4 bytes written by the copy and read back, and 768 bf16 sums written; 64 tokens
    are one tile."""
    assert cm._bias_grad("b", 100, 768, "bfloat16", DEV, copied=True).hbm_bytes == 2 * 2 * 768 * 4 + 768 * 2
    assert cm._bias_grad("b", 64, 768, "bfloat16", DEV, copied=True).hbm_bytes == 2 * 1 * 768 * 4 + 768 * 2
    assert cm._bias_grad("b", 100, 768, "bfloat16", DEV).hbm_bytes == 100 * 768 * 2 + 768 * 2  # g read once


def test_batched_gemm_efficiency_follows_the_narrowest_block_side():
    """cuBLAS batched GEMMs reach ``bmm_eff[0]`` (0.44 of the copy rate) when either the output side or the
    contraction is under 128 wide, ``bmm_eff[1]`` (0.69) from 128 up: a 64-wide block's weight gradient is narrow
    although it contracts over 16384 tokens; GPT-2's 192 x 768 blocks and 128 x 128 ones are wide."""
    assert cm._bmm("dw2 4096/64", 64, 64, 64, 16384, "bfloat16", DEV).mem_eff == 0.44
    assert cm._bmm("dy 4096/64", 64, 16384, 64, 64, "bfloat16", DEV).mem_eff == 0.44
    assert cm._bmm("dx fc2", 4, 16384, 768, 192, "bfloat16", DEV).mem_eff == 0.69
    assert cm._bmm("128 wide", 8, 16384, 128, 128, "bfloat16", DEV).mem_eff == 0.69
    assert cm._bmm("127 deep", 8, 16384, 128, 127, "bfloat16", DEV).mem_eff == 0.44


def test_reference_weight_gradient_alone_recomputes_the_intermediate():
    """The reference's standalone ``bwd_weight`` gets only ``x`` and ``g``: it runs stage 1 again (bmm and P1
    copy) before dW2; at GPT-2's fc2 (1024 tokens, 4 blocks of 768 -> 192) that bmm reads x (3072 wide) and the
    weights and writes the 768-wide intermediate."""
    fc2 = cm.Problem.linear(1024, 3072, 768, 4)
    kerns = {k.name: k for k in cm.estimate("torch", "reference", "bwd_weight", fc2).kernels}
    assert list(kerns) == ["ref P2T copy", "ref bmm1 (z)", "ref P1 copy", "ref dW2 bmm", "ref dZ bmm",
                           "ref P1T copy", "ref dW1 bmm"]
    assert kerns["ref bmm1 (z)"].hbm_bytes == 4 * (1024 * 768 + 192 * 768 + 1024 * 192) * 2


def test_warpgroup_rate_from_64_rows_at_a_multiple_of_4_warps():
    """Triton issues ``wgmma`` (600 TFLOP/s) when a warpgroup owns at least 64 rows: 64 rows at 4 warps, yes; 32
    rows, or 64 rows at 2 warps, ``mma.sync`` (300); fp32 dots run on FMA (40). The 64-token stage 1 of 4096/64
    gets a 64-row tile at 4 warps and is priced at the wgmma rate."""
    rate = lambda m, warps, dtype="bfloat16": cm._tc_rate(DEV, plan.Tile(m, 64, 64, 1, warps, 2), dtype)
    assert rate(64, 4) == rate(128, 8) == 600e12
    assert rate(32, 4) == rate(64, 2) == 300e12
    assert rate(128, 8, "float32") == 40e12
    lp = plan.bd_launch(64, 64, 64, 64, 2, None, (64, 64), out_token_major=True)
    assert (lp.tile.block_m, lp.tile.num_warps) == (64, 4)
    kern = cm.bd_cost("stage 1", 64, 64, 64, 64, "bfloat16", DEV, out_perm=(64, 64), y_token_major=True)
    assert kern.flop_rate == 600e12


def test_padded_contraction_and_token_steps_are_executed_flops():
    """FLOPs executed count the padding of the tiles: a 24-deep contraction runs as one 32-wide K step (2 x 128
    x 64 x 32, not x 24); the weight gradient over 1000 tokens runs 4 splits of 256 (1024 tokens: 2 x 64 x 64
    x 1024), and its partial sum reads the 4 fp32 partials and writes the fp32 sum and the bf16 cast."""
    kern = cm.bd_cost("bd", 128, 1, 64, 24, "bfloat16", DEV)
    assert kern.flops == 2 * 128 * 64 * 32 and kern.useful_flops == 2 * 128 * 64 * 24
    dw, red = cm.wgrad_cost("dw", 1000, 1, 64, 64, "bfloat16", DEV).kernels
    assert dw.flops == 2 * 64 * 64 * 1024 and dw.useful_flops == 2 * 1000 * 64 * 64
    assert red.hbm_bytes == 4 * 64 * 64 * 4 + 64 * 64 * (4 + 2)


def test_fused_square_forward_priced_by_hand():
    """1024/32 (32 blocks of 32 on both sides), 4096 bf16 tokens: 16-row tiles of 16 stage-2 blocks (16 x 16
    x 32 = 8K elements), 2 groups: 512 programs of 16 rows, each 32 x 32 x 16 (stage 1, its group's columns of
    all 32 blocks) and 16 x 32 x 32 (stage 2, its 16 blocks) multiply-adds per row. x is read
    from HBM once and from L2 once per group, the output in 32-byte runs of 16 blocks (whole sectors), the
    weights from L2 per row tile; the kernel runs at the mma.sync rate and a tenth of the streaming rate."""
    pr = cm.Problem.linear(4096, 1024, 1024, 32)
    (kern,) = cm._fused_forward(pr, "bfloat16", DEV).kernels
    once, w = 4096 * 1024 * 2, 2 * 32 * 32 * 32 * 2
    assert kern.flops == 2 * 512 * 16 * (32 * 32 * 16 + 16 * 32 * 32)
    assert kern.hbm_bytes == 2 * once + w
    assert kern.l2_bytes == 2 * once + (4096 // 16) * w + once
    assert kern.flop_rate == 300e12 and kern.mem_eff == pytest.approx(0.9 * 0.1)


def test_fused_dx_dw1_kernel_priced_by_hand():
    """GPT-2's fc2 (3072 -> 768; w1: 4 blocks of 768 -> 192), 16384 tokens: the fused dx/dw1 kernel
    holds q = 192 padded to 256 beside an fp32 dw1 tile, which leaves 16-wide p-tiles: 48 of them per block,
    each re-reading dy from L2. HBM: dy read, x read, dx written, 2 splits' fp32 partials; the host sums them
    (read, fp32 sum and bf16 cast written)."""
    T = 16384
    fc2 = cm.Problem.linear(T, 3072, 768, 4)
    dxw, red = cm._dxw_fused(fc2, "bfloat16", DEV).kernels
    dy, x, partial = T * 768 * 2, T * 3072 * 2, 2 * 4 * 192 * 768 * 4
    assert dxw.hbm_bytes == dy + 2 * x + partial
    assert dxw.l2_bytes == 48 * dy + 2 * x + partial
    assert dxw.flops == 2 * 2 * (4 * 48) * 256 * 16 * T
    assert red.hbm_bytes == partial + 4 * 192 * 768 * (4 + 2)


def test_ragged_widths_keep_cublas_off_the_side_without_block_views():
    """cuBLAS runs dx/dw1 on block views of x and dy/dw2 on views of g: a ragged input width (3071 of fc2's 3072)
    rules out the first but not the second, a ragged output width (767) the reverse. At fc2 the model picks
    cuBLAS for both where the views exist."""
    T, sh = 16384, cm.Problem.linear(16384, 3072, 768, 4).shape
    ragged_in, ragged_out = cm.Problem(T, 3071, 768, sh), cm.Problem(T, 3072, 767, sh)
    assert cm.dxw_choice(ragged_in) != "bmm" and cm.g_readers(ragged_in) == "bmm"
    assert cm.g_readers(ragged_out) != "bmm" and cm.dxw_choice(ragged_out) == "bmm"


def test_standalone_input_gradient_gathers_g_as_given():
    """``backward_input`` (dx alone) reads ``g`` row-major: dy gathers it through P2ᵀ in grouped 16-byte runs (8
    blocks per program at 4096/64) at the interleaved kernels' share of the bandwidth, then dx; no copy."""
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    dy, dx = cm.estimate("triton", "two_kernel", "bwd_input", pr).kernels
    assert (dy.name, dx.name) == ("dy = P1T BD(w2)T P2T g", "dx = BD(w1)T dy")
    assert dy.mem_eff == pytest.approx(DEV.mem_eff * DEV.interleaved_eff)
    assert dx.mem_eff == pytest.approx(DEV.mem_eff)


def test_blockdiag_training_step_on_a_non_square_block():
    """4 blocks of 256 -> 1024, 16384 tokens: dx multiplies g (4096 wide) by the transposed blocks into 1024
    columns, reading g from L2 once per 128-wide tile of a block's 256 outputs (2) and the weights once per
    128-row tile; the bias gradient sums the 4096 output columns of g."""
    T = 16384
    step = cm.blockdiag_cost("triton", T, 4, 1024, 256, "bfloat16", DEV, training=True)
    dx = {k.name: k for k in step.kernels}["blockdiag dx"]
    g, w, out = T * 4096 * 2, 4 * 1024 * 256 * 2, T * 1024 * 2
    assert dx.hbm_bytes == g + w + out
    assert dx.l2_bytes == 2 * g + (T // 128) * w + out
    biased = cm.blockdiag_cost("triton", T, 4, 1024, 256, "bfloat16", DEV, training=True, bias=True)
    assert biased.hbm_bytes - step.hbm_bytes == T * 4096 * 2 + 4096 * 2


def test_fused_mlp_kernels_on_unequal_layers_priced_by_hand():
    """An MLP whose layers differ (fc1: 768 -> 3072 through a 512-wide intermediate, w1 4 x (128, 192), w2 8 x
    (384, 64); fc2: 3072 -> 768 through 768, w1 4 x (192, 768), w2 4 x (192, 192)), 1024 bf16 tokens: 8 token
    tiles; per (tile, fc2 block, fc1 block) S = 768 / 8 = 96 hidden rows in 3 chunks of 32. Forward: z1 (512
    wide) read and z2 (768 wide) written once, z1 re-read from L2 per fc2 block (4), both weight slices per
    token tile. Backward: dy2 (768 wide) re-read from L2 per fc1 block (8), the activation and dpre (3072 wide)
    written, dz1 (512 wide) written."""
    T = 1024
    s1, s2 = MonarchShape(4, 128, 192, 8, 384, 64), MonarchShape(4, 192, 768, 4, 192, 192)
    fc1, fc2 = cm.Problem(T, 768, 3072, s1, "gelu"), cm.Problem(T, 3072, 768, s2)
    z1, z2, hid = T * 512 * 2, T * 768 * 2, T * 3072 * 2
    w2a, w1b = 8 * 384 * 64 * 2, 4 * 192 * 768 * 2
    hidden = cm.mlp_forward(fc1, fc2, "bfloat16", DEV).kernels[2]
    assert hidden.flops == 2.0 * 8 * 4 * 8 * 3 * 128 * 32 * (64 + 256)  # r1 = 64; q2 = 192 padded to 256
    assert hidden.hbm_bytes == z1 + z2 + w2a + w1b
    assert hidden.l2_bytes == 4 * z1 + 8 * (w2a + w1b) + z2
    back = cm.mlp_hidden_backward(fc1, fc2, "bfloat16", DEV)
    assert back.flops == 2.0 * 8 * 8 * 4 * 3 * 128 * 32 * (64 + 64 + 192)
    assert back.hbm_bytes == z1 + z2 + 2 * hid + z1 + w2a + w1b
    assert back.l2_bytes == z1 + 8 * z2 + 2 * hid + z1 + 8 * (w2a + w1b)


def test_fused_mlp_forward_ends_as_its_stage_2_store_says():
    """GPT-2's fc2 stage 2 stores token-major (``stage2_store``) at 16384 tokens, so the fused forward ends with
    the transposing copy into the row-major output: the 768-wide output read and written once (50 MB)."""
    T = 16384
    fc1, fc2 = cm.Problem.linear(T, 768, 3072, 4, "gelu"), cm.Problem.linear(T, 3072, 768, 4)
    assert cm.stage2_store(fc2) == "token_major"
    kerns = cm.mlp_forward(fc1, fc2, "bfloat16", DEV).kernels
    assert [k.name for k in kerns[3:]] == ["stage 2 (P2 in a token-major store, epilogue)",
                                           "transpose into the row-major output"]
    assert kerns[-1].hbm_bytes == 2 * T * 768 * 2


def test_fused_mlp_training_step_runs_the_picked_gradient_kernels():
    """The fused MLP step runs fc1's dx/dw1 as ``dxw_choice`` picks (at GPT-2's fc1, 16384 tokens: the block-diagonal
    and weight-gradient kernels, not the fused one), and sums fc2's bias where ``g`` is read: with 8 blocks per
    layer the readers take a token-major copy (Triton tiles), whose 256 tiles' fp32 partials are summed."""
    T = 16384
    fc1, fc2 = cm.Problem.linear(T, 768, 3072, 4, "gelu"), cm.Problem.linear(T, 3072, 768, 4)
    assert cm.dxw_choice(fc1) == "separate"
    names = [k.name for k in cm.mlp_training_step(fc1, fc2, "bfloat16", DEV).kernels]
    assert names[-3:] == ["dx = BD(w1)T dy", "dw1", "dw1 partial sum"] and "dx & dw1 (shared dy)" not in names
    fc1, fc2 = cm.Problem.linear(T, 768, 3072, 8, "gelu", True), cm.Problem.linear(T, 3072, 768, 8, bias=True)
    assert cm.g_readers(fc2) == "token_major"
    bias2 = cm.mlp_training_step(fc1, fc2, "bfloat16", DEV).kernels[-2]
    assert bias2.name == "fc2 bias gradient (the copy's partials summed)"
    assert bias2.hbm_bytes == 2 * 256 * 768 * 4 + 768 * 2
