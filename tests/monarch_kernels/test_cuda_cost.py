"""The decode kernels' cost estimator (monarch_kernels.cuda_cost) inside the shared cost model."""
import math

import pytest

from monarch_kernels import cost_model as cm
from monarch_kernels import cuda_cost as cc


def test_registered_and_priced_from_the_shared_device_model():
    assert ("cuda", "decode") in cm.estimators()
    pr = cm.Problem.linear(1, 4096, 4096, 4)
    cost = cm.estimate("cuda", "decode", "fwd", pr)
    (kern,) = cost.kernels
    dev = cm.H100_SXM
    weights = 2 * 4 * 1024 * 1024 * 2
    assert kern.hbm_bytes == weights + 2 * 4096 * 2  # both factors once, x and the output once
    assert kern.flops == 16 * kern.useful_flops == 16 * 2 * weights / 2  # one token padded to a 16-row mma tile
    # one launch: the gap, then all bytes streamed (stage 1's bytes and the barrier take less), then the
    # first prefetched stage-2 bytes from L2
    stream = (weights + 2 * 4096 * 2) / (dev.hbm_bw * dev.mem_eff)
    first = (weights / 2 + 4096 * 2) / (dev.hbm_bw * dev.mem_eff)
    assert first + cc.GRID_SYNC_S < stream
    assert cost.time() == pytest.approx(dev.launch_s + stream + cc.L2_LATENCY_S, rel=1e-9)
    assert cost.launches == 1


def test_the_barrier_overlaps_the_stage2_stream_and_is_on_the_path_when_longer():
    dev = cm.H100_SXM
    pr = cm.Problem.linear(1, 2048, 2048, 4)  # 2 MiB per factor: stage 1's 0.78 us + 1 us barrier > 1.55 us
    (kern,) = cm.estimate("cuda", "decode", "fwd", pr).kernels
    w1 = 4 * 512 * 512 * 2
    first = (w1 + 2048 * 2) / (dev.hbm_bw * dev.mem_eff) + cc.GRID_SYNC_S
    stream = (2 * w1 + 2 * 2048 * 2) / (dev.hbm_bw * dev.mem_eff)
    assert stream < first
    assert kern.time(dev) == pytest.approx(dev.launch_s + first + cc.L2_LATENCY_S, rel=1e-9)
    # the barrier added in series to the whole stream (stage-2 prefetch interleaved with stage 1) is slower
    assert kern.time(dev) < dev.launch_s + stream + cc.GRID_SYNC_S + cc.L2_LATENCY_S
    # dX runs the stages the other way round: the same bytes, the other factor first
    (dx,) = cm.estimate("cuda", "decode", "bwd_input", pr).kernels
    assert dx.time(dev) == pytest.approx(kern.time(dev), rel=1e-9)


def test_ragged_rows_cost_whole_sectors_and_dx_has_the_forward_bytes():
    pr = cm.Problem(1, 32, 24, cm.MonarchShape.from_factors((4, 5, 8), (4, 6, 5)))
    (kern,) = cm.estimate("cuda", "decode", "fwd", pr).kernels
    assert kern.hbm_bytes == 4 * 5 * 32 + 4 * 6 * 32 + 2 * 32 + 2 * 32  # 16- and 10-byte rows: one sector each
    (dx,) = cm.estimate("cuda", "decode", "bwd_input", pr).kernels
    assert dx.hbm_bytes == kern.hbm_bytes and dx.name.endswith("dX")


