"""Launch plans of the Triton kernels: tiles, block groups, warps, pipeline depth, token chunks, path choice.

Pure arithmetic (no ``triton`` import), so that :mod:`monarch_kernels.cost_model` prices exactly the launches
the host code in :mod:`.blockdiag` and :mod:`.monarch` makes. Tile configurations are chosen here by shape,
once; nothing is autotuned per call.

Coalescing rule. A Monarch permutation is a view-transpose: logical feature ``f = u·A + v`` (``v < A``) lives at
physical column ``v·B + u``. A block of ``C·A`` consecutive logical features therefore occupies ``A`` runs of
``C`` physically consecutive columns, and ``G`` consecutive blocks occupy runs of ``G·C``. A program that covers
``G`` consecutive blocks, with ``G·C·itemsize ≥ 16`` bytes, can move every permuted element with 16-byte
vector accesses (:func:`group_size`).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

#: contiguous bytes per permuted run: one 16-byte vector per thread (32-byte runs would fill whole sectors, but
#: the twice larger group halves the row tile that fits in registers and doubles the weight re-reads)
RUN_BYTES = 16
#: share of the L2 a chunked two-kernel forward may fill with its intermediate (both chunks' when paired)
L2_SHARE = 0.4
#: two-kernel forward: run stage 1 of each token chunk in one launch with stage 2 of the previous chunk
#: (:func:`.blockdiag.bd_forward_pair`), so that HBM-bound and L2-bound programs share the GPU
PAIR_STAGES = True
#: two-kernel forward: cut the tokens into chunks whose intermediate stays in L2 between the stages
#: (:func:`forward_chunk`). Off: measured on an H200 (2026-11-30, 16384 x 4096/64 bf16) the unchunked forward's
#: two launches took 337 µs of device time, the chained chunks 631 µs and the paired chunks as separate launches
#: 505 µs; the intermediate's HBM round trip is not what bounds the forward (its second stage's store is)
CHUNK_IN_L2 = False
#: paired two-kernel forward over several chunks: the whole schedule as one launch whose programs wait on
#: per-chunk counters (:func:`.blockdiag.bd_forward_chain`) instead of ``chunks + 1`` launches
ONE_LAUNCH = True
#: Register budgets of one program (8 warps), from the kernel audit (triton 3.6 and 3.9, sm_90): interleaved
#: bf16 result tiles plus twice the fp32 accumulator of the block being computed may take ``LIVE_BYTES``
#: (8 blocks x 64 x 64: 64 + 32 KB, 183 registers; 4 x 64 x 128: 64 + 64 KB spilled), a third less with an
#: activation epilogue (4 x 128 x 64 with GELU spilled 56 B at 255 registers) or a gathered input (a 16-bit
#: one with a token-major output takes the full budget: 8 x 64 x 64, 200 registers; fp32 4 x 64 x 64 spilled
#: 424 B); one fp32 dot accumulator ``DOT_BYTES`` (128 x 128 fp32 spilled next to its operand tiles);
#: interleaved fp32 accumulators that persist across a loop ``ACC_BYTES`` (32 KB spilled), twice that for
#: the weight-gradient kernel's 16-row q-tiles at 8 warps (:func:`wgrad_tile`). 16 warps do not help: they
#: cap a thread at 128 registers.
LIVE_BYTES = 96 * 1024
DOT_BYTES = 32 * 1024
ACC_BYTES = 16 * 1024
#: a 16-bit program with one block (no interleaved results, one K loop) of whole 16-byte vectors may hold a
#: 128 x 128 fp32 accumulator: 110-231 registers, 0 spills (kernel audit, triton 3.9 and 3.6)
SINGLE_DOT_BYTES = 64 * 1024


def memo(fn):
    """Memoise a launch plan by its arguments and the module's current settings (:data:`_SETTINGS`: the budgets and
    flags and the tile functions, so that a test or benchmark that patches one gets fresh plans). Plans are pure
    arithmetic, but at 10-15 µs each they were a measurable part of a call's host time (H200, 2026-11-30: ~300 µs of
    host time per Triton forward). The host modules memoise what they derive from a plan (argument tuples,
    compile-time arguments) the same way, so that a patched setting reaches them too."""
    cache: dict = {}
    settings = operator.itemgetter(*_SETTINGS)
    scope = globals()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())) if kwargs else (), settings(scope))
        try:
            return cache[key]
        except KeyError:
            pass
        if len(cache) > 4096:
            cache.clear()
        cache[key] = result = fn(*args, **kwargs)
        return result

    wrapper.cache_clear = cache.clear
    return wrapper


#: what a memoised plan depends on besides its arguments (:func:`memo`)
_SETTINGS = ("RUN_BYTES", "L2_SHARE", "PAIR_STAGES", "ONE_LAUNCH", "CHUNK_IN_L2", "LIVE_BYTES", "DOT_BYTES",
             "ACC_BYTES", "SINGLE_DOT_BYTES", "bd_tile", "wgrad_tile", "dxw_tile", "COPY_TILE", "FUSED_ELEMS",
             "FUSED_GROUP", "FUSED_MIN_ROWS", "fused_tile")


@dataclass(frozen=True)
class DeviceInfo:
    """What the plans size themselves for: SM count (grid filling) and L2 capacity (token chunks)."""

    num_sms: int = 132
    l2_bytes: int = 50 * 2**20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ max(n, lo) (tile sizes are powers of two; GPU dots need ≥ 16)."""
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def group_size(nblocks: int, run: int, itemsize: int) -> int:
    """Blocks per program so that a permuted run moves ``RUN_BYTES`` contiguous bytes.

    ``run`` is how many consecutive columns one block owns per permuted run (``C`` above). The group is the
    smallest power of two ``G`` with ``G·run·itemsize ≥ RUN_BYTES``, but never more than the blocks there are
    (rounded up to a power of two; with all blocks in one program whole rows are contiguous).
    """
    need = max(1, cdiv(RUN_BYTES, run * itemsize))
    return min(pow2(need, 1), pow2(nblocks, 1))


