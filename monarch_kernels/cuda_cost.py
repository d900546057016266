"""Cost estimator of the CUDA decode kernels (``csrc/cuda/decode.cu``), registered in :mod:`.cost_model` as
``("cuda", "decode")``.

A few-token product reads each weight once, so its time is set by HBM bytes and latencies (Dao et al.,
"Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022, §3: a factor pair holds
2·n²/nblocks parameters, a dense layer n²). The decode kernel is one cooperative launch priced like every other
launch of the cost model — ``max(HBM bytes / (bandwidth · mem_eff), L2 bytes / L2 bandwidth, FLOPs / rate)``
plus the launch gap — except that its two stages are ordered by a grid-wide barrier (:class:`CooperativeKernel`):

* each thread prefetches its share of the stage-2 weights into L2 only after issuing its last stage-1 weight
  loads (weights up to ``PREFETCH_SHARE`` of L2, as the kernel decides), so stage 1's bytes stream first and the
  barrier (``GRID_SYNC_S``) resolves while stage 2's bytes stream: the launch takes the longer of all its bytes
  and of stage 1's bytes plus the barrier, then one L2 latency for stage 2's first (prefetched) bytes;
* of a stage-2 factor larger than that share, the kernel prefetches the first part of every task (the share
  of L2 over the factor's bytes); the rest is read after the barrier: stage 1's bytes, the barrier, one DRAM
  latency and the rest's bytes in series, beside the stream of all bytes.

Bytes: both factors once at 32-byte-sector granularity, the input and output once; L2 also carries the
``T × N`` scratch (written and read once) and each task's staged input rows. FLOPs executed: token rows padded
to whole 16-row ``mma.sync`` tiles (fp16/bf16, the model's ``mma`` rate) or exact (fp32, FMA rate).

Only the forward and dX products run the decode kernels; the weight gradients at few tokens run decode stages
plus the tile kernels, which are not priced (``inf``), and neither is a call past the decode kernels' token or
shared-memory limits (:mod:`.cuda_dispatch`) — so the model never has ``auto`` take ``cuda`` there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import cost_model as cm

#: grid-wide barrier of a cooperative launch, DRAM and L2 first-byte latency (s; typical H100 figures, assumed)
GRID_SYNC_S, DRAM_LATENCY_S, L2_LATENCY_S = 1.0e-6, 0.8e-6, 0.3e-6
#: share of L2 the stage-2 prefetch may fill (decode.cu: Launch::plan; a larger factor is prefetched in part)
PREFETCH_SHARE = 0.6
#: most tokens per dtype, and the widest block whose staged rows fit the H100's 227 KiB of shared memory
MAX_TOKENS = {"bfloat16": 64, "float16": 64, "float32": 16}
SMEM_OPTIN = 232448


@dataclass(frozen=True)
class CooperativeKernel(cm.Kernel):
    """A launch with a dependent path inside it: it takes the longer of its streams (the cost model's terms)
    and ``critical_s`` (e.g. stage 1's bytes, then the grid barrier), plus ``latency_s`` (the first bytes
    stage 2 reads after the barrier), plus the launch gap."""

    critical_s: float = 0.0
    latency_s: float = 0.0

    def time(self, dev: cm.Device) -> float:
        return max(super().time(dev) - dev.launch_s, self.critical_s) + dev.launch_s + self.latency_s


def token_rows(dtype: str, tokens: int) -> int:
    """Token rows the multiply runs: whole 16-row mma tiles for fp16/bf16, the tokens themselves in fp32."""
    return tokens if dtype == "float32" else -(-tokens // 16) * 16


def smem_bytes(dtype: str, tokens: int, block: int) -> int:
    """Upper bound of the kernels' dynamic shared memory with blocks whose sides are ≤ ``block``: staged rows
    (16-row tiles, fp32: 16 rows) x padded width, plus the largest partial-sum buffer (1152 bytes per row)."""
    rows = 16 if dtype == "float32" else token_rows(dtype, tokens)
    return rows * ((-(-block // 64) * 64 + 32) * cm.ITEMSIZE[dtype] + 1152)


def supported(problem: cm.Problem, dtype: str, smem_optin: int = SMEM_OPTIN) -> bool:
    sh = problem.shape
    limit = MAX_TOKENS.get(dtype, 0)
    return 1 <= problem.tokens <= limit and smem_bytes(dtype, problem.tokens, max(sh.p, sh.q, sh.r, sh.s)) <= smem_optin


def _unpriced(name: str) -> cm.Cost:
    return cm.Cost([cm.Kernel(name + " (not priced)", 0.0, 0.0, math.inf, math.inf, 1.0)])


def _stream_s(nbytes: float, dev: cm.Device) -> float:
    return nbytes / (dev.hbm_bw * dev.mem_eff)


def _launch(name: str, tokens: int, n_in: int, n_out: int, stages: list, dtype: str, dev: cm.Device,
            useful: float) -> CooperativeKernel:
    """One decode launch over ``stages`` = [(nblk, rows, cols), ...] (each weight read once; a grid barrier
    between consecutive stages, see the module docstring)."""
    item = cm.ITEMSIZE[dtype]
    weights = [nblk * cm.rows_bytes(rows, cols, item) for nblk, rows, cols in stages]
    x_bytes, y_bytes = cm.rows_bytes(tokens, n_in, item), cm.rows_bytes(tokens, n_out, item)
    io = x_bytes + y_bytes
    mids = [nblk * rows for nblk, rows, _ in stages[:-1]]
    scratch = sum(2 * cm.rows_bytes(tokens, m, item) for m in mids)
    # each task stages its block's T x K input from L2; at most two resident CTAs per SM take one task each
    tasks = sum(min(2 * dev.num_sms, -(-nblk * rows // 16)) for nblk, rows, _ in stages)
    staged = tasks * tokens * max(max(rows, cols) for _, rows, cols in stages) * item
    executed = 2.0 * token_rows(dtype, tokens) * sum(nblk * rows * cols for nblk, rows, cols in stages)
    rate = dev.triton_flops["fma" if dtype == "float32" else "mma"]
    critical = latency = 0.0
    if len(stages) == 2:
        first = _stream_s(weights[0] + x_bytes, dev) + GRID_SYNC_S
        share = min(1.0, PREFETCH_SHARE * dev.l2_bytes / weights[1])
        if share == 1.0:  # streamed during the barrier, read from L2 after it
            critical, latency = first, L2_LATENCY_S
        else:  # the part not prefetched is read after the barrier, from DRAM
            critical = first + DRAM_LATENCY_S + _stream_s((1.0 - share) * weights[1] + y_bytes, dev)
    return CooperativeKernel(name, executed, useful, sum(weights) + io, sum(weights) + io + scratch + staged, rate,
                             dev.mem_eff, critical, latency)


def decode_kernel(problem: cm.Problem, dtype: str, dev: cm.Device, transposed: bool = False) -> CooperativeKernel:
    """The one launch of a forward (or, ``transposed``, dX) product on ``problem.tokens`` rows."""
    sh = problem.shape
    stages = [(sh.k, sh.q, sh.p), (sh.l, sh.s, sh.r)]
    if transposed:
        stages = stages[::-1]
    n_in, n_out = (problem.n_out, problem.n_in) if transposed else (problem.n_in, problem.n_out)
    return _launch("cuda decode dX" if transposed else "cuda decode forward", problem.tokens, n_in, n_out, stages,
                   dtype, dev, problem.useful_fwd_flops())


def blockdiag_kernel(tokens: int, k: int, q: int, p: int, dtype: str = "bfloat16",
                     dev: cm.Device = cm.H100_SXM) -> CooperativeKernel:
    """A block-diagonal product ``(T, k·p) -> (T, k·q)`` on the decode kernels: one stage, no barrier."""
    return _launch("cuda decode block-diagonal", tokens, k * p, k * q, [(k, q, p)], dtype, dev,
                   2.0 * tokens * k * q * p)


#: row-split kernel (csrc/cuda/decode_rowsplit.cuh): most tokens, most stage-1 bytes per CTA, threads per CTA
ROWSPLIT_MAX_TOKENS, ROWSPLIT_STAGE_BYTES, ROWSPLIT_THREADS = 16, 512 * 1024, 256


def _lanes(chunks: int) -> int:
    """Lanes per row of the row-split kernel: its 16-byte chunks rounded up to a power of two, at most 32."""
    return min(32, 1 << max(0, chunks - 1).bit_length())


def rowsplit_plan(tokens: int, shape: tuple, n_in: int, dtype: str, sms: int = cm.H100_SXM.num_sms,
                  smem_optin: int = SMEM_OPTIN):
    """The C++ ``rowsplit_plan`` (``csrc/cuda/decode_rowsplit.cuh``) for ``shape = (k, q, p, l, s, r)``:
    ``None`` where the row-split kernel declines (the cooperative kernel runs), else ``{"splits", "s_per",
    "zpitch", "smem"}``. ``tests/csrc/test_cuda_rowsplit_sim.py`` checks that the two agree."""
    k, q, p, l, s, r = shape
    item = cm.ITEMSIZE[dtype]
    if not 1 <= tokens <= ROWSPLIT_MAX_TOKENS or k * q != l * r:
        return None
    if (r * p + tokens * n_in) * item > ROWSPLIT_STAGE_BYTES:
        return None
    vec = 16 // item
    zpitch = -(-r // vec) * vec
    smem = tokens * zpitch * 4
    if smem > smem_optin:
        return None
    splits = min(-(-sms // l), -(-s // 16))
    s_per = -(-s // splits)
    return {"splits": -(-s // s_per), "s_per": s_per, "zpitch": zpitch, "smem": smem}


def rowsplit_kernel(problem: cm.Problem, dtype: str, dev: cm.Device) -> CooperativeKernel:
    """The row-split forward (selected with ``set_decode_kernel("rowsplit")``; not the default until measured):
    one ordinary launch. Its bytes stream as any kernel's; its critical path is one CTA's: stage 1's rows (1/l
    of ``w1``) and the token rows of ``x`` it reads, then its share of ``w2``, at the SM's share of the L2
    bandwidth, plus a DRAM latency per dependent round of stage-1 loads (a lane group issues the chunks of 4
    rows — 2 at more than 4 tokens — two chunks deep, before it reduces them: the vector path, taken when the
    rows are aligned and whole) and an L2 latency per round of stage 2 (its rows were prefetched into L2 at the
    start; one chunk deep)."""
    sh, item, T = problem.shape, cm.ITEMSIZE[dtype], problem.tokens
    plan = rowsplit_plan(T, (sh.k, sh.q, sh.p, sh.l, sh.s, sh.r), problem.n_in, dtype, dev.num_sms)
    weights = sh.k * cm.rows_bytes(sh.q, sh.p, item) + sh.l * cm.rows_bytes(sh.s, sh.r, item)
    io = cm.rows_bytes(T, problem.n_in, item) + cm.rows_bytes(T, problem.n_out, item)
    ctas = sh.l * plan["splits"]
    stage1 = (sh.r * sh.p + T * problem.n_in) * item
    stage2 = plan["s_per"] * sh.r * item
    vec = 16 // item

    rows_per_group = 4 if T <= 4 else 2  # decode_rowsplit.cuh: kRowsPerGroup

    def rounds(rows: int, width: int, chunks_per_round: int) -> int:
        chunks = -(-width // vec)
        lanes = _lanes(chunks)
        return -(-rows // (rows_per_group * (ROWSPLIT_THREADS // lanes))) * -(-chunks // (chunks_per_round * lanes))

    critical = ((stage1 + stage2) / (dev.l2_bw / dev.num_sms)
                + DRAM_LATENCY_S * rounds(sh.r, sh.p, 2) + L2_LATENCY_S * rounds(plan["s_per"], sh.r, 1))
    executed = 2.0 * T * (ctas * sh.r * sh.p + sh.l * sh.s * sh.r)
    return CooperativeKernel("cuda decode forward (row split)", executed, problem.useful_fwd_flops(), weights + io,
                             weights + io + ctas * (stage1 + stage2), dev.triton_flops["fma"], dev.mem_eff, critical)


#: resident kernel (csrc/cuda/resident.cuh): tokens per tile, warps, most 8-column tiles per warp, widest block side
RESIDENT_ROWS, RESIDENT_WARPS, RESIDENT_MAX_UNITS, RESIDENT_MAX_K = 16, 8, 16, 64
#: shared-memory bandwidth of one SM (bytes/s): 128 bytes per clock at a sustained 1.755 GHz (H100 SXM; assumed)
SMEM_BW_PER_SM = 128 * 1.755e9


def resident_plan(tokens: int, shape: tuple, n_in: int, n_out: int, dtype: str, sms: int = cm.H100_SXM.num_sms,
                  smem_optin: int = SMEM_OPTIN):
    """The C++ ``resident_plan`` (``csrc/cuda/resident.cuh``) for ``shape = (k, q, p, l, s, r)`` with aligned,
    unit-stride rows: ``None`` where the resident kernel declines, else ``{"pitch", "units1", "units2", "tiles",
    "ctas", "smem"}``. ``tests/csrc/test_cuda_resident_sim.py`` checks that the two agree."""
    k, q, p, l, s, r = shape
    if cm.ITEMSIZE[dtype] != 2 or tokens < 1:
        return None
    if p % 16 or r % 16 or q % 8 or s % 8 or p > RESIDENT_MAX_K or r > RESIDENT_MAX_K:
        return None
    if k * q != l * r or n_in != k * p or n_out != l * s:
        return None
    units1, units2 = -(-(k * q // 8) // RESIDENT_WARPS), -(-(l * s // 8) // RESIDENT_WARPS)
    if max(units1, units2) > RESIDENT_MAX_UNITS:
        return None
    pitch = -(-max(n_in, k * q, n_out) // 16) * 16 + 8
    smem = 2 * (2 * RESIDENT_ROWS * pitch + k * q * (p + 8) + l * s * (r + 8))
    if smem > smem_optin:
        return None
    tiles = -(-tokens // RESIDENT_ROWS)
    return {"pitch": pitch, "units1": units1, "units2": units2, "tiles": tiles, "ctas": min(tiles, sms),
            "smem": smem}


#: cluster kernel (csrc/cuda/cluster_resident.cuh): tokens per tile, block sides it takes
CLUSTER_ROWS, CLUSTER_BLOCKS = 32, (16, 32, 64)


def cluster_plan(tokens: int, shape: tuple, n_in: int, n_out: int, dtype: str, sms: int = cm.H100_SXM.num_sms,
                 smem_optin: int = SMEM_OPTIN):
    """The C++ ``cluster_plan`` (``csrc/cuda/cluster_resident.cuh``) with aligned, unit-stride rows: ``None``
    where the cluster kernel declines, else ``{"cluster", "pitch", "tiles", "clusters", "smem"}`` (before the
    launcher caps ``clusters`` by how many the device co-schedules). ``tests/csrc/test_cuda_resident_sim.py``
    checks that the two agree."""
    k, q, p, l, s, r = shape
    nb = k
    if cm.ITEMSIZE[dtype] != 2 or tokens < 1 or nb not in CLUSTER_BLOCKS or len({k, q, p, l, s, r}) != 1:
        return None
    if n_in != nb * nb or n_out != nb * nb:
        return None
    pitch = 8 * nb + 8
    smem = 2 * 6 * CLUSTER_ROWS * pitch
    if smem > smem_optin or sms < nb // 8:
        return None
    tiles = -(-tokens // CLUSTER_ROWS)
    return {"cluster": nb // 8, "pitch": pitch, "tiles": tiles, "clusters": min(tiles, sms // (nb // 8)),
            "smem": smem}


def cluster_kernel(problem: cm.Problem, dtype: str, dev: cm.Device, keep: bool = False) -> CooperativeKernel:
    """The cluster form of the resident forward (square Monarch, c = 1, nb = 16/32/64 blocks: clusters of nb / 8
    CTAs, each holding 8 blocks of each factor, one of each per warp as register-held mma B fragments). Per
    round of 32-token tiles (one per cluster), the longest of: each CTA's x columns and output columns at its
    SM's share of HBM (of the SMs whole clusters fill); a DRAM latency plus the next tile's x columns; and on
    chip, in series, shared-memory traffic (x in, both stages' A fragments, the 16-bit scatters of the staging
    and output buffers at 4-byte slots, the 16-byte pushes read locally and written remotely, the output read
    back) at ``SMEM_BW_PER_SM``, the mma FLOPs at the SM's share of
    the ``mma`` rate (the one cluster barrier per tile resolves behind stage 2 of the previous tile and stage 1
    of the next: not on the path). Before the first round each CTA reads its 1/C of both
    factors from L2. The output's 16-byte runs cost whole 32-byte sectors in L2 (each written half by two CTAs).
    ``keep`` (a training forward): each CTA also stores its intermediate columns, read from shared memory with
    16-byte loads and written to HBM in 1 KiB row runs — the tile's z bytes on both sides of the round."""
    sh, item, T = problem.shape, cm.ITEMSIZE[dtype], problem.tokens
    plan = cluster_plan(T, (sh.k, sh.q, sh.p, sh.l, sh.s, sh.r), problem.n_in, problem.n_out, dtype, dev.num_sms)
    if plan is None:
        raise ValueError(f"cluster_kernel: the cluster resident kernel does not take {problem.label} ({dtype})")
    nb, C = sh.k, plan["cluster"]
    sms = dev.num_sms // C * C  # the SMs a full complement of clusters works on: each one's share of HBM
    weights = 2 * nb * nb * nb * item
    io = cm.rows_bytes(T, problem.n_in, item) + cm.rows_bytes(T, problem.n_out, item)
    cols = 8 * nb  # per CTA: 8 blocks of x columns in, 8 · nb output columns out
    x_tile = out_tile = CLUSTER_ROWS * cols * item
    z_tile = CLUSTER_ROWS * cols * item if keep else 0
    io += cm.rows_bytes(T, sh.l * sh.r, item) if keep else 0
    share = dev.hbm_bw * dev.mem_eff / sms
    a_frags = 2 * CLUSTER_ROWS * cols * item  # both stages: each warp its block's 32 x nb (B: registers)
    scatters = 2 * CLUSTER_ROWS * cols * 4    # staging and output buffers, 16-bit stores at 4-byte slots
    pushes = 2 * CLUSTER_ROWS * cols * item   # read here, written in the owner
    smem = x_tile + a_frags + scatters + pushes + out_tile + z_tile
    flops_tile = 2.0 * 2 * CLUSTER_ROWS * 8 * nb * nb
    on_chip = smem / SMEM_BW_PER_SM + flops_tile / (dev.triton_flops["mma"] / dev.num_sms)
    per_round = max((x_tile + out_tile + z_tile) / share, DRAM_LATENCY_S + x_tile / share, on_chip)
    rounds = -(-plan["tiles"] // plan["clusters"])
    startup = (weights / C) / (dev.l2_bw / dev.num_sms) + DRAM_LATENCY_S
    executed = 2.0 * plan["tiles"] * CLUSTER_ROWS * 2 * nb ** 3
    l2 = weights * plan["clusters"] + io + cm.rows_bytes(T, problem.n_out, item)
    name = "cuda cluster resident forward" + (" keeping z" if keep else "")
    return CooperativeKernel(name, executed, problem.useful_fwd_flops(), weights + io,
                             l2, dev.triton_flops["mma"], dev.mem_eff, rounds * per_round, startup)


def resident_forward(problem: cm.Problem, dtype: str, dev: cm.Device, keep: bool = False):
    """The kernel the extension's resident forward runs for ``problem`` (as ``resident.cu`` decides: the
    one-CTA kernel where its plan takes the call, else the cluster kernel), or ``None`` where neither does;
    ``keep``: the training forward that also stores the intermediate (``monarch_fwd_keeping``)."""
    sh = problem.shape
    args = (problem.tokens, (sh.k, sh.q, sh.p, sh.l, sh.s, sh.r), problem.n_in, problem.n_out, dtype, dev.num_sms)
    if resident_plan(*args) is not None:
        return resident_kernel(problem, dtype, dev, keep)
    if cluster_plan(*args) is not None:
        return cluster_kernel(problem, dtype, dev, keep)
    return None


def resident_training_step(problem: cm.Problem, dtype: str, dev: cm.Device) -> cm.Cost:
    """An eager training call on the ``cuda`` backend where a resident kernel runs the forward
    (:meth:`.ext.Primitives.monarch_fwd_saving`): that forward keeping ``z``, then the Triton backward on it
    (:func:`.triton.monarch.backward_epilogue`, priced by :mod:`.cost_model`: ``dw2`` reads ``z``; with an
    activation the pre-activation is stage 2 of ``z``, not kept). ValueError where no resident kernel runs it."""
    def forward(p: cm.Problem, d: str, v: cm.Device, keep: bool = False) -> cm.Cost:
        kernel = resident_forward(p, d, v, keep)
        if kernel is None:
            raise ValueError(f"resident_training_step: no resident kernel takes {p.label} ({d})")
        return cm.Cost([kernel])

    return cm.training_step(problem, dtype, dev, forward, keeps_pre=False)


def _fragment_loads(blocks: int, rows: int, width: int, units: int, item: int) -> int:
    """Shared-memory bytes of one stage's fragment loads per token tile: each warp loads the A fragments (16
    token rows x width) of every block its 8-column tiles touch, and every tile its 8 weight rows."""
    total = blocks * rows // 8
    touched = 0
    for w in range(RESIDENT_WARPS):
        us = range(w * units, min((w + 1) * units, total))
        touched += len({8 * u // rows for u in us})
    return touched * RESIDENT_ROWS * width * item + blocks * rows * width * item


def resident_kernel(problem: cm.Problem, dtype: str, dev: cm.Device, keep: bool = False) -> CooperativeKernel:
    """The resident many-token forward (the extension's default past the decode kernels where its plan takes the
    call; not in ``auto`` until measured). One persistent CTA per SM walks ``ceil(tiles / CTAs)`` rounds of
    16-token tiles; per round the longest of:

    * its HBM share: the tile's x rows and output rows at ``hbm_bw · mem_eff / num_sms``;
    * the double buffer: the next tile's x rows are issued at the top of a round and must land before the
      next: one DRAM latency plus those bytes at the SM's share;
    * on chip: shared-memory traffic at ``SMEM_BW_PER_SM`` (the x tile written by cp.async, each stage's
      fragment loads, its results stored as 16-bit scatters — priced as 4-byte bank slots — and the output
      rows read back) plus the stage's mma FLOPs at the SM's share of the ``mma`` rate, in series (a
      conservative sum: one CTA of 8 warps overlaps little of the two).

    Before the first round, the factors come from L2 at the SM's share of its bandwidth, plus a DRAM latency.
    Bytes: x and the output once from HBM (factors once, then L2). ``keep`` (a training forward): the tile's
    intermediate rows too, read from shared memory and written to HBM with 16-byte accesses."""
    sh, item, T = problem.shape, cm.ITEMSIZE[dtype], problem.tokens
    plan = resident_plan(T, (sh.k, sh.q, sh.p, sh.l, sh.s, sh.r), problem.n_in, problem.n_out, dtype, dev.num_sms)
    if plan is None:
        raise ValueError(f"resident_kernel: the one-CTA resident kernel does not take {problem.label} ({dtype})")
    weights = sh.k * cm.rows_bytes(sh.q, sh.p, item) + sh.l * cm.rows_bytes(sh.s, sh.r, item)
    io = cm.rows_bytes(T, problem.n_in, item) + cm.rows_bytes(T, problem.n_out, item)
    x_tile, out_tile = RESIDENT_ROWS * problem.n_in * item, RESIDENT_ROWS * problem.n_out * item
    z_tile = RESIDENT_ROWS * sh.k * sh.q * item if keep else 0
    io += cm.rows_bytes(T, sh.k * sh.q, item) if keep else 0
    share = dev.hbm_bw * dev.mem_eff / dev.num_sms
    smem = (x_tile + out_tile + z_tile
            + _fragment_loads(sh.k, sh.q, sh.p, plan["units1"], item) + RESIDENT_ROWS * sh.k * sh.q * 4
            + _fragment_loads(sh.l, sh.s, sh.r, plan["units2"], item) + RESIDENT_ROWS * sh.l * sh.s * 4)
    flops_tile = 2.0 * RESIDENT_ROWS * (sh.k * sh.q * sh.p + sh.l * sh.s * sh.r)
    on_chip = smem / SMEM_BW_PER_SM + flops_tile / (dev.triton_flops["mma"] / dev.num_sms)
    per_round = max((x_tile + out_tile + z_tile) / share, DRAM_LATENCY_S + x_tile / share, on_chip)
    rounds = -(-plan["tiles"] // plan["ctas"])
    startup = weights / (dev.l2_bw / dev.num_sms) + DRAM_LATENCY_S
    executed = flops_tile * plan["tiles"]
    name = "cuda resident forward" + (" keeping z" if keep else "")
    return CooperativeKernel(name, executed, problem.useful_fwd_flops(), weights + io,
                             weights * plan["ctas"] + io, dev.triton_flops["mma"], dev.mem_eff,
                             rounds * per_round, startup)


def decode_estimator(op: str, problem: cm.Problem, dtype: str, dev: cm.Device) -> cm.Cost:
    if not supported(problem, dtype):
        return _unpriced("cuda tile kernels")
    if op == "fwd":
        return cm.Cost([decode_kernel(problem, dtype, dev)])
    if op == "bwd_input":
        return cm.Cost([decode_kernel(problem, dtype, dev, transposed=True)])
    return _unpriced("cuda weight gradients")


def floor_seconds(problem: cm.Problem, dtype: str = "bfloat16", dev: cm.Device = cm.H100_SXM) -> float:
    """max(weight bytes / HBM bandwidth, one launch): no kernel can beat it."""
    sh, item = problem.shape, cm.ITEMSIZE[dtype]
    return max((sh.k * sh.q * sh.p + sh.l * sh.s * sh.r) * item / dev.hbm_bw, dev.launch_s)


cm.register_estimator("cuda", "decode", decode_estimator)