def test_stage2_weights_past_l2_are_prefetched_in_part():
    """A second factor past 60% of L2 is prefetched in part (that share of its bytes); the rest is read after
    the barrier, in series with stage 1 and one DRAM latency. The prefetched part (30 MB) streams for longer
    than the barrier and the latency take, so the stream of all bytes stays the longer path: 256 MiB factors
    (12% prefetched) and 8192 with 4 blocks (33.5 MB, 94%)."""
    dev = cm.H100_SXM
    small = cc.decode_kernel(cm.Problem.linear(1, 4096, 4096, 4), "bfloat16", dev)
    assert small.latency_s == cc.L2_LATENCY_S
    big = cc.decode_kernel(cm.Problem.linear(1, 16384, 16384, 2), "bfloat16", dev)  # 256 MiB factors
    w = 2 * 8192 * 8192 * 2  # one factor
    share = cc.PREFETCH_SHARE * dev.l2_bytes / w
    bw = dev.hbm_bw * dev.mem_eff
    stage1, rest = (w + 16384 * 2) / bw, ((1 - share) * w + 16384 * 2) / bw
    assert big.latency_s == 0
    assert big.critical_s == pytest.approx(stage1 + cc.GRID_SYNC_S + cc.DRAM_LATENCY_S + rest, rel=1e-9)
    assert big.time(dev) == pytest.approx(dev.launch_s + (2 * w + 2 * 16384 * 2) / bw, rel=1e-9)
    assert big.critical_s < big.time(dev) - dev.launch_s
    mid = cc.decode_kernel(cm.Problem.linear(1, 8192, 8192, 4), "bfloat16", dev)
    w = 4 * 2048 * 2048 * 2
    stream = (2 * w + 2 * 8192 * 2) / bw
    assert 0.9 < cc.PREFETCH_SHARE * dev.l2_bytes / w < 1 and mid.critical_s < stream
    assert mid.time(dev) == pytest.approx(dev.launch_s + stream, rel=1e-9)


def test_outside_the_decode_kernels_nothing_is_priced():
    for problem, dtype in [(cm.Problem.linear(65, 1024, 1024, 4), "bfloat16"),
                           (cm.Problem.linear(17, 1024, 1024, 4), "float32"),
                           (cm.Problem.linear(64, 8192, 8192, 4), "bfloat16")]:  # 2048-wide rows x 64: no room
        assert math.isinf(cm.estimate("cuda", "decode", "fwd", problem, dtype).time())
    assert math.isinf(cm.estimate("cuda", "decode", "bwd_weight", cm.Problem.linear(4, 1024, 1024, 4)).time())


def test_blockdiag_is_one_stage_without_barrier():
    kern = cc.blockdiag_kernel(4, 4, 256, 256)
    assert kern.latency_s == kern.critical_s == 0 and kern.hbm_bytes == 4 * 256 * 256 * 2 + 2 * 4 * 1024 * 2


def test_floor():
    pr = cm.Problem.linear(4, 8192, 8192, 4)
    assert cc.floor_seconds(pr) == pytest.approx(2 * 4 * 2048 * 2048 * 2 / cm.H100_SXM.hbm_bw)
    assert cc.floor_seconds(cm.Problem.linear(1, 1024, 1024, 32)) == cm.H100_SXM.launch_s


