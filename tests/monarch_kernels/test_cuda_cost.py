"""The decode-kernel cost model's accounting (monarch_kernels.cuda_cost)."""
import pytest

from monarch_kernels import cuda_cost as cc


def test_weight_bytes_are_both_factors_at_sector_granularity():
    est = cc.decode_monarch((4, 1024, 1024), (4, 1024, 1024), 1)
    assert est.hbm_bytes == 2 * 4 * 1024 * 1024 * 2 + (4096 + 4096) * 2
    assert est.useful_flops == 2 * 2 * 4 * 1024 * 1024
    assert est.executed_flops == 16 * est.useful_flops  # one token padded to the 16 rows of an mma tile
    ragged = cc.decode_monarch((4, 5, 8), (4, 6, 5), 1)  # rows of 16 and 10 bytes still cost a 32-byte sector
    assert ragged.hbm_bytes == 4 * 5 * 32 + 4 * 6 * 32 + (32 + 24) * 2


def test_floor_and_dense_baseline():
    est = cc.decode_monarch((4, 2048, 2048), (4, 2048, 2048), 4)
    assert est.floor_us == pytest.approx(2 * 4 * 2048 * 2048 * 2 / (cc.HBM_GBS * 1e3))
    assert est.time_us >= est.floor_us
    small = cc.decode_monarch((64, 32, 32), (64, 32, 32), 1)
    assert small.floor_us == cc.LAUNCH_US and small.time_us >= cc.LAUNCH_US
    d = cc.dense(8192, 8192, 16)
    assert d.hbm_bytes == 8192 * 8192 * 2 + 16 * 2 * 8192 * 2


def test_stage2_prefetch_hides_the_second_dram_latency():
    # same bytes; w2 under 60% of L2 is prefetched during stage 1, a w2 past it is read after the barrier
    fits = cc.decode_monarch((4, 1024, 1024), (4, 1024, 1024), 1)
    gap = fits.time_us - fits.floor_us
    big = cc.decode_monarch((2, 4096, 4096), (2, 4096, 4096), 1)  # 64 MiB per factor
    assert big.time_us - big.floor_us > gap


def test_token_limits():
    with pytest.raises(ValueError, match="1..16 tokens of float32"):
        cc.decode_monarch((4, 64, 64), (4, 64, 64), 17, "float32")
    with pytest.raises(ValueError):
        cc.decode_monarch((4, 64, 64), (4, 64, 64), 0)