@dataclass(frozen=True)
class Tile:
    """One launch configuration: ``block_*`` tile sides, ``group`` blocks per program, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    group: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP=self.group,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def side(n: int, cap: int) -> int:
    """Tile side for a dimension of ``n``: the largest power of two in ``[16, cap]`` whose padding stays within
    1/8 of the least padding possible, e.g. 192 -> 64 (three exact tiles) rather than 128 (a third wasted)."""
    sides = [1 << i for i in range(4, cap.bit_length())]
    least = min(cdiv(n, b) * b for b in sides)
    return max(b for b in sides if cdiv(n, b) * b * 8 <= least * 9)


def _rows(tokens: int, limit: int) -> int:
    """Row tile: ``limit`` (≤ 128) but no larger than the token count needs (≥ 16 for tensor-core dots)."""
    return max(16, min(limit, pow2(tokens)))


def _warps(elems: int, block_m: int = 64) -> int:
    """8 warps for large tiles; 4 for small ones and for row tiles under 64 (a warpgroup MMA needs 64 rows;
    8 warps on a 16-row tile left an 8-byte stack frame, kernel audit)."""
    return 8 if elems >= 8192 and block_m >= 64 else 4


def bd_tile(tokens: int, nblocks: int, n: int, k: int, itemsize: int, group: int, acc_fp32: bool,
            tight: bool = False, save_pre: bool = False) -> Tile:
    """Tile of the grouped block-diagonal kernel (:func:`.blockdiag.bd_forward`).

    ``n``/``k``: output/contraction size of one block. The ``group`` result tiles live together in
    registers until the permuted store (fp32 accumulators when a gathered input spans several K steps, else
    the output dtype), so the row tile shrinks as ``group · block_n`` grows; ``tight`` (an activation
    epilogue, or a gathered input unless it is 16-bit with a token-major output) takes a third off the budget.
    ``save_pre`` (an activation applied after the pre-activation is stored, :func:`.blockdiag.bd_forward`'s
    ``pre``): at unaligned widths (blocks not whole 16-byte vectors, accessed element by element) the group's
    pre-activation tile and its fp32 activation are live together, ``group·block_m·block_n·(itemsize + 4)``
    bytes within the budget, 8 warps from 32 rows (4 x 64 x 64 bf16 spilled 48 B at 255 registers on triton
    3.6; aligned widths compile without spills at the plain budget).
    """
    block_k = side(k, 64)
    # one block per program (16-bit, blocks of whole 16-byte vectors: unaligned ones load element by element
    # and need the registers, 56 B spilled at 128 x 128 for 250/750-wide blocks)
    vectors = n % (16 // itemsize) == 0 and k % (16 // itemsize) == 0
    single = group == 1 and not acc_fp32 and itemsize == 2 and vectors
    epilogue = save_pre and group > 1 and not vectors

    def fits(block_m: int, block_n: int) -> bool:
        acc = block_m * block_n * 4
        if single:
            return acc <= SINGLE_DOT_BYTES
        if acc > DOT_BYTES:
            return False
        if acc_fp32:
            return group * acc <= ACC_BYTES
        budget = LIVE_BYTES * 2 // 3 if tight and group > 1 else LIVE_BYTES
        if epilogue and group * block_m * block_n * (itemsize + 4) > budget:
            return False
        return group * block_m * block_n * itemsize + 2 * acc <= budget

    def rows_for(block_n: int) -> int:
        block_m = 128
        while block_m > 16 and not fits(block_m, block_n):
            block_m //= 2
        return block_m

    # L2 traffic per token ∝ input re-reads (one per N tile) + weight re-reads (one per row tile): n / block_m;
    # on a tie the taller tile (a warpgroup MMA takes 64 rows; 32 x 64 with 8 blocks spilled at 4 warps). One
    # block per program may pad its columns by up to a third where that saves re-reads (192 -> two 128-wide
    # tiles: the input read twice, not three times; the kernels stay memory-bound at these widths)
    widest = side(n, 128)
    options = {b for b in (widest, widest // 2, widest // 4) if b >= 16}
    if single:
        options |= {b for b in (16, 32, 64, 128) if cdiv(n, b) * b * 3 <= n * 4}
    block_n = min(options, key=lambda b: (cdiv(n, b) + n / rows_for(b), -rows_for(b), -b))
    block_m = _rows(tokens, rows_for(block_n))
    if block_m < 32 and group > 1:  # few tokens: 16 rows x 64 x 8 interleaved blocks spilled 16 B (kernel audit)
        block_n = min(block_n, 32)
    if acc_fp32:  # a gathered tile per K step sits beside the accumulators: half the step
        block_k = side(k, 32)
    # pipeline depth: a single K step has nothing to overlap, extra stages only take shared memory (occupancy):
    # measured on an H200, 65536 x 4096/64 plain tiles, 2 stages 285 µs, 3 stages 329, 4 stages 409
    stages = 2 if cdiv(k, block_k) == 1 else 3
    warps = _warps(group * block_m * block_n, block_m)
    if epilogue and block_m >= 32 and group * block_m * block_n >= 8192:
        warps = 8  # 4 x 32 x 64 bf16 spilled 40 B at 4 warps on triton 3.6, none at 8 (224 registers; 32 x 64 x 8
        # without the saved pre-activation left an 8-byte stack frame at 8 warps there)
    return Tile(block_m, block_n, block_k, group, warps, stages)


def wgrad_tile(nblocks: int, q: int, p: int, group: int) -> Tile:
    """Tile of the grouped weight-gradient kernel: ``(block_m = q-tile, block_n = p-tile, block_k = token
    chunk)``; ``group`` fp32 accumulators of ``block_m × block_n`` stay live across the token loop (a plain dot
    accumulator within ``DOT_BYTES``, interleaved groups within ``ACC_BYTES``).

    Every program reads its ``block_m`` gradient columns and ``block_n`` input columns of every token, so the
    L2 traffic per token is ``(q-tiles · p-tiles) · (block_m + block_n)`` (padding included): among the tiles
    within the budget the one that minimises it, on a tie the wider p-tile. For 4 interleaved blocks of
    768 × 192 (GPT-2's fc1 ``dw2``) that is 32 × 32, not 16 × 64 (20% less traffic)."""
    budget = DOT_BYTES if group == 1 else ACC_BYTES
    sides_of = lambda n: [1 << i for i in range(4, side(n, 128).bit_length())]

    def fits(m: int, n: int) -> bool:
        # a 16-row q-tile keeps the gathered token tile (token step x 16·group) small: twice the interleaved
        # budget at 8 warps (8 blocks x 16 x 64: 196 registers on triton 3.9, 204 on 3.6; 8 x 32 x 32 spilled
        # 216 B, 8 x 16 x 64 at 4 warps 128 B)
        acc = group * m * n * 4
        return acc <= budget or (group > 1 and m == 16 and acc <= 2 * ACC_BYTES)

    block_m, block_n = min(((m, n) for m in sides_of(q) for n in sides_of(p) if fits(m, n)),
                           key=lambda mn: (cdiv(q, mn[0]) * cdiv(p, mn[1]) * (mn[0] + mn[1]), -mn[1]))
    # interleaved groups also hold a gathered token tile and one input tile per block: half the token step
    # (the widest tiles, 8192 accumulators, get the 8 warps they need)
    return Tile(block_m, block_n, 64 if group == 1 else 32, group, _warps(group * block_m * block_n), 3)


def dxw_tile(q: int, p: int) -> Tile:
    """Tile of the fused ``dx``/``dw1`` kernel: a program owns block ``kk``'s ``p``-tile, the whole ``q``
    (the dx contraction) and a token range; ``block_m`` = token tile, ``block_n`` = p-tile, ``block_k`` =
    padded ``q``; the fp32 ``dw1`` tile ``block_k × block_n`` stays live."""
    block_k = pow2(q)
    block_n = side(p, 64)
    while block_n > 16 and block_k * block_n * 4 > DOT_BYTES // 2:  # the W1 tile and dy tile sit beside it
        block_n //= 2
    block_m = 64 if block_k <= 128 else 32  # the (token × q) dy tile: 256-wide q spilled at 64 rows
    return Tile(block_m, block_n, block_k, 1, _warps(block_k * block_n), 3)


def split_count(rows: int, tiles: int, num_sms: int, min_rows: int = 256) -> int:
    """Token splits of a weight-gradient reduction: about 4 programs per SM in all, never fewer than
    ``min_rows`` tokens per split."""
    want = max(1, (4 * num_sms) // max(tiles, 1))
    return max(1, min(want, cdiv(max(rows, 1), min_rows)))


# ------------------------------------------------------------------------------------------ block-diagonal launches

NATURAL, GROUPED, SCATTERED = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """Where an operand's logical block columns live: ``mode`` (NATURAL / GROUPED / SCATTERED, see
    :mod:`.blockdiag`), the view-transpose ``(a, b)``, the run length ``c`` and the blocks per program."""

    mode: int = NATURAL
    a: int = 1
    b: int = 1
    c: int = 1
    group: int = 1


def layout(perm, nblocks: int, block: int, itemsize: int, gather: bool, token_major: bool = False) -> Layout:
    """Layout of blocks of width ``block`` read (``gather``) or written through the view-transpose ``perm``.

    ``token_major``: the tensor's token stride is 1 (a transposed buffer, e.g. the two-kernel intermediate):
    every column is a run of the row tile's tokens, so the permuted access is coalesced along the tokens
    whatever the column order and no block group is needed (group 1)."""
    if perm is None:
        return Layout()
    a, b = perm
    if block % a == 0 and (not gather or block == a):
        c = block // a
        if grouped_ok(nblocks, c):  # runs of a non-power-of-two C ≥ 8 are ≥ 16 bytes already: one block each
            group = 1 if token_major or not is_pow2(c) else group_size(nblocks, c, itemsize)
            return Layout(GROUPED, a, b, c, group)
    return Layout(SCATTERED, a, b, 1, 1)


@dataclass(frozen=True)
class BDLaunch:
    """Everything :func:`.blockdiag.bd_forward` launches for ``x (T, ·)``, ``w (k, q, p)``."""

    tile: Tile
    inp: Layout
    out: Layout
    grid: tuple
    in_full: bool  # gathered input group covers every block: whole contiguous row segments
    out_full: bool  # grouped output covers every block (C = 1): whole contiguous row segments
    multi_k: bool  # gathered input over several K steps: fp32 accumulators until the end


@memo
def bd_launch(tokens: int, k: int, q: int, p: int, itemsize: int, in_perm=None, out_perm=None,
              activation: bool = False, in_token_major: bool = False, out_token_major: bool = False,
              save_pre: bool = False) -> BDLaunch:
    """``*_token_major``: the input / output tensor has token stride 1 (see :func:`layout`); ``save_pre``: the
    pre-activation is stored too (:func:`bd_tile`)."""
    inp = layout(in_perm, k, p, itemsize, gather=True, token_major=in_token_major)
    out = layout(out_perm, k, q, itemsize, gather=False, token_major=out_token_major)
    group = max(inp.group, out.group)
    if inp.mode == GROUPED and group > 1 and out.mode == SCATTERED:
        inp = Layout(SCATTERED, inp.a, inp.b, 1, 1)
        group = 1
    assert k % group == 0 or group == 1, "groups > 1 exist only for power-of-two block counts"
    inp = Layout(inp.mode, inp.a, inp.b, inp.c, group)
    out = Layout(out.mode, out.a, out.b, out.c, group)
    tile = bd_tile(tokens, k, q, p, itemsize, group, acc_fp32=inp.mode == GROUPED and pow2(p) > 64,
                   tight=activation or (inp.mode == GROUPED and (itemsize > 2 or (out.mode == GROUPED
                                                                         and not out_token_major))),
                   save_pre=save_pre and activation)
    # groups (and N tiles) vary fastest: programs whose runs share 32-byte sectors run side by side
    grid = (cdiv(k, group) * cdiv(q, tile.block_n), cdiv(tokens, tile.block_m))
    return BDLaunch(tile, inp, out, grid,
                    in_full=inp.mode == GROUPED and group == k and inp.b == k,
                    out_full=out.mode == GROUPED and out.c == 1 and group == k and out.b == k,
                    multi_k=inp.mode == GROUPED and p > tile.block_k)


@dataclass(frozen=True)
class WgradLaunch:
    """:func:`.blockdiag.bd_weight_grad`: tile, the gathered operand's layout, grid ``(tiles, splits)``."""

    tile: Tile
    g: Layout
    tiles: int
    splits: int
    rows_per_split: int
    g_full: bool = False  # gathered group covers every block: a tile's rows are whole contiguous segments


def _splits(tokens: int, tiles: int, num_sms: int, step: int) -> tuple[int, int]:
    """``(splits, rows per split)``: rows a multiple of the token step, so splits never overlap and only the
    last one is ragged (and the row count does not change the kernel's integer specialisation)."""
    rows = cdiv(cdiv(max(tokens, 1), split_count(tokens, tiles, num_sms)), step) * step
    return cdiv(max(tokens, 1), rows), rows


@memo
def wgrad_launch(tokens: int, k: int, q: int, p: int, itemsize: int, g_perm, num_sms: int,
                 g_token_major: bool = False) -> WgradLaunch:
    """``g_token_major``: the gradient is stored token-major (runs of tokens, no block group, see :func:`layout`)."""
    g = layout(g_perm, k, q, itemsize, gather=True, token_major=g_token_major)
    tile = wgrad_tile(k, q, p, g.group)
    tiles = cdiv(k, g.group) * cdiv(q, tile.block_m) * cdiv(p, tile.block_n)
    return WgradLaunch(tile, g, tiles, *_splits(tokens, tiles, num_sms, tile.block_k),
                       g_full=g.mode == GROUPED and g.group == k and g.b == k)


@memo
def dxw_launch(tokens: int, k: int, q: int, p: int, num_sms: int) -> WgradLaunch:
    """The fused ``dx``/``dw1`` kernel of :func:`.monarch.backward` (grid ``(k · p-tiles, splits)``)."""
    tile = dxw_tile(q, p)
    tiles = k * cdiv(p, tile.block_n)
    return WgradLaunch(tile, Layout(), tiles, *_splits(tokens, tiles, num_sms, tile.block_m))


#: :func:`.token_major.to_token_major`: 64 tokens x 64 features per program (8 KB of bf16 through shared
#: memory between the row-major load and the token-major store), 4 warps
COPY_TILE = Tile(64, 64, 0, 1, 4, 1)


# ------------------------------------------------------------------------------------------ Monarch paths

PATHS = ("auto", "fused", "two_kernel")
#: largest stage-1 tile (rows x stage-2 group x k elements) the fused square kernel keeps in registers: 8K
#: compiles without spills at 4 warps (kernel audit: 236 registers); 16K spilled
FUSED_ELEMS = 8 * 1024
#: stage-2 blocks per fused program (the stage-1 dots' N; ≥ 16 for tensor cores)
FUSED_GROUP = 16
#: rows per fused program (tensor-core minimum); each program reads its group's weights from L2
FUSED_MIN_ROWS = 16


def pair_tile(first: Tile, second: Tile) -> Tile:
    """Launch options of two grids run as one (:func:`.blockdiag.bd_forward_pair`): the larger warp count
    and pipeline depth (each program keeps its own tile sides)."""
    return Tile(0, 0, 0, 1, max(first.num_warps, second.num_warps), max(first.num_stages, second.num_stages))


def fused_applies(k: int, q: int, p: int, l: int, s: int, r: int) -> bool:
    """The fused square kernel: rank ``c = q / l = 1`` (every stage-1 block sends one value to every stage-2
    block), power-of-two block counts ``k, l ≥ 16`` (tensor-core dot sides), blocks ≤ 128 wide, and a 16-row
    tile of ``FUSED_MIN_ROWS`` rows of the group's intermediate within :data:`FUSED_ELEMS`."""
    return (q == l and r == k and is_pow2(k) and is_pow2(l) and k >= 16 and l >= 16 and max(p, s) <= 128
            and FUSED_MIN_ROWS * min(l, FUSED_GROUP) * k <= FUSED_ELEMS)


def fused_tile(tokens: int, k: int, l: int) -> Tile:
    """Fused square kernel: ``group`` stage-2 blocks per program, as many rows as keep
    ``block_m × group × k ≤ FUSED_ELEMS``; 4 warps."""
    group = min(l, FUSED_GROUP)
    block_m = 64
    while block_m > FUSED_MIN_ROWS and block_m * group * k > FUSED_ELEMS:
        block_m //= 2
    return Tile(_rows(tokens, block_m), 0, 0, group, 4, 2)


def choose_path(k: int, q: int, p: int, l: int, s: int, r: int, path: str = "auto") -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    fused_ok = fused_applies(k, q, p, l, s, r)
    if path == "fused" and not fused_ok:
        raise ValueError(
            f"fused Monarch path needs square rank-1 factors (q == l, r == k, power-of-two block counts ≥ 16, "
            f"16·min(l, {FUSED_GROUP})·k ≤ {FUSED_ELEMS}, blocks ≤ 128), got w1 {(k, q, p)}, w2 {(l, s, r)}")
    if path == "auto":
        return "fused" if fused_ok else "two_kernel"
    return path


def chunk_tokens(tokens: int, n_mid: int, itemsize: int, l2_bytes: int, block_m: int, buffers: int = 1) -> int:
    """Tokens per chunk of the two-kernel forward, so that ``buffers`` chunks' intermediates (``chunk ×
    n_mid`` each: two when stage 1 of one chunk runs beside stage 2 of the previous) fill at most ``L2_SHARE``
    of the L2 and are read back by the second kernel before they are evicted; a multiple of the row tile, at
    least one tile; ``tokens`` itself when everything fits in one chunk."""
    if buffers > 1 and chunk_tokens(tokens, n_mid, itemsize, l2_bytes, block_m) == tokens:
        return tokens
    cap = int(L2_SHARE * l2_bytes) // max(buffers * n_mid * itemsize, 1)
    cap = max(block_m, cap // block_m * block_m)
    return tokens if cap >= tokens else cap


def forward_chunk(tokens: int, n_mid: int, itemsize: int, l2_bytes: int) -> int:
    """Tokens per chunk of the two-kernel forward (``tokens``: one chunk) under :data:`CHUNK_IN_L2` and
    :data:`PAIR_STAGES`."""
    if not CHUNK_IN_L2:
        return tokens
    return chunk_tokens(tokens, n_mid, itemsize, l2_bytes, 128, 2 if PAIR_STAGES else 1)


#: how the two-kernel forward's second stage writes its P2-permuted output: ``"grouped"``, 16-byte runs of 8
#: interleaved blocks stored into the row-major output; ``"token_major"``, a token-major store (P2 then
#: permutes whole runs of tokens: full 32-byte sectors) and one transposing copy into the output. The cost
#: model picks (:func:`monarch_kernels.cost_model.stage2_store`): measured on an H200 the grouped store wasted
#: half of every store sector (ncu) and ran at 1.0-1.4 TB/s, 180 registers and one program per SM
STAGE2_STORES = ("grouped", "token_major")


def stage2_stores(chunk: int, tokens: int, keeps_pre: bool) -> tuple:
    """The :data:`STAGE2_STORES` that apply: the token-major store needs one chunk and no pre-activation kept
    beside the output (that would need its own copy)."""
    return STAGE2_STORES if chunk >= tokens and not keeps_pre else STAGE2_STORES[:1]


def grouped_ok(nblocks: int, run: int) -> bool:
    """Whether the grouped (vector) permutation layout applies: a power-of-two run, or one run already
    ≥ 8 columns (then each block is its own group); power-of-two block counts for groups > 1."""
    return run >= 8 or (is_pow2(run) and is_pow2(nblocks))



#: the fused MLP hidden layer (:mod:`.mlp`): 128 tokens (``block_m``: the weights are read from L2 once per token
#: tile), 32-row chunks of the hidden rows (``block_n``; 16 where there are no more: :func:`mlp_block_s`), 64-deep
#: steps of fc1's ``r1`` (``block_k``), 16 warps, 2 stages; fc2's ``q2`` padded to a power of two is the fp32
#: accumulator, at most ``MLP_MAX_Q`` wide. Compiled
#: offline for sm_90 at the GPT-2 shape (q2 = 192 -> 256; triton 3.9): 128 registers, no spills, ``wgmma``; 64-row
#: chunks spill 136 B at 16 warps, 128 x 256 at 8 warps takes 254 registers, 64-token tiles at 8 warps 218 (but
#: read the weights twice as often)
MLP_TILE = Tile(128, 32, 64, 1, 16, 2)
MLP_MAX_Q = 256
#: its backward (:func:`.mlp.hidden_layer_backward`): the same token tile, 16-row chunks of the hidden rows, fc1's
#: ``r1`` in at most ``MLP_MAX_R_CHUNKS`` column chunks of ``block_k`` (each a ``z1`` register tile and an fp32
#: ``dz1`` accumulator), 8 warps. Compiled offline for sm_90 at the GPT-2 shape (r1 = 192: 3 chunks): 199 registers
#: on triton 3.9, 242 on 3.6 (the GPU machines'), no spills, ``wgmma``, 16-byte activation loads and stores, 8-byte
#: weight loads (a 16-row chunk is too few elements for 16 bytes per thread; coalesced, from L2), 90 KB of shared
#: memory. 32-row chunks: 16-byte weight loads and 233 registers on 3.9, but 255 and 32 B spilled on 3.6; 64-row
#: chunks spill 136 B on 3.9; 16 warps spill 216 B (128 registers); 64-token tiles at 32-row chunks do not spill
#: (207 / 226 registers) but read the weights from L2 twice as often (``bench/gpu_profile.py`` times all three)
MLP_BWD_TILE = Tile(128, 16, 64, 1, 8, 2)
MLP_MAX_R_CHUNKS = 4


def mlp_fusable(sh1, sh2, n_in: int, n_hidden: int, itemsize: int, training: bool = False) -> bool:
    """Whether the fused MLP hidden layer takes fc1 ``sh1`` (input width ``n_in``) followed by fc2 ``sh2`` with
    ``n_hidden`` hidden features (both :class:`monarch_kernels.MonarchShape`): 16-bit, no ragged widths (``n_in =
    k1·p1``, ``n_hidden = l1·s1 = k2·p2``), fc2's blocks made of whole fc1 stage-2 rows (``p2 % l1 == 0``), at
    least 16 of them per fc1 block (``S = p2 / l1 ≥ 16``: a chunk is a dot's contraction; square layers with many
    blocks have ``S = 1`` and would waste most of each chunk) and ``q2 ≤ MLP_MAX_Q``; for ``training`` (its
    backward, :data:`MLP_BWD_TILE`) ``r1`` in at most :data:`MLP_MAX_R_CHUNKS` chunks (256 at 64-wide chunks)."""
    return (itemsize == 2 and n_in == sh1.n_in and n_hidden == sh1.n_out == sh2.n_in and sh2.p % sh1.l == 0
            and sh2.p // sh1.l >= 16 and sh2.q <= MLP_MAX_Q
            and (not training or mlp_r_chunks(sh1.r) <= MLP_MAX_R_CHUNKS))


def mlp_block_s(S: int, tile: Tile = MLP_TILE) -> int:
    """Hidden rows per chunk of the fused MLP kernel ``tile`` (:data:`MLP_TILE`, or :data:`MLP_BWD_TILE` for its
    backward) for ``S`` rows per (fc2 block, fc1 block): 16 up to 16, else the tile's ``block_n``."""
    return 16 if S <= 16 else tile.block_n


def mlp_block_q(q2: int) -> int:
    """The fused MLP kernel's accumulator width for fc2's ``q2``: a power of two ≥ 16."""
    return pow2(q2)


def mlp_r_chunks(r1: int) -> int:
    """The fused MLP backward's column chunks of fc1's ``r1`` (:data:`MLP_BWD_TILE` ``block_k`` wide)."""
    return cdiv(r1, MLP_BWD_TILE.block_k)
