"""Predicted H100 time of the CUDA decode kernels (``csrc/cuda/decode.cu``) and of dense cuBLAS at T ≤ 64 tokens.

A few-token product reads each weight once, so its time is set by HBM bytes, memory latency and launch latency
(Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022, §3: a
Monarch factor pair holds 2·n²/nblocks parameters against a dense layer's n²). The decode kernel's timeline:

1. the CTAs start (``START_US``) and issue stage 1's weight loads, then prefetch their stage-2 weights into L2;
2. stage 1 ends one DRAM latency after its bytes have streamed: ``DRAM_LATENCY_US + w1 / BW``;
3. a grid-wide barrier (``GRID_SYNC_US``);
4. stage 2 reads its weights from L2 once the prefetch has brought them (the DRAM has kept streaming through the
   barrier), or, without the prefetch (stage-2 weights larger than 60% of L2), from DRAM after another latency.

Tensor-core (fp16/bf16, token rows padded to whole 16-row tiles) or FMA (fp32) time is a lower bound checked against
the memory time. Back-to-back calls overlap the launch of one call with the previous kernel, so a call costs
``max(LAUNCH_US, kernel)``. Dense cuBLAS at T ≤ 64 is a weight stream too: ``max(LAUNCH_US, START_US +
DRAM_LATENCY_US + n_in·n_out·itemsize / BW)`` (an optimistic dense baseline).

Every constant is an H100 SXM figure from public specifications or typical microbenchmarks, not measured here:
they are the model, to be replaced by the numbers ``bench/gpu_check.py`` measures on a lent GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: HBM bandwidth reached by streaming kernels (GB/s; 3.35 TB/s peak, ≈ 3.0 TB/s measured by a copy)
HBM_GBS = 3000.0
#: L2 bandwidth for data already on chip (GB/s)
L2_GBS = 7000.0
#: L2 capacity (bytes) and the share of it the stage-2 prefetch may fill
L2_BYTES, PREFETCH_SHARE = 50 * 2 ** 20, 0.6
#: first-byte latency of a DRAM stream and of an L2 read (µs)
DRAM_LATENCY_US, L2_LATENCY_US = 0.8, 0.3
#: one kernel launch (µs): the time per call of back-to-back launches of an empty kernel
LAUNCH_US = 2.5
#: CTA start-up (parameters, first instructions) and the grid-wide barrier of a cooperative launch (µs)
START_US, GRID_SYNC_US = 0.5, 1.0
#: mma.sync throughput (fp16/bf16, fp32 accumulation; ≈ 60% of the wgmma peak) and fp32 FMA throughput (TFLOP/s)
MMA_TFLOPS, FMA_TFLOPS = 600.0, 60.0
#: most tokens of the decode kernels per dtype name
MAX_TOKENS = {"bfloat16": 64, "float16": 64, "float32": 16}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Estimate:
    """One prediction (times in µs, bytes of HBM traffic at 32-byte-sector granularity)."""

    time_us: float
    hbm_bytes: int
    executed_flops: int
    useful_flops: int
    floor_us: float  # max(weight bytes / HBM bandwidth, one launch)

    @property
    def vs_floor(self) -> float:
        return self.time_us / self.floor_us


def _row_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of `rows` contiguous rows of `cols` elements read with 16-byte vectors, whole 32-byte sectors."""
    return rows * math.ceil(cols * itemsize / 32) * 32


def _token_rows(dtype: str, tokens: int) -> int:
    """Token rows the multiply actually runs: whole 16-row mma tiles for fp16/bf16, the tokens in fp32."""
    return tokens if dtype == "float32" else -(-tokens // 16) * 16


def decode_monarch(w1_shape: tuple, w2_shape: tuple, tokens: int, dtype: str = "bfloat16") -> Estimate:
    """Forward (or dX: the same bytes, transposed tiles) of ``P2·BD(w2)·P1·BD(w1)`` on ``tokens`` rows."""
    if dtype not in MAX_TOKENS or not 1 <= tokens <= MAX_TOKENS[dtype]:
        raise ValueError(f"the decode kernels take 1..{MAX_TOKENS.get(dtype)} tokens of {dtype}, got {tokens}")
    (k, q, p), (l, s, r) = w1_shape, w2_shape
    es = ITEMSIZE[dtype]
    w1 = k * _row_bytes(q, p, es)
    w2 = l * _row_bytes(s, r, es)
    io = tokens * (k * p + l * s) * es  # input read once, output written once (sectors merge in L2)
    useful = 2 * tokens * (k * q * p + l * s * r)
    executed = 2 * _token_rows(dtype, tokens) * (k * q * p + l * s * r)
    compute_us = executed / ((MMA_TFLOPS if es == 2 else FMA_TFLOPS) * 1e6)
    stage1 = START_US + DRAM_LATENCY_US + max((w1 + io) / (HBM_GBS * 1e3), compute_us / 2)
    if w2 <= L2_BYTES * PREFETCH_SHARE:  # stage-2 weights stream into L2 during stage 1 and the barrier
        streamed = START_US + DRAM_LATENCY_US + (w1 + w2 + io) / (HBM_GBS * 1e3)
        end = max(stage1 + GRID_SYNC_US + L2_LATENCY_US + max(w2 / (L2_GBS * 1e3), compute_us / 2), streamed + L2_LATENCY_US)
    else:
        end = stage1 + GRID_SYNC_US + DRAM_LATENCY_US + max(w2 / (HBM_GBS * 1e3), compute_us / 2)
    floor = max((w1 + w2) / (HBM_GBS * 1e3), LAUNCH_US)
    return Estimate(max(LAUNCH_US, end), w1 + w2 + io, executed, useful, floor)


def dense(n_in: int, n_out: int, tokens: int, dtype: str = "bfloat16") -> Estimate:
    """Dense ``F.linear`` (cuBLAS) on ``tokens`` rows: one weight stream."""
    es = ITEMSIZE[dtype]
    weight = _row_bytes(n_out, n_in, es)
    io = tokens * (n_in + n_out) * es
    flops = 2 * tokens * n_in * n_out
    t = START_US + DRAM_LATENCY_US + (weight + io) / (HBM_GBS * 1e3)
    return Estimate(max(LAUNCH_US, t), weight + io, flops, flops, max(weight / (HBM_GBS * 1e3), LAUNCH_US))
