"""Roofline cost model of the GPU paths: FLOPs executed vs useful, HBM and L2 bytes, launches, predicted time.

Pure arithmetic (no ``triton`` import), so GPU ``auto`` dispatch (:mod:`monarch_kernels.gpu_dispatch`) and the
kernel audit (``python -m bench.kernel_audit --model``) share it. Every launch is priced as

    t = max(HBM bytes / (copy bandwidth · mem_eff), L2 bytes / L2 bandwidth, FLOPs executed / FLOP rate) + gap

and a call is the sum of its launches. Bytes are counted at 32-byte-sector granularity: a run of ``w``
contiguous bytes costs ``ceil(w / 32)`` sectors, so a scattered 2-byte access costs a whole sector. HBM bytes are
first touches (each tensor read or written once per launch, intermediates included unless the plan keeps them
in L2); L2 bytes are everything the programs load and store, re-reads included.

Estimators are registered per ``(backend, path)`` (:func:`register_estimator`); ``estimate(backend, path, op,
problem, dtype)`` returns a :class:`Cost`, :func:`dense` prices cuBLAS ``F.linear`` at the same shape the same way.
Ops: ``fwd``, ``bwd`` (dx, dw1, dw2 from ``x`` and ``g`` alone), ``fwdbwd`` (an eager training step: the
forward, and the backward with what the forward kept), ``bwd_input``, ``bwd_weight``.

Device constants (:data:`H100_SXM`), with their sources:

* ``hbm_bw = 3.0 TB/s``: device-to-device copy bandwidth measured on an H100 SXM (SPEC §5; 3.35 TB/s nominal).
* ``dense_flops`` bf16/fp16 ``790 TFLOP/s``: cuBLAS at large shapes, measured (SPEC §5; 989 dense peak). fp32:
  PyTorch keeps fp32 matmuls in full precision by default (``allow_tf32`` off), i.e. FFMA: 67 TFLOP/s peak,
  ``51`` assumed reachable (76%, as cuBLAS SGEMM typically reaches).
* ``l2_bw = 7.5 TB/s`` (assumed, the least certain constant): NVIDIA publishes no H100 L2 bandwidth; the A100
  whitepaper gives 5120 B/clk (7.2 TB/s at 1.41 GHz) and H100 has more L2 at a higher clock. 2.5x the copy
  bandwidth is taken as a conservative value; ``bench/gpu_check.py`` measures it.
* Triton kernel rates: ``wgmma`` kernels 600 TFLOP/s (61% of peak: Triton's own matmul tutorial reaches
  60-70% on Hopper with large tiles, our K per block is short), ``mma.sync`` kernels 300 (Hopper issues the
  warp-level MMA at about half the wgmma rate), fp32 ``ieee`` dots 40 (FFMA, 60% of 67).
* ``mem_eff = 0.9``: share of the copy bandwidth a streaming kernel with 16-byte vector accesses and
  software pipelining (``num_stages ≥ 2``) reaches; the sector rule already charges narrow accesses.
* ``interleaved_eff = 0.3``: share of ``mem_eff`` a block-diagonal launch reaches when an operand is stored or
  gathered row-major in interleaved groups of blocks (group > 1: the 16-byte P1/P2 runs of :mod:`.triton.plan`).
  Measured on an H200 (2026-11-30, ``bench/gpu_profile.py``): stage 2's grouped P2 store 1.02 TB/s under ncu
  (half of every store sector unused, 180 registers, one program per SM), the grouped-output kernel alone at
  65536 x 4096/64 1.08-1.38 TB/s against 3.26-3.77 TB/s for the same kernel with plain tiles: 0.29-0.37.
  The gathered-input side shares the ``tl.join``/``tl.split`` tree and its registers and is taken as equal.
* ``fused_eff = 0.1``: share of ``mem_eff`` the fused square forward reaches. Measured on an H200 (2026-11-30):
  16384 x 1024/32 bf16 in 168-174 µs for 67 MB of compulsory traffic (0.4 TB/s); ncu: 216 registers, 4 warps,
  2 programs per SM (12.5% occupancy), DRAM 11% busy, 69% of the stall cycles waiting on global loads — bound
  by latency, not by any of the model's three terms.
* ``bmm_eff = (0.44, 0.69)``: share of the copy bandwidth cuBLAS batched GEMMs over Monarch blocks reach, for
  blocks narrower than 128 (either output or contraction side) and wider ones. Measured on an H200 (2026-11-30,
  torch.profiler, 16384 tokens): 64 x 64 blocks (4096/64) 1.85 TB/s, GPT-2's 192 x 192 and 768 x 192 blocks
  2.9 TB/s, of 4.25 (short contractions keep too few bytes in flight per tile).
* ``permute_copy_eff = 0.25``: share of the copy bandwidth the torch reference's permutation copies
  (``.contiguous()`` of a transposed 3-D view) reach: measured on the H200 0.92 TB/s (4096/64's P1/P2) and
  1.33 TB/s (GPT-2 fc1's P2), of 4.25.
* ``launch_s = 2 µs``: gap per dependent launch (drain of one grid, ramp of the next; the host-side launch
  cost of ~5 µs per Triton call overlaps with the previous kernel when kernels run longer than that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .shapes import MonarchShape, monarch_factor_shapes
from .triton import plan as _plan

SECTOR = 32
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
OPS = ("fwd", "bwd", "fwdbwd", "bwd_input", "bwd_weight")


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bw: float
    l2_bw: float
    l2_bytes: int
    num_sms: int
    dense_flops: dict
    triton_flops: dict
    mem_eff: float
    launch_s: float
    interleaved_eff: float = 1.0
    fused_eff: float = 1.0
    bmm_eff: tuple = (0.9, 0.9)
    permute_copy_eff: float = 0.9


H100_SXM = Device(
    name="H100 SXM",
    hbm_bw=3.0e12,
    l2_bw=7.5e12,
    l2_bytes=50 * 2**20,
    num_sms=132,
    dense_flops={"bfloat16": 790e12, "float16": 790e12, "float32": 51e12},
    triton_flops={"wgmma": 600e12, "mma": 300e12, "fma": 40e12},
    mem_eff=0.9,
    launch_s=2e-6,
    interleaved_eff=0.3,
    fused_eff=0.1,
    bmm_eff=(0.44, 0.69),
    permute_copy_eff=0.25,
)
#: the H200 lent for device checks, with its measured constants (2026-11-30: copy 4247 GB/s; cuBLAS bf16 at
#: 16384 x 4096 x 4096 786 TFLOP/s of device time; 60 MB of L2; its L2 rate scaled with the copy rate); the
#: Triton rates and the efficiencies as on the H100 (the same SMs)
H200 = replace(H100_SXM, name="H200", hbm_bw=4.25e12, l2_bw=H100_SXM.l2_bw * 4.25 / 3.0, l2_bytes=60 * 2**20,
               dense_flops={"bfloat16": 780e12, "float16": 780e12, "float32": 51e12})


def device_for(name: str) -> Device:
    """The constants to price a GPU by name: :data:`H200` for an H200, :data:`H100_SXM` otherwise."""
    return H200 if "H200" in name else H100_SXM


@dataclass(frozen=True)
class Kernel:
    """One launch: its work and traffic, and the rates it runs at."""

    name: str
    flops: float
    useful_flops: float
    hbm_bytes: float
    l2_bytes: float
    flop_rate: float
    mem_eff: float = 1.0

    def time(self, dev: Device) -> float:
        return max(self.hbm_bytes / (dev.hbm_bw * self.mem_eff), self.l2_bytes / dev.l2_bw,
                   self.flops / self.flop_rate) + dev.launch_s

    def bound(self, dev: Device) -> str:
        terms = {"HBM": self.hbm_bytes / (dev.hbm_bw * self.mem_eff), "L2": self.l2_bytes / dev.l2_bw,
                 "FLOP": self.flops / self.flop_rate}
        return max(terms, key=terms.get)


@dataclass
class Cost:
    """A call: the sequence of launches it makes."""

    kernels: list = field(default_factory=list)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.kernels + other.kernels)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def useful_flops(self) -> float:
        return sum(k.useful_flops for k in self.kernels)

    @property
    def hbm_bytes(self) -> float:
        return sum(k.hbm_bytes for k in self.kernels)

    @property
    def l2_bytes(self) -> float:
        return sum(k.l2_bytes for k in self.kernels)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    def time(self, dev: Device = H100_SXM) -> float:
        return sum(k.time(dev) for k in self.kernels)


@dataclass(frozen=True)
class Problem:
    """A Monarch layer call: ``tokens`` rows, ``n_in -> n_out`` features, factors ``w1 (k, q, p)``, ``w2 (l, s, r)``;
    ``activation`` fused into the forward's epilogue; ``bias``: the layer has one, whose gradient ``Σ_t g`` the
    backward computes (:func:`bias_grad`; adding it is part of every forward's epilogue, not priced)."""

    tokens: int
    n_in: int
    n_out: int
    shape: MonarchShape
    activation: str = "none"
    bias: bool = False

    @classmethod
    def linear(cls, tokens: int, n_in: int, n_out: int, nblocks: int, activation: str = "none",
               bias: bool = False) -> "Problem":
        """The factors ``MonarchLinear(n_in, n_out, nblocks)`` uses."""
        return cls(tokens, n_in, n_out, monarch_factor_shapes(n_in, n_out, nblocks), activation, bias)

    @property
    def label(self) -> str:
        return f"T={self.tokens} {self.n_in}->{self.n_out} w1{self.shape.w1_shape} w2{self.shape.w2_shape}"

    def useful_fwd_flops(self) -> float:
        sh = self.shape
        return 2.0 * self.tokens * (sh.k * sh.q * sh.p + sh.l * sh.s * sh.r)


def sectors(run_bytes: float, runs: float) -> float:
    """Bytes moved by ``runs`` accesses of ``run_bytes`` contiguous bytes each, at sector granularity."""
    return runs * math.ceil(run_bytes / SECTOR) * SECTOR


def rows_bytes(rows: int, width: int, item: int) -> float:
    """A ``rows × width`` row-major tensor read or written once (each row's run padded to whole sectors)."""
    return sectors(width * item, rows)


# --------------------------------------------------------------------------------------------- registry

Estimator = Callable[[str, Problem, str, Device], Cost]
_ESTIMATORS: dict[tuple[str, str], Estimator] = {}


def register_estimator(backend: str, path: str, fn: Estimator) -> None:
    """Add (or replace) the cost estimator of ``backend``'s ``path`` (e.g. ``("cuda", "decode")``)."""
    _ESTIMATORS[(backend, path)] = fn


def estimators() -> list[tuple[str, str]]:
    return sorted(_ESTIMATORS)


def estimate(backend: str, path: str, op: str, problem: Problem, dtype: str = "bfloat16",
             dev: Device = H100_SXM) -> Cost:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if (backend, path) not in _ESTIMATORS:
        raise ValueError(f"no cost estimator for backend {backend!r} path {path!r}; known: {estimators()}")
    return _ESTIMATORS[(backend, path)](op, problem, dtype, dev)


# --------------------------------------------------------------------------------------------- dense cuBLAS


def _gemm(name: str, m: int, n: int, k: int, dtype: str, dev: Device, a_bytes=None, b_bytes=None) -> Kernel:
    item = ITEMSIZE[dtype]
    flops = 2.0 * m * n * k
    hbm = (rows_bytes(m, k, item) if a_bytes is None else a_bytes) + (rows_bytes(n, k, item) if b_bytes is None
                                                                      else b_bytes) + rows_bytes(m, n, item)
    return Kernel(name, flops, flops, hbm, hbm, dev.dense_flops[dtype])


def dense(op: str, problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> Cost:
    """``F.linear`` at the same shape: one GEMM forward; dX and dW GEMMs backward (cuBLAS, measured rate), and
    with a bias its gradient as a reduction of ``g`` (autograd's ``g.sum(0)``)."""
    T, n_in, n_out = problem.tokens, problem.n_in, problem.n_out
    fwd = Cost([_gemm("dense fwd", T, n_out, n_in, dtype, dev)])
    dx = Cost([_gemm("dense dX", T, n_in, n_out, dtype, dev)])
    dw = Cost([_gemm("dense dW", n_out, n_in, T, dtype, dev)]) + bias_grad("dense", problem, dtype, dev)
    return {"fwd": fwd, "bwd": dx + dw, "fwdbwd": fwd + dx + dw, "bwd_input": dx, "bwd_weight": dw}[op]


# --------------------------------------------------------------------------------------------- torch reference


def _elementwise(name: str, reads: list, writes: list, dev: Device, eff: float = 0.9) -> Kernel:
    hbm = sum(reads) + sum(writes)
    return Kernel(name, 0.0, 0.0, hbm, hbm, 1e30, eff)


def activation_pass(tokens: int, n: int, dtype: str, dev: Device, backward: bool = False) -> Kernel:
    """An unfused activation over ``(tokens, n)`` (``F.gelu`` and the like): forward one read and one write,
    ``backward`` (``g · act'(pre)``) two reads and one write."""
    act = rows_bytes(tokens, n, ITEMSIZE[dtype])
    return _elementwise("activation backward" if backward else "activation", [(2 if backward else 1) * act], [act],
                        dev)


def _bias_grad(layer: str, tokens: int, n: int, dtype: str, dev: Device, copied: bool = False) -> Kernel:
    """A bias gradient ``Σ_t g`` over ``g (tokens, n)``: where ``g`` is copied token-major (``copied``) the copy
    writes its fp32 column sums per 64-token tile (:func:`.triton.token_major.to_token_major`) and this adds
    them up (the partials written and read); else one read of ``g`` (``g.sum(0)``)."""
    item = ITEMSIZE[dtype]
    if copied:
        part = _plan.cdiv(tokens, _plan.COPY_TILE.block_m) * n * 4
        return _elementwise(f"{layer} bias gradient (the copy's partials summed)", [2 * part], [n * item], dev)
    return _elementwise(f"{layer} bias gradient (g summed)", [rows_bytes(tokens, n, item)], [n * item], dev)


def bias_grad(layer: str, problem: Problem, dtype: str, dev: Device, copied: bool = False) -> Cost:
    """``problem``'s bias gradient (:func:`_bias_grad`); nothing without a bias."""
    return Cost([_bias_grad(layer, problem.tokens, problem.n_out, dtype, dev, copied)] if problem.bias else [])


def _bmm(name: str, batch: int, m: int, n: int, k: int, dtype: str, dev: Device,
         useful: Optional[float] = None) -> Kernel:
    """cuBLAS batched GEMM over ``batch`` blocks: operands once each (strided views, no copies)."""
    item = ITEMSIZE[dtype]
    flops = 2.0 * batch * m * n * k
    hbm = batch * (rows_bytes(m, k, item) + rows_bytes(n, k, item) + rows_bytes(m, n, item))
    eff = dev.bmm_eff[0 if min(n, k) < 128 else 1]
    return Kernel(name, flops, flops if useful is None else useful, hbm, hbm, dev.dense_flops[dtype], eff)


def torch_reference(op: str, problem: Problem, dtype: str, dev: Device) -> Cost:
    """:mod:`monarch_kernels.reference`: two ``bmm`` per product plus the permutation copies it materialises
    (fly's formulation). Strided ``bmm`` operands are read at sector granularity of their block rows. A
    standalone backward (``bwd``, ``bwd_weight``) recomputes the stage-1 intermediate; a training step
    (``fwdbwd``) does not: eager autograd keeps the forward's intermediate for the backward
    (``reference.monarch_fwd_saving``, fly's trade of activation memory), and with an activation gets the
    pre-activation from it (stage-2 ``bmm`` and P2 copy, ``reference.monarch_bwd_epilogue``). A bias gradient
    is ``g.sum(0)``, one read of ``g`` (with the weight gradients)."""
    sh, T, item = problem.shape, problem.tokens, ITEMSIZE[dtype]
    n_mid = sh.n_mid
    copy = lambda name, width: _elementwise(name, [rows_bytes(T, width, item)], [rows_bytes(T, width, item)], dev,
                                            dev.permute_copy_eff)
    fwd = Cost([_bmm("ref bmm1", sh.k, T, sh.q, sh.p, dtype, dev), copy("ref P1 copy", n_mid),
                _bmm("ref bmm2", sh.l, T, sh.s, sh.r, dtype, dev), copy("ref P2 copy", sh.n_out)])
    stage1 = Cost([_bmm("ref bmm1 (z)", sh.k, T, sh.q, sh.p, dtype, dev), copy("ref P1 copy", n_mid)])
    go = Cost([copy("ref P2T copy", sh.n_out)])
    dw2 = Cost([_bmm("ref dW2 bmm", sh.l, sh.s, sh.r, T, dtype, dev)])
    # dZ straight into natural order (out= a transposed view), then P1ᵀ: one copy of the stage-1 width
    dz = Cost([_bmm("ref dZ bmm", sh.l, T, sh.r, sh.s, dtype, dev), copy("ref P1T copy", n_mid)])
    dw1 = Cost([_bmm("ref dW1 bmm", sh.k, sh.q, sh.p, T, dtype, dev)]) + bias_grad("ref", problem, dtype, dev)
    dx = Cost([_bmm("ref dX bmm", sh.k, T, sh.p, sh.q, dtype, dev)])  # natural order from bmm: no copy
    bwd = go + stage1 + dw2 + dz + dw1 + dx
    pre = (Cost([_bmm("ref bmm2 (pre-activation)", sh.l, T, sh.s, sh.r, dtype, dev), copy("ref P2 copy", sh.n_out)])
           if problem.activation != "none" else Cost())
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + pre + go + dw2 + dz + dw1 + dx, "bwd_input": go + dz + dx,
            "bwd_weight": go + stage1 + dw2 + dz + dw1}[op]


register_estimator("torch", "reference", torch_reference)


# --------------------------------------------------------------------------------------------- Triton


def _tc_rate(dev: Device, tile: _plan.Tile, dtype: str) -> float:
    """The tensor-core path Triton takes on sm_90 (kernel audit: ``wgmma`` when a warpgroup owns ≥ 64 rows)."""
    if dtype == "float32":
        return dev.triton_flops["fma"]
    return dev.triton_flops["wgmma" if tile.block_m >= 64 and tile.num_warps % 4 == 0 else "mma"]


def _run_bytes(lay: _plan.Layout, item: int, row_bytes: int, full: bool = False) -> int:
    """Contiguous bytes per access run of an operand stored with layout ``lay`` (whole rows when natural or
    when the group is every block)."""
    if lay.mode == _plan.NATURAL or full:
        return row_bytes
    if lay.mode == _plan.SCATTERED:
        return item
    return lay.group * lay.c * item


def _tensor_bytes(rows: int, row_bytes: int, run: int, hbm: bool) -> float:
    """Bytes to move a ``rows × row_bytes`` tensor in runs of ``run`` bytes. L2 traffic counts a 32-byte sector
    per run; HBM counts each sector once when runs are ≥ 16 bytes (the programs sharing a sector run side by
    side: groups vary fastest in the grid) and a sector per run below that (scattered accesses: no reuse
    assumed)."""
    if hbm and run >= 16:
        return sectors(row_bytes, rows)
    return sectors(run, rows * row_bytes / run)


def bd_cost(name: str, tokens: int, k: int, q: int, p: int, dtype: str, dev: Device, *, in_perm=None,
            out_perm=None, n_in: Optional[int] = None, n_out: Optional[int] = None, x_hbm: bool = True,
            y_hbm: bool = True, activation: bool = False, x_token_major: bool = False,
            y_token_major: bool = False, pre_out: bool = False) -> Kernel:
    """One :func:`.blockdiag.bd_forward` launch (grouped block-diagonal kernel), from its launch plan.

    ``x_hbm``/``y_hbm``: whether the input is read from / the output written to HBM (False when the plan keeps
    it in L2). ``*_token_major``: the tensor is stored transposed (token stride 1), so every access is a run
    of the row tile's tokens. Weights are read from HBM once and from L2 by every row tile. ``pre_out``: the
    pre-activation is stored too, the output's bytes once more.
    """
    item = ITEMSIZE[dtype]
    lp = _plan.bd_launch(tokens, k, q, p, item, in_perm, out_perm, activation, x_token_major, y_token_major,
                         pre_out)
    t = lp.tile
    n_in = k * p if n_in is None else n_in
    n_out = k * q if n_out is None else n_out
    tiles_n, tiles_m = _plan.cdiv(q, t.block_n), lp.grid[1]
    programs = lp.grid[0] * lp.grid[1]
    k_pad = _plan.cdiv(p, t.block_k) * t.block_k
    flops = 2.0 * programs * t.group * t.block_m * t.block_n * k_pad
    in_run = t.block_m * item if x_token_major else _run_bytes(lp.inp, item, n_in * item, lp.in_full)
    out_run = t.block_m * item if y_token_major else _run_bytes(lp.out, item, n_out * item, lp.out_full)
    w_bytes = k * q * p * item
    hbm = w_bytes
    hbm += _tensor_bytes(tokens, n_in * item, in_run, True) if x_hbm else 0.0
    stores = 2 if pre_out else 1
    hbm += stores * _tensor_bytes(tokens, n_out * item, out_run, True) if y_hbm else 0.0
    # L2: every program loads its rows of its blocks' inputs (once per N tile) and its weight tile
    l2 = (_tensor_bytes(tokens, n_in * item, in_run, False) * tiles_n + tiles_m * w_bytes
          + stores * _tensor_bytes(tokens, n_out * item, out_run, False))
    interleaved = ((lp.out.mode == _plan.GROUPED and lp.out.group > 1 and not y_token_major)
                   or (lp.inp.mode == _plan.GROUPED and lp.inp.group > 1 and not x_token_major))
    return Kernel(name, flops, 2.0 * tokens * k * q * p, hbm, l2, _tc_rate(dev, t, dtype),
                  dev.mem_eff * (dev.interleaved_eff if interleaved else 1.0))


def wgrad_cost(name: str, tokens: int, k: int, q: int, p: int, dtype: str, dev: Device, *, g_perm=None,
               n_x: Optional[int] = None, n_g: Optional[int] = None, g_token_major: bool = False) -> Cost:
    """:func:`.blockdiag.bd_weight_grad`: the split-T kernel plus the host's fp32 partial sum and cast.
    ``g_token_major``: the gradient is stored token-major (each column a run of the token step)."""
    item = ITEMSIZE[dtype]
    lp = _plan.wgrad_launch(tokens, k, q, p, item, g_perm, dev.num_sms, g_token_major)
    t = lp.tile
    n_x = k * p if n_x is None else n_x
    n_g = k * q if n_g is None else n_g
    t_pad = lp.splits * _plan.cdiv(lp.rows_per_split, t.block_k) * t.block_k
    flops = 2.0 * lp.tiles * t.group * t.block_m * t.block_n * t_pad
    if g_token_major:
        g_run = t.block_k * item
    elif lp.g_full:
        g_run = t.block_m * t.group * item
    else:
        g_run = _run_bytes(lp.g, item, n_g * item)
    g_hbm, g_l2 = _tensor_bytes(tokens, n_g * item, g_run, True), _tensor_bytes(tokens, n_g * item, g_run, False)
    x_once = rows_bytes(tokens, n_x, item)
    partial = lp.splits * k * q * p * 4
    tiles_q, tiles_p = _plan.cdiv(q, t.block_m), _plan.cdiv(p, t.block_n)
    l2 = g_l2 * tiles_p + x_once * tiles_q + partial
    interleaved = lp.g.mode == _plan.GROUPED and lp.g.group > 1 and not g_token_major
    kern = Kernel(name, flops, 2.0 * tokens * k * q * p, g_hbm + x_once + partial, l2, _tc_rate(dev, t, dtype),
                  dev.mem_eff * (dev.interleaved_eff if interleaved else 1.0))
    reduce = _elementwise(name + " partial sum", [partial], [k * q * p * (4 + item)], dev)
    return Cost([kern, reduce])


def paired(name: str, first: Kernel, second: Kernel) -> Kernel:
    """Two independent launches run as one grid (:func:`.blockdiag.bd_forward_pair`): their programs share the
    GPU, so the launch is bound by the sum of their HBM bytes, of their L2 bytes or of their arithmetic time,
    whichever is largest — an HBM-bound and an L2-bound launch overlap — plus one launch gap."""
    flop_s = first.flops / first.flop_rate + second.flops / second.flop_rate
    flops = first.flops + second.flops
    return Kernel(name, flops, first.useful_flops + second.useful_flops, first.hbm_bytes + second.hbm_bytes,
                  first.l2_bytes + second.l2_bytes, flops / flop_s if flop_s > 0 else 1e30,
                  min(first.mem_eff, second.mem_eff))


@dataclass(frozen=True)
class Chained(Kernel):
    """One launch that runs ``steps`` (each priced as a launch of its own) one after another, ordered by
    in-kernel waits instead of launch boundaries (:func:`.triton.blockdiag.bd_forward_chain`): the steps'
    times without their launch gaps, plus one gap. The fields sum the steps' work."""

    steps: tuple = ()

    def time(self, dev: Device) -> float:
        return sum(step.time(dev) - dev.launch_s for step in self.steps) + dev.launch_s


def chained(name: str, steps: list) -> Kernel:
    flop_s = sum(s.flops / s.flop_rate for s in steps)
    flops = sum(s.flops for s in steps)
    return Chained(name, flops, sum(s.useful_flops for s in steps), sum(s.hbm_bytes for s in steps),
                   sum(s.l2_bytes for s in steps), flops / flop_s if flop_s > 0 else 1e30,
                   min(s.mem_eff for s in steps), tuple(steps))


def _two_kernel_forward(problem: Problem, dtype: str, dev: Device, keep: bool = False,
                        store: str = "auto") -> Cost:
    """Stage 1 and stage 2; ``store`` (:data:`.plan.STAGE2_STORES`, ``"auto"``: :func:`stage2_store`) how stage 2
    writes the output: grouped runs, or token-major and then a transposing copy. With :data:`.plan.CHUNK_IN_L2`, per
    L2-sized token chunk: the intermediate goes from one to the other through L2; with :data:`.plan.PAIR_STAGES`
    stage 1 of each chunk runs in one launch with stage 2 of the previous one (:func:`paired`; two chunks'
    intermediates in L2), and with :data:`.plan.ONE_LAUNCH` that schedule is one launch (:class:`Chained`) after a
    counter reset. ``keep`` (:func:`.triton.monarch.forward_saving`): every chunk's intermediate also reaches HBM,
    kept, and with an activation stage 2 stores the pre-activation too."""
    sh, T, item = problem.shape, problem.tokens, ITEMSIZE[dtype]
    pair = _plan.PAIR_STAGES
    chunk = _plan.forward_chunk(T, sh.n_mid, item, dev.l2_bytes)
    keeps_pre = keep and problem.activation != "none"
    stores = _plan.stage2_stores(chunk, T, keeps_pre)
    if store == "auto":
        store = stage2_store(problem, dtype, dev, keep)
    if store not in stores:
        raise ValueError(f"stage-2 store must be one of {stores} here, got {store!r}")
    token_major = store == "token_major"
    live = 2 if pair and chunk < T else 1
    resident = live * chunk * sh.n_mid * item <= _plan.L2_SHARE * dev.l2_bytes
    first, second = [], []
    for t0 in range(0, T, chunk):
        tc = min(chunk, T - t0)
        first.append(bd_cost("stage 1 (P1 in a token-major store)", tc, sh.k, sh.q, sh.p, dtype, dev,
                             out_perm=(sh.l, sh.r), n_in=problem.n_in, y_hbm=keep or not resident,
                             y_token_major=True))
        second.append(bd_cost("stage 2 (P2 in a token-major store, epilogue)" if token_major else
                              "stage 2 (P2 grouped store, epilogue)", tc, sh.l, sh.s, sh.r, dtype, dev,
                              out_perm=(sh.s, sh.l), n_out=problem.n_out, x_hbm=not resident,
                              activation=problem.activation != "none", x_token_major=True,
                              y_token_major=token_major, pre_out=keeps_pre))
    if resident and not keep:  # the last chunk's intermediate is written back from L2 eventually
        last = first[-1]
        first[-1] = Kernel(last.name, last.flops, last.useful_flops,
                           last.hbm_bytes + rows_bytes(min(chunk, T), sh.n_mid, item), last.l2_bytes,
                           last.flop_rate, last.mem_eff)
    if live == 1:
        copy = [_token_major_copy("transpose into the row-major output", T, problem.n_out, dtype, dev)]
        return Cost([k for pair_ in zip(first, second) for k in pair_] + (copy if token_major else []))
    steps = ([first[0]] + [paired("stage 1 beside the previous chunk's stage 2", a, b)
                           for a, b in zip(first[1:], second)] + [second[-1]])
    if not _plan.ONE_LAUNCH:
        return Cost(steps)
    counters = 4 * (2 + 2 * len(first))  # zeroed before the launch: one more (tiny) launch
    return Cost([_elementwise("chain counters reset", [], [counters], dev),
                 chained(f"{len(first)} chunks' stages in one launch", steps)])


def stage2_store(problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM, keep: bool = False) -> str:
    """How the two-kernel forward's second stage writes its output (:data:`.plan.STAGE2_STORES`), the faster
    predicted of those that apply: a token-major store plus a transposing copy moves the output three times,
    the grouped store once but at :attr:`Device.interleaved_eff` of the bandwidth. Ties go to the first."""
    sh, T = problem.shape, problem.tokens
    chunk = _plan.forward_chunk(T, sh.n_mid, ITEMSIZE[dtype], dev.l2_bytes)
    options = _plan.stage2_stores(chunk, T, keep and problem.activation != "none")
    return min(options, key=lambda o: _two_kernel_forward(problem, dtype, dev, keep, o).time(dev))


def stage2_from_token_major(problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> Cost:
    """:func:`.triton.monarch.stage2_forward`: stage 2 and the epilogue from a whole token-major intermediate,
    written as :func:`stage2_store` picks (the grouped P2 store, or token-major and a transposing copy)."""
    sh, T = problem.shape, problem.tokens
    token_major = stage2_store(problem, dtype, dev) == "token_major"
    kern = bd_cost("stage 2 (P2 in a token-major store, epilogue)" if token_major else
                   "stage 2 (P2 grouped store, epilogue)", T, sh.l, sh.s, sh.r, dtype, dev, out_perm=(sh.s, sh.l),
                   n_out=problem.n_out, activation=problem.activation != "none", x_token_major=True,
                   y_token_major=token_major)
    copy = [_token_major_copy("transpose into the row-major output", T, problem.n_out, dtype, dev)]
    return Cost([kern] + (copy if token_major else []))


def mlp_forward(fc1: Problem, fc2: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> Cost:
    """:func:`.triton.mlp.mlp_forward`, ``fc2(act(fc1(x)))`` with the hidden layer fused: fc1's stage 1
    (token-major store through P1), fc2's ``w1`` regrouped (one small copy), the hidden-layer kernel and fc2's
    stage 2 (:func:`stage2_from_token_major`). The hidden-layer kernel executes, per (token tile, fc2 block) of
    :data:`.plan.MLP_TILE`, ``l1 · ceil(S / bs)`` chunks (``bs``: :func:`.plan.mlp_block_s`) of a ``block_m × bs
    × r1`` dot (``r1`` padded to ``block_k``) and a ``block_m × q2 × bs`` one (``q2`` padded to a power of two);
    it reads fc1's intermediate ``z1`` and writes fc2's ``z2`` once from HBM (token-major: whole sectors), ``z1``
    once per fc2 block and both weight slices once per token tile from L2,
    and runs at the ``wgmma`` rate (kernel audit). ``fc1.activation`` is the one between the layers.
    ValueError where the fused kernel does not take the pair (:func:`.plan.mlp_fusable`)."""
    sh1, sh2, T, item = fc1.shape, fc2.shape, fc1.tokens, ITEMSIZE[dtype]
    if fc2.tokens != T or fc2.n_in != fc1.n_out or not _plan.mlp_fusable(sh1, sh2, fc1.n_in, fc1.n_out, item):
        raise ValueError(f"mlp_forward: the fused hidden layer does not take {fc1.label} then {fc2.label} ({dtype})")
    stage1 = bd_cost("fc1 stage 1 (P1 in a token-major store)", T, sh1.k, sh1.q, sh1.p, dtype, dev,
                     out_perm=(sh1.l, sh1.r), n_in=fc1.n_in, y_token_major=True)
    w2a, w1b = sh1.l * sh1.s * sh1.r * item, sh2.k * sh2.q * sh2.p * item
    regroup = _elementwise("fc2 w1 regrouped", [w1b], [w1b], dev)
    t, S = _plan.MLP_TILE, sh2.p // sh1.l
    tiles, bs = _plan.cdiv(T, t.block_m), _plan.mlp_block_s(S)
    r_pad = _plan.cdiv(sh1.r, t.block_k) * t.block_k
    flops = 2.0 * tiles * sh2.k * sh1.l * _plan.cdiv(S, bs) * t.block_m * bs * (r_pad + _plan.mlp_block_q(sh2.q))
    useful = 2.0 * T * (sh1.l * sh1.s * sh1.r + sh2.k * sh2.q * sh2.p)
    z1, z2 = sectors(T * item, sh1.n_mid), sectors(T * item, sh2.n_mid)
    hidden = Kernel("fc1 stage 2 + activation + fc2 stage 1 (hidden layer on chip)", flops, useful,
                    z1 + z2 + w2a + w1b, sh2.k * z1 + tiles * (w2a + w1b) + z2, _tc_rate(dev, t, dtype), dev.mem_eff)
    return Cost([stage1, regroup, hidden]) + stage2_from_token_major(replace(fc2, activation="none"), dtype, dev)


def mlp_hidden_backward(fc1: Problem, fc2: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> Kernel:
    """:func:`.triton.mlp.hidden_layer_backward`: per (token tile, fc1 block ``ll``) of :data:`.plan.MLP_BWD_TILE`
    and each of the ``k2 · ceil(S / bs)`` chunks, three dots: the pre-activation again (``block_m × bs × r1``),
    ``da`` (``block_m × bs × q2``) and ``dz1 += dpre · w2a`` (``block_m × r1 × bs``), ``r1`` and ``q2`` padded to
    ``block_k``. HBM: ``z1`` and ``dy2`` read, the activation and ``dpre`` (token-major ``T × n_h`` each) and
    ``dz1`` written, with fc1's bias its gradient's fp32 per-tile partials. L2: ``z1`` once (a program's
    register tile), ``dy2`` once per fc1 block (a program's chunks re-read its tile from L1, as in
    :func:`mlp_forward`), ``w2a`` and ``w1b`` once per token tile (each ``w2a`` chunk serves both its dots).
    The activation's derivative is fused (no elementwise pass of its own)."""
    sh1, sh2, T, item = fc1.shape, fc2.shape, fc1.tokens, ITEMSIZE[dtype]
    t, S = _plan.MLP_BWD_TILE, sh2.p // sh1.l
    tiles, bs = _plan.cdiv(T, t.block_m), _plan.mlp_block_s(S, t)
    pad_k = lambda n: _plan.cdiv(n, t.block_k) * t.block_k
    flops = 2.0 * tiles * sh1.l * sh2.k * _plan.cdiv(S, bs) * t.block_m * bs * (2 * pad_k(sh1.r) + pad_k(sh2.q))
    useful = 2.0 * T * (sh2.k * sh2.q * sh2.p + sh1.l * sh1.s * sh1.r)
    z1 = dz1 = sectors(T * item, sh1.n_mid)
    dy2, hid = sectors(T * item, sh2.n_mid), sectors(T * item, fc1.n_out)
    w2a, w1b = sh1.l * sh1.s * sh1.r * item, sh2.k * sh2.q * sh2.p * item
    partials = tiles * fc1.n_out * 4 if fc1.bias else 0
    hbm = z1 + dy2 + 2 * hid + dz1 + w2a + w1b + partials
    l2 = z1 + sh1.l * dy2 + 2 * hid + dz1 + tiles * (w2a + w1b) + partials
    return Kernel("hidden layer backward (pre-activation again, da, act', dz1)", flops, useful, hbm, l2,
                  _tc_rate(dev, t, dtype), dev.mem_eff)


def mlp_training_step(fc1: Problem, fc2: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> Cost:
    """:func:`monarch_kernels.monarch_mlp` in an eager training call (``ops._MonarchMLPEager``):
    :func:`mlp_forward` (fc1's ``z1`` and fc2's ``z2`` kept: it writes them anyway), then
    :func:`.triton.mlp.mlp_backward`: fc2's ``dy2`` and ``dw2`` from ``g`` (:func:`g_readers`' pick), the hidden
    layer's backward (:func:`mlp_hidden_backward`), fc2's ``dw1`` and fc1's ``dw2`` as cuBLAS batched GEMMs on
    what it stored, fc1's ``dx`` and ``dw1`` (:func:`dxw_choice`' pick); the layers' bias gradients (fc2's by
    :func:`bias_grad`, on the copy of ``g`` where there is one; fc1's from the hidden kernel's per-tile
    partials)."""
    sh1, sh2, T, item = fc1.shape, fc2.shape, fc1.tokens, ITEMSIZE[dtype]
    if not _plan.mlp_fusable(sh1, sh2, fc1.n_in, fc1.n_out, item, training=True):
        raise ValueError(f"mlp_training_step: the fused MLP backward does not take {fc1.label} then {fc2.label} "
                         f"({dtype})")
    out2 = replace(fc2, activation="none")
    how = g_readers(out2, dtype, dev)
    cost = mlp_forward(fc1, fc2, dtype, dev) + _g_readers(out2, dtype, dev, how)
    cost = cost + Cost([mlp_hidden_backward(fc1, fc2, dtype, dev),
                        _bmm("fc2 dw1 = dy2T a (cuBLAS)", sh2.k, sh2.q, sh2.p, T, dtype, dev),
                        _bmm("fc1 dw2 = (P2T dpre)T z1 (cuBLAS)", sh1.l, sh1.s, sh1.r, T, dtype, dev)])
    cost = cost + _DXW[dxw_choice(fc1, dtype, dev)](fc1, dtype, dev)
    cost = cost + bias_grad("fc2", fc2, dtype, dev, copied=how != "grouped")
    if fc1.bias:
        tiles = _plan.cdiv(T, _plan.MLP_BWD_TILE.block_m)
        cost = cost + Cost([_elementwise("fc1 bias gradient (partials summed)", [tiles * fc1.n_out * 4],
                                         [fc1.n_out * item], dev)])
    return cost


def _fused_forward(problem: Problem, dtype: str, dev: Device, keep: bool = False) -> Cost:
    """The fused square kernel: ``x`` read ``l / group`` times (from L2 after the first), the output through the
    P2 store; ``keep``: the stage-1 intermediate is stored too (token-major runs of the row tile)."""
    sh, T, item = problem.shape, problem.tokens, ITEMSIZE[dtype]
    t = _plan.fused_tile(T, sh.k, sh.l)
    groups = sh.l // t.group
    programs = _plan.cdiv(T, t.block_m) * groups
    bp, bs = _plan.pow2(sh.p), _plan.pow2(sh.s)
    flops = 2.0 * programs * t.block_m * (sh.k * bp * t.group + t.group * sh.k * bs)
    x_once = rows_bytes(T, problem.n_in, item)
    out_run = t.group * item if groups > 1 else problem.n_out * item
    out_row = problem.n_out * item
    w_bytes = (sh.k * sh.q * sh.p + sh.l * sh.s * sh.r) * item
    z_kept = sectors(t.block_m * item, _plan.cdiv(T, t.block_m) * sh.n_mid) if keep else 0.0
    hbm = x_once + _tensor_bytes(T, out_row, out_run, True) + w_bytes + z_kept
    l2 = (x_once * groups + _plan.cdiv(T, t.block_m) * w_bytes + _tensor_bytes(T, out_row, out_run, False)
          + z_kept)
    rate = dev.triton_flops["fma" if dtype == "float32" else "mma"]  # 4 warps, ≤ 64 rows: mma.sync (audit)
    return Cost([Kernel("fused square forward", flops, problem.useful_fwd_flops(), hbm, l2, rate,
                        dev.mem_eff * dev.fused_eff)])


def _dxw_fused(problem: Problem, dtype: str, dev: Device) -> Cost:
    """The fused ``dx``/``dw1`` kernel of :func:`.triton.monarch.backward` (one read of ``dy`` for both) and the
    host's sum of its fp32 split-T partials."""
    sh, T, item = problem.shape, problem.tokens, ITEMSIZE[dtype]
    lp = _plan.dxw_launch(T, sh.k, sh.q, sh.p, dev.num_sms)
    t = lp.tile
    t_pad = lp.splits * _plan.cdiv(lp.rows_per_split, t.block_m) * t.block_m
    flops = 2.0 * 2 * lp.tiles * t.block_k * t.block_n * t_pad
    dy_once, x_once = rows_bytes(T, sh.n_mid, item), rows_bytes(T, problem.n_in, item)
    partial = lp.splits * sh.k * sh.q * sh.p * 4
    tiles_p = _plan.cdiv(sh.p, t.block_n)
    dxw = Kernel("dx & dw1 (shared dy)", flops, 2 * 2.0 * T * sh.k * sh.q * sh.p,
                 dy_once + 2 * x_once + partial, dy_once * tiles_p + 2 * x_once + partial, _tc_rate(dev, t, dtype),
                 dev.mem_eff)
    red = _elementwise("dw1 partial sum", [partial], [sh.k * sh.q * sh.p * (4 + item)], dev)
    return Cost([dxw, red])


def _dxw_separate(problem: Problem, dtype: str, dev: Device) -> Cost:
    """``dx = BD(w1)ᵀ dy`` (block-diagonal kernel, token-major ``dy``) and ``dw1`` (weight-gradient kernel),
    each with its own tiles: ``dy`` is read twice, but neither product is held to the other's tile."""
    sh, T = problem.shape, problem.tokens
    dx = bd_cost("dx = BD(w1)T dy", T, sh.k, sh.p, sh.q, dtype, dev, n_out=problem.n_in, x_token_major=True)
    return Cost([dx]) + wgrad_cost("dw1", T, sh.k, sh.q, sh.p, dtype, dev, n_x=problem.n_in)


def _dxw_bmm(problem: Problem, dtype: str, dev: Device) -> Cost:
    """``dx`` and ``dw1`` as two cuBLAS batched GEMMs (``torch.bmm``) on strided views of the token-major ``dy``,
    the weights and ``x``/``dx`` (every operand has a unit stride in one matrix dimension: no copies)."""
    sh, T = problem.shape, problem.tokens
    return Cost([_bmm("dx = BD(w1)T dy (cuBLAS)", sh.k, T, sh.p, sh.q, dtype, dev),
                 _bmm("dw1 (cuBLAS)", sh.k, sh.q, sh.p, T, dtype, dev)])


#: how :func:`.triton.monarch.backward` computes ``dx`` and ``dw1`` from ``dy``
DXW = ("fused", "separate", "bmm")
_DXW = {"fused": _dxw_fused, "separate": _dxw_separate, "bmm": _dxw_bmm}


def bmm_applies(problem: Problem, side: str) -> bool:
    """Whether the cuBLAS views exist: ``side="g"`` (``dy`` and ``dw2`` read ``g``) needs ``n_out = l·s``,
    ``side="x"`` (``dx`` and ``dw1``) needs ``n_in = k·p`` (a ragged width is not a whole number of blocks)."""
    sh = problem.shape
    return problem.n_out == sh.l * sh.s if side == "g" else problem.n_in == sh.k * sh.p


def dxw_choice(problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> str:
    """How :func:`.triton.monarch.backward` computes ``dx`` and ``dw1`` (:data:`DXW`), the fastest predicted: one
    Triton kernel for both (one read of ``dy``; it holds the whole padded ``q`` contraction next to an fp32
    ``dw1`` tile, so wide ``q`` leaves it narrow p-tiles that re-read ``dy``, e.g. GPT-2's fc2, ``q = 192``
    padded to 256: 16-wide p-tiles, ``dy`` read 48 times), the block-diagonal and weight-gradient kernels, or
    two cuBLAS batched GEMMs (each operand read once; they win where the Triton tiles are narrow). Ties go to
    the first."""
    options = [d for d in DXW if d != "bmm" or bmm_applies(problem, "x")]
    return min(options, key=lambda d: _DXW[d](problem, dtype, dev).time(dev))


def _dy(problem: Problem, dtype: str, dev: Device, g_token_major: bool = False) -> Kernel:
    sh, T = problem.shape, problem.tokens
    return bd_cost("dy = P1T BD(w2)T P2T g", T, sh.l, sh.r, sh.s, dtype, dev, in_perm=(sh.s, sh.l),
                   out_perm=(sh.r, sh.l), n_in=problem.n_out, x_token_major=g_token_major, y_token_major=True)


def _token_major_copy(name: str, tokens: int, n: int, dtype: str, dev: Device) -> Kernel:
    """:func:`.token_major.to_token_major`: one read of the row-major tensor, one write of the token-major copy
    (16-byte vectors on both sides, kernel audit)."""
    item = ITEMSIZE[dtype]
    moved = rows_bytes(tokens, n, item) + sectors(tokens * item, n)
    return Kernel(name, 0.0, 0.0, moved, moved, 1e30, dev.mem_eff)


#: how ``dy`` and ``dw2`` read ``g`` through P2ᵀ: grouped gathers of the row-major ``g``, plain Triton tiles on a
#: token-major copy, or cuBLAS batched GEMMs on strided views of that copy
G_READERS = ("grouped", "token_major", "bmm")


def _g_readers(problem: Problem, dtype: str, dev: Device, how: str, arrives_token_major: bool = False) -> Cost:
    """The backward's two readers of ``g`` through P2ᵀ, ``dy`` and ``dw2``, as :data:`G_READERS` says;
    ``arrives_token_major``: ``g`` is written token-major by the pass that makes it (an activation's
    derivative, :func:`.triton.token_major.activation_grad_token_major`), so no copy."""
    sh, T = problem.shape, problem.tokens
    copy = ([] if how == "grouped" or arrives_token_major
            else [_token_major_copy("g -> token-major", T, problem.n_out, dtype, dev)])
    if how == "bmm":
        return Cost(copy + [_bmm("dy = P1T BD(w2)T P2T g (cuBLAS)", sh.l, T, sh.r, sh.s, dtype, dev),
                            _bmm("dw2 = (P2T g)T z (cuBLAS)", sh.l, sh.s, sh.r, T, dtype, dev)])
    dw2 = wgrad_cost("dw2 = (P2T g)T z", T, sh.l, sh.s, sh.r, dtype, dev, g_perm=(sh.s, sh.l), n_g=problem.n_out,
                     g_token_major=how == "token_major")
    return Cost(copy + [_dy(problem, dtype, dev, how == "token_major")]) + dw2


def g_readers(problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM,
              arrives_token_major: bool = False) -> str:
    """How :func:`.triton.monarch.backward` (and ``backward_weight``) read ``g`` (:data:`G_READERS`), the fastest
    predicted. The copy pays where the groups' interleaved fp32 accumulators cap the grouped tiles (GPT-2's fc1:
    4 blocks of 768 × 192, 32 × 32 tiles), and on the copy cuBLAS reads each operand once where the Triton
    tiles re-read them from L2; square Monarch shapes keep the 16-byte grouped gathers, cheaper than a copy of
    ``g``. Each option pays the layer's bias gradient where it would be computed (:func:`bias_grad`: nearly
    free on a copy, one read of ``g`` without one), and ``arrives_token_major`` (``g`` written token-major by
    an activation's derivative, :func:`_g_readers`) makes the copy free: :func:`.triton.monarch.backward_epilogue`
    asks with both and hands its pick on. Ties go to the first."""
    options = [h for h in G_READERS if h != "bmm" or bmm_applies(problem, "g")]
    return min(options, key=lambda h: (_g_readers(problem, dtype, dev, h, arrives_token_major)
                                       + bias_grad("layer", problem, dtype, dev, copied=h != "grouped")).time(dev))


def _z(problem: Problem, dtype: str, dev: Device) -> Kernel:
    sh, T = problem.shape, problem.tokens
    return bd_cost("z = P1 BD(w1) x (recomputed)", T, sh.k, sh.q, sh.p, dtype, dev, out_perm=(sh.l, sh.r),
                   n_in=problem.n_in, y_token_major=True)


def _pre_activation(problem: Problem, dtype: str, dev: Device) -> Kernel:
    """Stage 2 of a token-major ``z`` without the epilogue: the pre-activation an activation's derivative needs
    (:func:`.triton.monarch.backward_epilogue`)."""
    sh, T = problem.shape, problem.tokens
    return bd_cost("pre-activation = P2 BD(w2) z + bias", T, sh.l, sh.s, sh.r, dtype, dev, out_perm=(sh.s, sh.l),
                   n_out=problem.n_out, x_token_major=True)


def _backward(problem: Problem, dtype: str, dev: Device, z_saved: bool = False, after_activation: bool = False) -> Cost:
    """:func:`.monarch.backward_epilogue`: dy and dw2 as :func:`g_readers` picks, dx & dw1 as :func:`dxw_choice`
    picks, z recomputed unless ``z_saved``; ``after_activation``: ``g`` comes from an activation's derivative,
    whose pass writes it token-major when the readers want that; a bias gradient summed by the pass that copies
    ``g`` where there is one (:func:`bias_grad`)."""
    dxw = _DXW[dxw_choice(problem, dtype, dev)](problem, dtype, dev)
    z = Cost() if z_saved else Cost([_z(problem, dtype, dev)])
    how = g_readers(problem, dtype, dev, after_activation)
    return (_g_readers(problem, dtype, dev, how, after_activation) + dxw + z
            + bias_grad("layer", problem, dtype, dev, copied=how != "grouped"))


def _bwd_input(problem: Problem, dtype: str, dev: Device) -> Cost:
    sh, T = problem.shape, problem.tokens
    dx = bd_cost("dx = BD(w1)T dy", T, sh.k, sh.p, sh.q, dtype, dev, n_out=problem.n_in, x_token_major=True)
    return Cost([_dy(problem, dtype, dev), dx])


def _bwd_weight(problem: Problem, dtype: str, dev: Device) -> Cost:
    sh, T = problem.shape, problem.tokens
    how = g_readers(problem, dtype, dev)
    return (_g_readers(problem, dtype, dev, how) + wgrad_cost("dw1", T, sh.k, sh.q, sh.p, dtype, dev, n_x=problem.n_in)
            + Cost([_z(problem, dtype, dev)]) + bias_grad("layer", problem, dtype, dev, copied=how != "grouped"))


def training_step(problem: Problem, dtype: str, dev: Device, forward: Callable[..., Cost],
                   keeps_pre: bool) -> Cost:
    """An eager training call (:class:`monarch_kernels.ops._MonarchFwdEager`): the forward keeping ``z``
    (:func:`.triton.monarch.forward_saving`) and, where the path can (``keeps_pre``: two-kernel), an
    activation's pre-activation; then the first-order backward (:func:`.triton.monarch.backward_epilogue`): the
    pre-activation as stage 2 of ``z`` when not kept, and dx, dw1, dw2 on that ``z``. The activation's
    derivative itself (an elementwise pass) is left to the caller, as for dense and the reference; where the
    backward reads ``g`` token-major that pass writes it so, and the copy of ``g`` is not charged."""
    act = problem.activation != "none"
    pre = Cost([_pre_activation(problem, dtype, dev)]) if act and not keeps_pre else Cost()
    return forward(problem, dtype, dev, keep=True) + pre + _backward(problem, dtype, dev, True, act)


def _triton(forward: Callable[..., Cost], keeps_pre: bool) -> Estimator:
    def est(op: str, problem: Problem, dtype: str, dev: Device) -> Cost:
        if op == "fwd":
            return forward(problem, dtype, dev)
        if op == "bwd":
            return _backward(problem, dtype, dev)
        if op == "fwdbwd":
            return training_step(problem, dtype, dev, forward, keeps_pre)
        if op == "bwd_input":
            return _bwd_input(problem, dtype, dev)
        return _bwd_weight(problem, dtype, dev)

    return est


register_estimator("triton", "two_kernel", _triton(_two_kernel_forward, keeps_pre=True))
register_estimator("triton", "fused", _triton(_fused_forward, keeps_pre=False))


def blockdiag_cost(backend: str, tokens: int, k: int, q: int, p: int, dtype: str = "bfloat16",
                   dev: Device = H100_SXM, training: bool = False, bias: bool = False) -> Optional[Cost]:
    """A block-diagonal forward ``(T, k·p) -> (T, k·q)`` and, with ``training``, its backward (``dx = BD(w)ᵀ g``
    and ``dw``, as :mod:`monarch_kernels.ops` runs them, and with ``bias`` its gradient ``g.sum(0)``): the Triton
    grouped kernel, the same kernel on the transposed weights and the weight-gradient kernel; or the torch
    reference, one ``bmm`` per product writing natural order through a transposed ``out=`` view (no copy at full
    width). ``None`` for a backend without a model."""
    if backend not in ("triton", "torch"):
        return None
    if backend == "triton":
        cost = Cost([bd_cost("blockdiag", tokens, k, q, p, dtype, dev)])
        if training:
            cost = (cost + Cost([bd_cost("blockdiag dx", tokens, k, p, q, dtype, dev)])
                    + wgrad_cost("blockdiag dw", tokens, k, q, p, dtype, dev))
    else:
        cost = Cost([_bmm("ref bmm", k, tokens, q, p, dtype, dev)])
        if training:
            cost = cost + Cost([_bmm("ref dx bmm", k, tokens, p, q, dtype, dev),
                                _bmm("ref dw bmm", k, q, p, tokens, dtype, dev)])
    if training and bias:
        cost = cost + Cost([_bias_grad("blockdiag", tokens, k * q, dtype, dev)])
    return cost


def blockdiag_seconds(backend: str, tokens: int, k: int, q: int, p: int, dtype: str = "bfloat16",
                      dev: Device = H100_SXM, training: bool = False, bias: bool = False) -> float:
    """:func:`blockdiag_cost`'s predicted time; ``inf`` for a backend without a model."""
    cost = blockdiag_cost(backend, tokens, k, q, p, dtype, dev, training, bias)
    return math.inf if cost is None else cost.time(dev)


def triton_path(problem: Problem, dtype: str = "bfloat16", dev: Device = H100_SXM) -> str:
    """The forward path ``auto`` takes (:func:`.triton.monarch.choose_path`): the fused square kernel where it
    applies and is predicted faster than the two-kernel path (it is latency-bound: :attr:`Device.fused_eff`),
    else the two-kernel path."""
    sh = problem.shape
    if _plan.choose_path(sh.k, sh.q, sh.p, sh.l, sh.s, sh.r) != "fused":
        return "two_kernel"
    return min(("fused", "two_kernel"), key=lambda p: estimate("triton", p, "fwd", problem, dtype, dev).time(dev))