def test_rowsplit_plan_and_price_by_hand():
    """4096/64 square, 1 bf16 token on the H100: 64 stage-2 blocks x ceil(132/64) = 3 splits of 22 rows; one
    CTA streams 64 w1 rows of 128 B plus x (8 KiB) plus 22 w2 rows of 128 B at 7.5 TB/s / 132, then one DRAM
    round (stage 1: 8 lanes per row, 4 rows per lane group: 128 rows per pass) and one L2 round (stage 2,
    prefetched): 1.438 µs, longer than the launch's streams (L2 4.75 MB: 0.634 µs), plus the 2 µs launch gap.
    4096/16 (r = p = 256, 32 lanes per row): 8 rows per warp pass x 8 warps = 32 rows per round, 8 rounds."""
    assert cc.rowsplit_plan(1, (64, 64, 64, 64, 64, 64), 4096, "bfloat16") == {
        "splits": 3, "s_per": 22, "zpitch": 64, "smem": 256}
    kern = cc.rowsplit_kernel(cm.Problem.linear(1, 4096, 4096, 64), "bfloat16", cm.H100_SXM)
    per_cta = (64 * 64 + 4096 + 22 * 64) * 2
    assert kern.l2_bytes == 2 * 64 * 64 * 64 * 2 + 2 * 4096 * 2 + 192 * per_cta
    critical = per_cta / (7.5e12 / 132) + cc.DRAM_LATENCY_S + cc.L2_LATENCY_S
    assert kern.time(cm.H100_SXM) == pytest.approx(critical + 2e-6, rel=1e-9)
    wide = cc.rowsplit_kernel(cm.Problem.linear(1, 4096, 4096, 16), "bfloat16", cm.H100_SXM)
    plan = cc.rowsplit_plan(1, (16, 256, 256, 16, 256, 256), 4096, "bfloat16")
    per_cta = (256 * 256 + 4096 + plan["s_per"] * 256) * 2
    stage2_rounds = -(-plan["s_per"] // 32)
    expected = per_cta / (7.5e12 / 132) + 8 * cc.DRAM_LATENCY_S + stage2_rounds * cc.L2_LATENCY_S
    assert wide.critical_s == pytest.approx(expected, rel=1e-9)


def test_rowsplit_plan_declines_what_the_kernel_declines():
    assert cc.rowsplit_plan(17, (8, 8, 8, 8, 8, 8), 64, "bfloat16") is None  # > 16 tokens
    assert cc.rowsplit_plan(1, (2, 512, 512, 2, 512, 512), 1024, "bfloat16") is None  # 512 KiB of w1 + x per CTA
    assert cc.rowsplit_plan(16, (8, 8, 8, 8, 8, 8), 64, "float32", smem_optin=16 * 8 * 4 - 1) is None
    assert cc.rowsplit_plan(16, (8, 8, 8, 8, 8, 8), 64, "float32", smem_optin=16 * 8 * 4)["smem"] == 512
    # rank c = 2 and 5-wide rows: the intermediate's pitch is r rounded up to a 16-byte chunk
    assert cc.rowsplit_plan(3, (4, 8, 16, 4, 24, 8), 64, "bfloat16")["zpitch"] == 8
    assert cc.rowsplit_plan(3, (5, 6, 7, 3, 9, 10), 35, "bfloat16")["zpitch"] == 16


def test_the_default_decode_forward_is_priced_as_the_cooperative_kernel():
    """``auto`` runs the cooperative kernel (the row-split one only when selected), so that is what is priced."""
    p = cm.Problem.linear(1, 4096, 4096, 64)
    assert cm.estimate("cuda", "decode", "fwd", p).time() == cc.decode_kernel(p, "bfloat16", cm.H100_SXM).time(
        cm.H100_SXM)


def test_resident_plan_and_price_by_hand():
    """1024 features in 32 blocks, 16384 bf16 tokens, H100: 1024 tiles on 132 CTAs (8 rounds), each round bound
    by the SM's share of HBM for one tile's x and output rows (64 KiB), after the factors (128 KiB) from L2."""
    dev = cm.H100_SXM
    pr = cm.Problem.linear(16384, 1024, 1024, 32)
    plan = cc.resident_plan(16384, (32, 32, 32, 32, 32, 32), 1024, 1024, "bfloat16", dev.num_sms)
    assert plan == {"pitch": 1032, "units1": 16, "units2": 16, "tiles": 1024, "ctas": 132,
                    "smem": 2 * (2 * 16 * 1032 + 2 * 1024 * 40)}
    k = cc.resident_kernel(pr, "bfloat16", dev)
    share = dev.hbm_bw * dev.mem_eff / 132
    tile = 16 * 1024 * 2
    # shared memory per tile: x in, output out, per stage 32 blocks' A fragments (each warp's 4 blocks) + all
    # weights + 16-bit scatters at 4 bytes; mma FLOPs at the SM's share of the mma rate
    smem = 2 * tile + 2 * (32 * 16 * 32 * 2 + 32 * 32 * 32 * 2 + 16 * 1024 * 4)
    on_chip = smem / cc.SMEM_BW_PER_SM + 2 * 16 * 2 * 32 ** 3 / (dev.triton_flops["mma"] / 132)
    per_round = max(2 * tile / share, cc.DRAM_LATENCY_S + tile / share, on_chip)
    assert per_round == 2 * tile / share  # HBM-bound
    weights = 2 * 32 * 32 * 32 * 2
    assert k.critical_s == pytest.approx(8 * per_round, rel=1e-12)
    assert k.latency_s == pytest.approx(weights / (dev.l2_bw / 132) + cc.DRAM_LATENCY_S, rel=1e-12)
    assert k.hbm_bytes == weights + 2 * 16384 * 1024 * 2 and k.flops == k.useful_flops
    assert k.time(dev) == pytest.approx(8 * per_round + dev.launch_s + k.latency_s, rel=1e-12)


def test_resident_plan_declines_what_the_kernel_declines():
    ok = (32, 32, 32, 32, 32, 32)
    assert cc.resident_plan(100, ok, 1024, 1024, "float32") is None
    assert cc.resident_plan(100, ok, 1000, 1024, "bfloat16") is None  # ragged input
    assert cc.resident_plan(100, (64, 32, 32, 64, 32, 32), 2048, 2048, "bfloat16") is None  # 32 tiles per warp
    assert cc.resident_plan(100, (16, 64, 64, 16, 64, 64), 1024, 1024, "bfloat16") is None  # past shared memory
    assert cc.resident_plan(100, (4, 32, 8, 8, 16, 16), 32, 128, "bfloat16") is None  # p = 8
    assert cc.resident_plan(100, ok, 1024, 1024, "float16")["tiles"] == 7


def test_cluster_plan_and_price_by_hand():
    """4096 features in 64 blocks, 16384 bf16 tokens, H100: clusters of 8 CTAs (16 of them on 128 SMs), 512
    tiles of 32 tokens, 32 rounds; per round and CTA 32 KiB of x columns in and 32 KiB of output out; on chip
    (the bound here) the shared-memory bytes (the weights are register fragments) and the mma FLOPs in series
    (the cluster barrier overlaps the next tile's work)."""
    dev = cm.H100_SXM
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    plan = cc.cluster_plan(16384, (64,) * 6, 4096, 4096, "bfloat16", dev.num_sms)
    assert plan == {"cluster": 8, "pitch": 520, "tiles": 512, "clusters": 16, "smem": 2 * 6 * 32 * 520}
    k = cc.cluster_kernel(pr, "bfloat16", dev)
    tile = 32 * 512 * 2
    share = dev.hbm_bw * dev.mem_eff / 128
    smem = tile + 2 * tile + 2 * 32 * 512 * 4 + 2 * tile + tile  # x, A fragments, scatters, pushes, out
    on_chip = smem / cc.SMEM_BW_PER_SM + 2 * 2 * 32 * 8 * 64 ** 2 / (dev.triton_flops["mma"] / 132)
    assert on_chip > 2 * tile / share > cc.DRAM_LATENCY_S + tile / share
    assert k.critical_s == pytest.approx(32 * on_chip, rel=1e-12)
    weights = 2 * 64 ** 3 * 2  # two factors of 64 blocks of 64 x 64, 2 bytes each
    assert k.latency_s == pytest.approx(weights / 8 / (dev.l2_bw / 132) + cc.DRAM_LATENCY_S, rel=1e-12)
    assert k.hbm_bytes == weights + 2 * 16384 * 4096 * 2 and k.flops == k.useful_flops
    # the extension runs the one-CTA kernel where both take the call (1024/32), the cluster kernel past it
    assert cc.resident_forward(pr, "bfloat16", dev).name == k.name
    assert "cluster" not in cc.resident_forward(cm.Problem.linear(4096, 1024, 1024, 32), "bfloat16", dev).name
    assert cc.resident_forward(cm.Problem.linear(4096, 2048, 2048, 32), "bfloat16", dev) is None


def test_resident_prices_refuse_problems_their_kernels_decline():
    pr = cm.Problem.linear(4096, 2048, 2048, 32)
    with pytest.raises(ValueError, match="one-CTA resident kernel does not take"):
        cc.resident_kernel(pr, "bfloat16", cm.H100_SXM)
    with pytest.raises(ValueError, match="cluster resident kernel does not take"):
        cc.cluster_kernel(pr, "bfloat16", cm.H100_SXM)


def test_keeping_the_intermediate_prices_its_bytes_by_hand():
    """A training forward that keeps z: 4096/64 (cluster), each CTA's 32 KiB of intermediate columns more per
    round through HBM (now the bound: 96 KiB per round) and read from shared memory; 1024/32 (one CTA), 32 KiB
    more per round. Both write T·k·q elements more to HBM, with the same arithmetic."""
    dev = cm.H100_SXM
    pr = cm.Problem.linear(16384, 4096, 4096, 64)
    plain, kept = cc.cluster_kernel(pr, "bfloat16", dev), cc.cluster_kernel(pr, "bfloat16", dev, keep=True)
    tile = 32 * 512 * 2
    share = dev.hbm_bw * dev.mem_eff / 128
    on_chip = plain.critical_s / 32 + tile / cc.SMEM_BW_PER_SM
    assert 3 * tile / share > on_chip
    assert kept.critical_s == pytest.approx(32 * 3 * tile / share, rel=1e-12)
    assert kept.hbm_bytes == plain.hbm_bytes + 16384 * 4096 * 2 and kept.flops == plain.flops
    small = cm.Problem.linear(16384, 1024, 1024, 32)
    plain, kept = cc.resident_kernel(small, "bfloat16", dev), cc.resident_kernel(small, "bfloat16", dev, keep=True)
    tile = 16 * 1024 * 2
    assert kept.critical_s == pytest.approx(8 * 3 * tile / (dev.hbm_bw * dev.mem_eff / 132), rel=1e-12)
    assert kept.hbm_bytes == plain.hbm_bytes + 16384 * 1024 * 2
    assert "keeping z" in cc.resident_forward(pr, "bfloat16", dev, keep=True).name


def test_resident_training_step_is_the_kept_forward_and_the_triton_backward_on_z():
    """The ``cuda`` training step where a resident kernel runs the forward: that forward keeping z, then exactly
    the Triton backward with z saved (no stage-1 recompute); with an activation, the pre-activation as stage 2
    of z (the forward keeps none). Shapes no resident kernel takes raise."""
    dev = cm.H100_SXM
    for act in ("none", "gelu"):
        pr = cm.Problem.linear(16384, 4096, 4096, 64, act)
        step = cc.resident_training_step(pr, "bfloat16", dev)
        backward = cm.training_step(pr, "bfloat16", dev, lambda *a, keep=False: cm.Cost(), keeps_pre=False)
        assert step.kernels[0].name == "cuda cluster resident forward keeping z"
        assert [k.name for k in step.kernels[1:]] == [k.name for k in backward.kernels]
        assert not any("recomputed" in k.name for k in step.kernels)
        assert any(k.name.startswith("pre-activation") for k in step.kernels) == (act == "gelu")
        assert step.time(dev) == pytest.approx(step.kernels[0].time(dev) + backward.time(dev), rel=1e-12)
    with pytest.raises(ValueError, match="no resident kernel takes"):
        cc.resident_training_step(cm.Problem.linear(4096, 768, 3072, 4), "bfloat16", dev)


# ------------------------------------------------------------------------ mutation sweep of the CUDA model


def test_shared_memory_bound_uses_every_block_side_and_16_fp32_rows():
    """The staged rows' bound: 16-bit tokens in whole 16-row tiles, fp32 always 16 rows, times the widest block
    side of either factor padded to 64 plus 32, plus 1152 bytes per row. 512 -> 8192 with 4 blocks has 128-wide
    stage-1 blocks but 2048-wide stage-2 rows: 64 tokens need 64 x ((2048 + 32) x 2 + 1152) = 339968 bytes,
    past the 227 KiB opt-in, 16 tokens 84992."""
    assert cc.smem_bytes("float32", 4, 64) == 16 * ((64 + 32) * 4 + 1152)
    assert cc.smem_bytes("bfloat16", 20, 64) == 32 * ((64 + 32) * 2 + 1152)
    wide = cm.Problem.linear(64, 512, 8192, 4)
    assert (wide.shape.q, wide.shape.s) == (128, 2048)
    assert cc.smem_bytes("bfloat16", 64, 2048) == 339968 > cc.SMEM_OPTIN
    assert not cc.supported(wide, "bfloat16")
    assert math.isinf(cm.estimate("cuda", "decode", "fwd", wide).time())
    assert cc.supported(cm.Problem.linear(16, 512, 8192, 4), "bfloat16")


def test_unequal_factors_prefetch_by_the_second_stages_bytes():
    """4096 -> 16384 with 4 blocks, one bf16 token: w1 8 MiB, w2 32 MiB. The forward's stage 2 (w2) is past 60%
    of L2 (30 MiB): 15/16 of it is prefetched, the rest read after the barrier (critical path: w1 and x, the
    barrier, a DRAM latency, 2 MiB and the output). dX runs w2 first (reading the 16384-wide g) and then w1,
    which is prefetched whole: stage 1's bytes and the barrier, then one L2 latency."""
    dev = cm.H100_SXM
    pr = cm.Problem.linear(1, 4096, 16384, 4)
    w1, w2, bw = 4 * 1024 * 1024 * 2, 4 * 4096 * 1024 * 2, dev.hbm_bw * dev.mem_eff
    fwd = cc.decode_kernel(pr, "bfloat16", dev)
    rest = (w2 / 16 + 16384 * 2) / bw
    assert fwd.latency_s == 0
    assert fwd.critical_s == pytest.approx((w1 + 4096 * 2) / bw + cc.GRID_SYNC_S + cc.DRAM_LATENCY_S + rest, rel=1e-9)
    dx = cc.decode_kernel(pr, "bfloat16", dev, transposed=True)
    assert dx.latency_s == cc.L2_LATENCY_S
    assert dx.critical_s == pytest.approx((w2 + 16384 * 2) / bw + cc.GRID_SYNC_S, rel=1e-9)


def test_rowsplit_rows_per_lane_group_at_four_tokens_and_past():
    """The row-split kernel's lane groups take 4 rows up to 4 tokens and 2 past that (kRowsPerGroup). 4096/16
    (r = p = 256: 32 lanes per row, 8 rows per warp pass): stage 1's 256 rows take 8 DRAM rounds at 4 tokens and
    16 at 5; stage 2's 29 rows per split one and two L2 rounds; one CTA streams its w1 rows, x and w2 rows."""
    sh = (16, 256, 256, 16, 256, 256)
    for T, dram, l2 in ((4, 8, 1), (5, 16, 2)):
        plan = cc.rowsplit_plan(T, sh, 4096, "bfloat16")
        assert plan["s_per"] == 29
        kern = cc.rowsplit_kernel(cm.Problem.linear(T, 4096, 4096, 16), "bfloat16", cm.H100_SXM)
        per_cta = (256 * 256 + T * 4096 + 29 * 256) * 2
        expected = per_cta / (7.5e12 / 132) + dram * cc.DRAM_LATENCY_S + l2 * cc.L2_LATENCY_S
        assert kern.critical_s == pytest.approx(expected, rel=1e-9)


def test_resident_plan_runs_no_more_ctas_than_tiles():
    """100 tokens are 7 tiles of 16: the resident kernel launches 7 CTAs, not one per SM, and each reads the
    factors from L2 once (7 x 128 KiB) beside x and the output."""
    plan = cc.resident_plan(100, (32,) * 6, 1024, 1024, "bfloat16")
    assert (plan["tiles"], plan["ctas"]) == (7, 7)
    kern = cc.resident_kernel(cm.Problem.linear(100, 1024, 1024, 32), "bfloat16", cm.H100_SXM)
    weights = 2 * 32 * 32 * 32 * 2
    assert kern.l2_bytes == 7 * weights + 2 * 100 * 1024 * 2
    assert kern.critical_s > 0 and kern.critical_s == pytest.approx(
        cc.resident_kernel(cm.Problem.linear(16, 1024, 1024, 32), "bfloat16", cm.H100_SXM).critical_s)
