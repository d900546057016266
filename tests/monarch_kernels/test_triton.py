"""Triton backend against the float64 reference, element by element: every path (fused square, grouped
two-kernel, scattered fallback), every permutation layout (grouped runs with C = 1, C = 2 through the in-register
transpose, C ≥ 8, scattered), p = 1 and q = 1 blocks, ragged sizes, bias and activation epilogues, dX, dW and the
fused backward, split weight-gradient reductions with ragged splits, strided inputs, batch 0/1, NaN/±inf inputs,
poisoned outputs.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are small; the interpreter sizes launches for a nominal 4-SM device (``_common.device_info``), so 600
tokens already split every weight-gradient reduction three ways (256, 256 and a ragged 88 rows).
"""
import math

import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import activations
from monarch_kernels import reference as ref

pytest.importorskip("triton")
if mk.available_backends()["triton"] != "available":
    pytest.skip("triton backend unavailable: " + mk.available_backends()["triton"], allow_module_level=True)

from monarch_kernels.triton import _common  # noqa: E402
from monarch_kernels.triton import blockdiag as tbd  # noqa: E402
from monarch_kernels.triton import monarch as tmon  # noqa: E402
from monarch_kernels.triton import plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: per-element tolerance: max |actual − expected| over max |expected|
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element left unwritten fails the comparison."""
    def empty(*shape, device, dtype):
        return torch.full(shape, math.nan, device=device, dtype=dtype)

    monkeypatch.setattr(_common, "empty", empty)


def assert_close(actual, expected, dtype, what=""):
    """Same shape, same NaN/±inf positions, and per element ``|a − e| ≤ tol · max|e|`` on the finite ones."""
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for name, pred in (("nan", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(pred(a), pred(e)), f"{what}: {name} positions differ"
    fin = torch.isfinite(e)
    if fin.any():
        scale = e[fin].abs().max().clamp_min(1e-30)
        err = ((a[fin] - e[fin]).abs().max() / scale).item()
        assert err <= TOL[dtype], f"{what}: max element error {err:.2e} > {TOL[dtype]:.0e}"


def _data(s1, s2, T, dtype, ragged=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = mk.MonarchShape.from_factors(s1, s2)
    n_in = sh.n_in - 1 if ragged and sh.p > 1 else sh.n_in
    n_out = sh.n_out - 1 if ragged and sh.s > 1 else sh.n_out
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return sh, n_in, n_out, rnd(T, n_in), rnd(*s1), rnd(*s2), rnd(n_out), rnd(T, n_out)


def _d(t):
    return None if t is None else t.double()


def _paths(sh):
    return [p for p in ("fused", "two_kernel") if tmon.path_applies(sh, p)]


# (w1, w2) and what each exercises
SHAPES = {
    "fused square, group 16 of 32": ((32, 32, 4), (32, 4, 32)),
    "fused square, group = all 16": ((16, 16, 8), (16, 8, 16)),
    "grouped C=1 runs, ragged p": ((8, 8, 5), (8, 6, 8)),
    "grouped C=2 (in-register transpose)": ((4, 8, 8), (4, 8, 8)),
    "C=12 runs, whole-row P2 (l=4)": ((4, 48, 8), (4, 12, 48)),
    "C=3 scattered P1, non-pow2 blocks": ((5, 15, 7), (5, 6, 15)),
    "q % l != 0 (scattered P1)": ((4, 5, 8), (4, 6, 5)),
    "p = 1 and s = 1 blocks": ((3, 2, 1), (2, 1, 3)),
    "q = 1 and l = 1": ((4, 1, 3), (1, 5, 4)),
    "one block each": ((1, 6, 9), (1, 7, 6)),
    "gathered P2ᵀ over 5 K steps (s = 80)": ((4, 4, 3), (8, 80, 2)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_every_layout_fp32(name):
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 19, torch.float32)
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu")
    for path in _paths(sh):
        assert_close(tmon.forward(x, w1, w2, b, n_out, "gelu", path=path), expect, torch.float32, f"{name} {path}")


#: every backward layout (the kernels do not depend on the forward path: the fused-square shapes would add only
#: time); "q % l != 0" and "one block each" are covered by the dX/dW test below and the forward tests
BACKWARD_SHAPES = ["grouped C=1 runs, ragged p", "grouped C=2 (in-register transpose)", "C=12 runs, whole-row P2 (l=4)",
                   "C=3 scattered P1, non-pow2 blocks", "p = 1 and s = 1 blocks", "q = 1 and l = 1",
                   "gathered P2ᵀ over 5 K steps (s = 80)"]


@pytest.mark.parametrize("dxw", ["fused", "separate"])
@pytest.mark.parametrize("name", BACKWARD_SHAPES)
def test_fused_backward_every_layout_fp32(name, dxw):
    """``backward`` (dx, dw1, dw2 sharing dy; dx and dw1 from one kernel or two) with 600 tokens: every
    weight-gradient reduction split three ways."""
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 600, torch.float32, seed=1)
    dx_ref = ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)
    dw1_ref, dw2_ref = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in, dxw=dxw)
    assert_close(dx, dx_ref, torch.float32, f"{name} dx")
    assert_close(dw1, dw1_ref, torch.float32, f"{name} dw1")
    assert_close(dw2, dw2_ref, torch.float32, f"{name} dw2")


@pytest.mark.parametrize("name", BACKWARD_SHAPES + ["one block each"])
def test_backward_with_token_major_gradient_fp32(name):
    """``g_layout="token_major"``: ``g`` copied token-major before ``dy`` and ``dw2`` read it through P2ᵀ
    (group-1 plans for both), same values as the reference, in ``backward`` and ``backward_weight``."""
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 600, torch.float32, seed=3)
    dx_ref = ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)
    dw1_ref, dw2_ref = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in, g_layout="token_major")
    assert_close(dx, dx_ref, torch.float32, f"{name} dx")
    assert_close(dw1, dw1_ref, torch.float32, f"{name} dw1")
    assert_close(dw2, dw2_ref, torch.float32, f"{name} dw2")
    dw1, dw2 = tmon.backward_weight(x, g, w1, w2, g_layout="token_major")
    assert_close(dw1, dw1_ref, torch.float32, f"{name} backward_weight dw1")
    assert_close(dw2, dw2_ref, torch.float32, f"{name} backward_weight dw2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_major_copy(dtype):
    """:func:`.token_major.to_token_major` over ragged tiles (70 x 77 with 64 x 64 tiles), from a strided
    view, with NaN/±inf passed through bit for bit; a token-major input is returned as is; bad ranks refused."""
    from monarch_kernels.triton import token_major as ttm

    gen = torch.Generator().manual_seed(11)
    base = torch.randn(70, 154, generator=gen).to(DEVICE, dtype)
    base[3, 8], base[69, 76], base[0, 150] = math.nan, math.inf, -math.inf
    src = base[:, ::2]  # feature stride 2
    out = ttm.to_token_major(src)
    assert _common.is_token_major(out) and out.shape == src.shape and out.stride(1) % 16 == 0
    assert torch.equal(out.isnan(), src.isnan()) and torch.equal(out.nan_to_num(), src.nan_to_num())
    assert ttm.to_token_major(out) is out
    assert ttm.to_token_major(src[:0]).shape == (0, 77)
    with pytest.raises(ValueError, match="2-D"):
        ttm.to_token_major(base[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_major_copy_sums_the_columns(dtype):
    """``to_token_major(x, with_sum=True)``: the same copy and ``Σ_t x`` per column (a bias gradient) from the
    copy's own per-tile fp32 partials, per element against the float64 sum over 150 tokens (three token tiles,
    the last ragged) of a strided source; NaN/±inf only in their columns; a token-major input summed as is; no
    tokens sum to zeros. The partials buffer is poisoned (every row must be written)."""
    from monarch_kernels.triton import token_major as ttm

    gen = torch.Generator().manual_seed(13)
    src = (torch.randn(150, 154, generator=gen) + 0.5).to(DEVICE, dtype)[:, ::2]
    src[140, 4], src[3, 20], src[149, 76] = math.nan, math.inf, -math.inf
    want = src.double().sum(0)
    out, total = ttm.to_token_major(src, with_sum=True)
    assert torch.equal(out.isnan(), src.isnan()) and torch.equal(out.nan_to_num(), src.nan_to_num())
    assert total.dtype == dtype and total.shape == (77,)
    finite = want.isfinite()
    assert total[4].isnan() and total[20] == math.inf and total[76] == -math.inf and finite.sum() == 74
    assert_close(total[finite], want[finite], dtype, "column sums")
    again, total2 = ttm.to_token_major(out, with_sum=True)
    assert again is out and torch.equal(total2[finite], out.sum(0)[finite])
    empty, zero = ttm.to_token_major(src[:0], with_sum=True)
    assert empty.shape == (0, 77) and torch.equal(zero, torch.zeros(77, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_into_a_row_major_output(dtype):
    """:func:`.token_major.copy_into`: a token-major source (ragged 70 x 77 over 64 x 64 tiles) into a row-major
    output and a strided one, NaN/±inf bit for bit, every element written (the output poisoned first); sizes
    and dtypes that differ are refused."""
    from monarch_kernels.triton import token_major as ttm

    gen = torch.Generator().manual_seed(12)
    src = ttm.to_token_major(torch.randn(70, 77, generator=gen).to(DEVICE, dtype))
    src[5, 9], src[69, 76], src[0, 0] = math.nan, math.inf, -math.inf
    for out in (torch.full((70, 77), math.nan, device=DEVICE, dtype=dtype),
                torch.full((70, 160), math.nan, device=DEVICE, dtype=dtype)[:, 3:157:2]):
        assert ttm.copy_into(src, out) is out
        assert torch.equal(out.isnan(), src.isnan()) and torch.equal(out.nan_to_num(), src.nan_to_num())
    for bad in (torch.empty(70, 76, dtype=dtype), torch.empty(70, 77, dtype=torch.float16), torch.empty(70 * 77)):
        with pytest.raises(ValueError, match="copy_into"):
            ttm.copy_into(src, bad)
    ttm.copy_into(src[:0], torch.empty(0, 77, dtype=dtype))  # nothing to move


@pytest.mark.parametrize("name", ["grouped C=1 runs, ragged p", "C=12 runs, whole-row P2 (l=4)",
                                  "C=3 scattered P1, non-pow2 blocks", "fused square, group 16 of 32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_kernel_forward_with_a_token_major_stage2(monkeypatch, name, dtype):
    """The two-kernel forward whose stage 2 stores token-major (P2 in the store as whole token runs) and one
    transposing copy writes the output, whichever store the cost model would pick: as the float64 reference
    with bias and GELU, ragged sizes (truncated output), NaN/±inf inputs, from a token-major input too; the
    intermediate kept by ``forward_saving`` (no activation: the token-major store applies) is stage 1's. With a
    pre-activation kept (an activation in ``forward_saving``) the grouped store runs instead, no copy."""
    from monarch_kernels.triton import token_major as ttm

    real_choice, copies = tmon._model_choice, []
    monkeypatch.setattr(tmon, "_model_choice", lambda q, *a, **k: "token_major" if q.startswith("stage2_store")
                        else real_choice(q, *a, **k))
    monkeypatch.setattr(tmon, "copy_into", lambda src, out: copies.append(src) or ttm.copy_into(src, out))
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 70, dtype, seed=9)
    x[3, 1], x[40, 0] = math.nan, math.inf
    for inp in (x, x.t().contiguous().t()):
        for bias, act in ((b, "gelu"), (None, "none")):
            out = tmon.forward(inp, w1, w2, bias, n_out, act, path="two_kernel")
            assert len(copies) == 1 and _common.is_token_major(copies[0]) and copies[0].shape == out.shape
            copies.clear()
            want = ref.monarch_fwd(_d(inp), _d(w1), _d(w2), _d(bias), n_out, act)
            assert_close(out, want, dtype, f"{name} {act}")
    out, z, pre = tmon.forward_saving(x, w1, w2, None, n_out, path="two_kernel")
    assert len(copies) == 1 and pre is None
    assert_close(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), None, n_out), dtype, "saving")
    assert _common.is_token_major(z)
    assert_close(z, tmon._z(x, w1, sh), dtype, "kept z")  # the same kernel: equal up to the NaN/inf pattern
    copies.clear()
    out, z, pre = tmon.forward_saving(x, w1, w2, b, n_out, "gelu", path="two_kernel")
    assert copies == [] and pre is not None
    assert_close(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu"), dtype, "saving gelu")


def test_stage2_store_and_forward_path_follow_the_cost_model():
    """``auto`` asks the cost model: at 16384 tokens of 4096/64 stage 2 stores token-major (the grouped store
    runs at the interleaved kernels' measured third of the bandwidth), at 16 tokens it keeps the grouped store
    (two launches, not three: the launch gaps decide); the token-major store is not offered with chunks or a
    kept pre-activation. The fused square kernel
    (latency-bound, ``fused_eff``) is not ``auto``'s pick at 16384 x 1024/32, but an explicit ``path="fused"``
    still runs it."""
    from monarch_kernels import cost_model as cm

    sq, fc1 = cm.Problem.linear(16384, 4096, 4096, 64), cm.Problem.linear(16384, 768, 3072, 4, "gelu")
    assert cm.stage2_store(sq) == "token_major" and cm.stage2_store(cm.Problem.linear(16, 4096, 4096, 64)) == "grouped"
    assert plan.stage2_stores(16384, 16384, False) == ("grouped", "token_major")
    assert plan.stage2_stores(1024, 16384, False) == plan.stage2_stores(16384, 16384, True) == ("grouped",)
    with pytest.raises(ValueError, match="stage-2 store"):
        cm._two_kernel_forward(fc1, "bfloat16", cm.H100_SXM, True, "token_major")
    both = {o: cm._two_kernel_forward(sq, "bfloat16", cm.H100_SXM, False, o) for o in plan.STAGE2_STORES}
    assert [k.name for k in both["token_major"].kernels][-1] == "transpose into the row-major output"
    assert both["token_major"].time() < both["grouped"].time()
    sh = mk.monarch_factor_shapes(1024, 1024, 32)
    x = torch.empty(16384, 1024, dtype=torch.bfloat16, device="meta")
    assert cm.triton_path(cm.Problem.linear(16384, 1024, 1024, 32)) == "two_kernel"
    assert tmon.choose_path(sh, "auto", x) == "two_kernel" and tmon.choose_path(sh, "auto") == "fused"
    assert tmon.choose_path(sh, "fused", x) == "fused"
    slow = cm.estimate("triton", "fused", "fwd", cm.Problem.linear(16384, 1024, 1024, 32)).kernels[0]
    assert slow.mem_eff == pytest.approx(cm.H100_SXM.mem_eff * cm.H100_SXM.fused_eff)


def test_single_k_step_tiles_pipeline_two_stages():
    """A tile whose contraction fits in one K step (64-wide blocks) asks for 2 pipeline stages (the third only
    took shared memory: measured 13% slower on an H200), a longer contraction keeps 3."""
    assert plan.bd_tile(16384, 64, 64, 64, 2, 1, False).num_stages == 2
    assert plan.bd_tile(16384, 4, 768, 192, 2, 1, False).num_stages == 3  # 192 deep: 3 K steps of 64
    assert plan.bd_launch(16384, 64, 64, 64, 2, None, (64, 64)).tile.num_stages == 2


def test_a_saved_pre_activation_reaches_the_launch_plan():
    """The block-diagonal forward tells the planner when it stores the pre-activation: the training forward's
    stage 2 at unaligned widths (1000 -> 3000 in 4 blocks: token-major z in, P2-grouped output, bias + GELU) runs
    4 x 32 x 64 at 8 warps with ``SAVE_PRE`` (4 x 64 x 64 spilled on triton 3.6), the inference forward 4 x 64 x
    64."""
    T, l, s, r = 333, 4, 750, 250
    ws = torch.empty(l, s, r, device="meta").stride()

    def planned(save_pre):
        got = tbd._plan_for(T, l * r, l * s, l, s, r, torch.bfloat16, (1, T), ws, (l * s, 1), None, (s, l),
                                  "gelu", True, save_pre)
        return got.meta["SAVE_PRE"], got.meta["BLOCK_M"], got.meta["BLOCK_N"], got.meta["GROUP"], \
            got.options["num_warps"]

    assert planned(True) == (True, 32, 64, 4, 8)
    assert planned(False) == (False, 64, 64, 4, 8)


def test_launch_plans_are_memoised_per_setting(monkeypatch):
    """Plans are memoised (the same object for the same call) but follow the module's settings: a patched
    register budget gives a fresh, different plan, and restoring it the cached one again."""
    args = (16384, 64, 64, 64, 2, None, (64, 64), False, False, False)
    first = plan.bd_launch(*args)
    assert plan.bd_launch(*args) is first
    monkeypatch.setattr(plan, "LIVE_BYTES", plan.LIVE_BYTES // 4)
    assert plan.bd_launch(*args).tile != first.tile
    monkeypatch.undo()
    assert plan.bd_launch(*args) is first




def test_token_major_buffers_are_touched_to_their_16_row_padding():
    """``_common.touch_rows``: the rows kernels may load and store. A token-major buffer of 1000 tokens as
    ``empty_token_major`` lays it out (column stride 1008) is touched to 1008 rows (a mask bound that is a
    multiple of 16 lets the compiler move 16-byte vectors); everything else to its own rows: row-major
    tensors, aligned token counts, a view into a taller buffer (its padding rows are the next view's rows), and
    a tensor whose storage ends before its last column's padding."""
    bf = torch.bfloat16
    assert _common.touch_rows(_common.empty_token_major(1000, 64, device="cpu", dtype=bf)) == 1008
    assert _common.touch_rows(_common.empty_token_major(1008, 64, device="cpu", dtype=bf)) == 1008
    assert _common.touch_rows(_common.empty_token_major(1, 3, device="cpu", dtype=bf)) == 16
    assert _common.touch_rows(torch.empty(1000, 64, dtype=bf)) == 1000  # row-major
    assert _common.touch_rows(torch.empty(64, 2016, dtype=bf).t()[:1000]) == 1000  # a taller buffer's view
    exact = torch.empty(64 * 1008, dtype=bf)
    assert _common.touch_rows(exact.as_strided((1000, 64), (1, 1008))) == 1008
    short = torch.empty(63 * 1008 + 1000, dtype=bf)  # the last column's padding is not allocated
    assert _common.touch_rows(short.as_strided((1000, 64), (1, 1008))) == 1000
    assert _common.touch_rows(exact.as_strided((1000, 64), (1, 1008), 8)) == 1000  # offset: same shortfall


def test_memoised_launch_arguments_follow_each_calls_layout(monkeypatch):
    """:func:`.blockdiag.bd_forward` remembers a call's launch (plan, runtime and compile-time arguments) by shape,
    strides and options: calls of one shape back to back — row-major, strided and token-major ``x``; weights with
    transposed strides; a token-major output; with and without bias, activation and permutations — each get
    their own arguments and match the float64 reference; a patched plan setting reaches the remembered launch."""
    gen = torch.Generator().manual_seed(5)
    k, q, p, T = 4, 8, 8, 21
    w = torch.randn(k, q, p, generator=gen).to(DEVICE)
    b = torch.randn(k * q, generator=gen).to(DEVICE)
    base = torch.randn(T, 2 * k * p, generator=gen).to(DEVICE)
    xs = {"row-major": base[:, : k * p].contiguous(), "strided": base[:, ::2],
          "token-major": _common.empty_token_major(T, k * p, device=DEVICE,
                                                   dtype=torch.float32).copy_(base[:, 1::2])}
    ws = {"w": w, "w transposed strides": w.transpose(1, 2).contiguous().transpose(1, 2)}
    for _ in range(2):  # the second round runs on remembered launches
        for (xname, x), (wname, wt) in ((a, c) for a in xs.items() for c in ws.items()):
            for bias, act, perm in ((None, "none", None), (b, "gelu", (4, 8)), (b, "relu", (8, 4))):
                for out in (None, _common.empty_token_major(T, k * q, device=DEVICE, dtype=torch.float32)):
                    got = tbd.bd_forward(x, wt, bias, activation=act, in_perm=perm, out_perm=perm, out=out)
                    cols = torch.tensor([(f % perm[0]) * perm[1] + f // perm[0] if perm else f for f in range(32)])
                    want = torch.empty(T, k * q, dtype=torch.float64)
                    want[:, cols] = ref.blockdiag_fwd(_d(x)[:, cols], _d(w), None, k * q)
                    want = activations.apply(act, want + (0 if bias is None else _d(bias)))
                    assert_close(got, want, torch.float32,
                                 f"{xname}, {wname}, {act}, perm {perm}, out {out is None}")
    x = xs["row-major"]
    first = tbd._prepare(x, w, None, None, "none", None, None, None, None)[1]
    assert tbd._prepare(x, w, None, None, "none", None, None, None, None)[1] is first
    monkeypatch.setattr(plan, "LIVE_BYTES", plan.LIVE_BYTES // 64)
    assert tbd._prepare(x, w, None, None, "none", None, None, None, None)[1] is not first


def test_memoised_fused_launch_follows_each_call(monkeypatch):
    """The fused square forward remembers its grid and compile-time arguments by shape, dtype, activation, bias
    and whether it keeps the intermediate: calls of one shape back to back with and without each — and a
    transposed-stride input — get their own launch and match the float64 reference (the kept ``z`` stage 1's);
    a patched fused-tile setting reaches the remembered launch."""
    s1, s2 = SHAPES["fused square, group = all 16"]
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 21, torch.float32, seed=4)
    xt = x.t().contiguous().t()
    for _ in range(2):  # the second round runs on remembered launches
        for inp, bias, act, keep in ((x, None, "none", False), (x, b, "gelu", True), (xt, b, "relu", False),
                                     (x, None, "gelu", True)):
            if keep:
                out, z, _ = tmon.forward_saving(inp, w1, w2, bias, n_out, act, path="fused")
                assert_close(z, tmon._z(inp, w1, sh), torch.float32, f"kept z {act}")
            else:
                out = tmon.forward(inp, w1, w2, bias, n_out, act, path="fused")
            want = ref.monarch_fwd(_d(inp), _d(w1), _d(w2), _d(bias), n_out, act)
            assert_close(out, want, torch.float32, f"fused {act} bias {bias is not None} keep {keep}")
    first = tmon._fused_plan(21, sh, torch.float32, "none", False, False)
    assert tmon._fused_plan(21, sh, torch.float32, "none", False, False) is first
    monkeypatch.setattr(plan, "FUSED_ELEMS", plan.FUSED_ELEMS // 2)
    again = tmon._fused_plan(21, sh, torch.float32, "none", False, False)
    assert again is not first and again[1]["BLOCK_M"] < first[1]["BLOCK_M"]


def test_forward_host_work_is_two_allocations_and_two_launches(monkeypatch):
    """A one-chunk two-kernel forward whose stage 2 stores the row-major output (16 tokens of 4096 features in
    64 blocks, as the plan sizes it for an H100) does on the host no more than allocate the intermediate and
    launch its two kernels: no slicing, copies or reductions (the memoised plans keep host time per call down;
    measured by ``python -m bench.host_time``)."""
    from conftest import OpLog

    launched = []
    monkeypatch.setattr(type(tbd._bd_fwd_kernel), "run",  # JITFunction, or the interpreter's function
                        lambda self, *a, grid, warmup, **kw: launched.append(self.fn.__name__))
    monkeypatch.setattr(_common, "device_info", lambda device: plan.DeviceInfo(num_sms=132, l2_bytes=50 * 2**20))
    sh = mk.monarch_factor_shapes(4096, 4096, 64)
    meta = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    x, w1, w2, b = meta(16, 4096), meta(*sh.w1_shape), meta(*sh.w2_shape), meta(4096)
    assert tmon._model_choice("stage2_store", 16, 4096, 4096, sh, torch.bfloat16) == "grouped"
    tmon.forward(x, w1, w2, b)
    launched.clear()
    with OpLog() as log:
        out = tmon.forward(x, w1, w2, b)
    assert out.shape == (16, 4096) and launched == ["_bd_fwd_kernel", "_bd_fwd_kernel"]
    allocations = ("aten.empty.memory_format", "aten.full.default")  # full: this module's poisoned buffers
    assert sorted("allocate" if n in allocations else n for n in log.names) == ["allocate", "allocate",
                                                                              "aten.t.default"]
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_gradient_written_token_major(dtype):
    """:func:`.token_major.activation_grad_token_major` is ``activations.backward`` (fp32 arithmetic, the
    storage dtype out) stored token-major, per element within the dtype's tolerance and with the same
    NaN/±inf positions, over ragged 64 x 64 tiles (70 x 77) from strided ``pre`` and ``g``, through NaN / ±inf
    pre-activations, a zero (ReLU's kink), a large one (tanh saturated) and an infinite gradient; every element
    written (poisoned buffer); bad arguments refused."""
    from monarch_kernels.triton import token_major as ttm

    gen = torch.Generator().manual_seed(12)
    pre = (torch.randn(70, 154, generator=gen) * 3).to(DEVICE, dtype)[:, ::2]
    g = torch.randn(77, 70, generator=gen).to(DEVICE, dtype).t()
    big = 60000.0 if dtype == torch.float16 else 1000.0
    for (t, f), v in {(3, 8): math.nan, (69, 76): math.inf, (0, 50): -math.inf, (5, 5): 0.0, (9, 1): big,
                      (10, 2): -big}.items():
        pre[t, f] = v
    g[20, 20] = math.inf
    for name in ("relu", "gelu", "gelu_tanh"):
        got = ttm.activation_grad_token_major(name, pre, g)
        assert _common.is_token_major(got) and got.dtype == dtype
        assert_close(got, activations.backward(name, pre.double(), g.double()), dtype, name)
    assert ttm.activation_grad_token_major("gelu", pre[:0], g[:0]).shape == (0, 77)
    # with_sum: the bias gradient Σ_t (g · act'(pre)) from the same pass (the rounded values summed in fp32)
    for name in ("relu", "gelu"):
        got, total = ttm.activation_grad_token_major(name, pre, g, with_sum=True)
        assert torch.equal(got.nan_to_num(), ttm.activation_grad_token_major(name, pre, g).nan_to_num())
        want = got.double().sum(0)
        finite = want.isfinite()
        assert name == "relu" or (~finite).any()  # relu' of NaN is 0, GELU's is NaN
        assert torch.equal(total.isnan(), want.isnan()), name  # NaN/inf stay in their columns
        assert torch.equal(total[~finite & ~want.isnan()], want[~finite & ~want.isnan()].to(dtype))
        assert_close(total[finite], want[finite], dtype, f"{name} sum")
    with pytest.raises(ValueError, match="relu, gelu or gelu_tanh"):
        ttm.activation_grad_token_major("none", pre, g)
    with pytest.raises(ValueError, match="one shape"):
        ttm.activation_grad_token_major("gelu", pre[:, 1:], g)


def test_activation_backward_writes_g_token_major_for_its_readers(monkeypatch):
    """With an activation, ``backward_epilogue`` has the derivative's pass write ``g · act'(pre)`` token-major
    when the cost model has ``dy``/``dw2`` read a token-major ``g`` (then nothing is copied), and calls the
    plain derivative otherwise (then the readers copy it if they want). The bias gradient rides on that pass
    (``with_sum``), and without an activation on the token-major copy of ``g``; gradients as the float64
    reference either way, over 70 tokens (two tiles of the copy: every tile's partial sum counted)."""
    s1, s2 = SHAPES["C=12 runs, whole-row P2 (l=4)"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 70, torch.float32, ragged=False, seed=3)
    real_choice = tmon._model_choice
    calls = []
    real_fused, real_copy = tmon.activation_grad_token_major, tmon.to_token_major
    monkeypatch.setattr(tmon, "activation_grad_token_major",
                        lambda *a, **kw: calls.append(("fused", kw.get("with_sum", False))) or real_fused(*a, **kw))
    monkeypatch.setattr(tmon, "to_token_major",
                        lambda t, **kw: calls.append(("copy", kw.get("with_sum", False), _common.is_token_major(t)))
                        or real_copy(t, **kw))
    for act in ("gelu", "none"):
        for bias in (b, None):
            want = ref.monarch_bwd_epilogue(_d(x), _d(g), _d(w1), _d(w2), _d(bias), n_in, act, True)
            for picks in ("bmm", "token_major", "grouped"):
                monkeypatch.setattr(tmon, "_model_choice", lambda q, *a, picks=picks: picks if q == "g_readers"
                                    else real_choice(q, *a))
                calls.clear()
                got = tmon.backward_epilogue(x, g, w1, w2, bias, n_in, act, True)
                fused = [c[1] for c in calls if c[0] == "fused"]  # with_sum of each call
                copies = [c[1] for c in calls if c[0] == "copy" and not c[2]]  # real copies (of a row-major g)
                if picks == "grouped":
                    assert fused == [] and copies == [], (act, picks)
                elif act != "none":
                    assert fused == [bias is not None] and copies == [], (act, picks)
                else:  # one copy of g: summed there with a bias, the readers' own copy without
                    assert fused == [] and copies == [bias is not None], (act, picks)
                for what, a, e in zip(("dx", "dw1", "dw2", "db"), got, want):
                    if e is None:
                        assert a is None
                    else:
                        assert_close(a, e, torch.float32, f"{act} bias={bias is not None} {picks} {what}")


def test_backward_epilogue_hands_its_pick_to_the_readers(monkeypatch):
    """``backward_epilogue`` asks the cost model once how ``dy`` and ``dw2`` read ``g``, telling it the layer's
    activation (whose derivative writes ``g`` token-major for free) and whether it has a bias (summed almost free
    by a copy), makes the ``g`` that pick reads and hands the pick on as ``g_layout``: the readers do not ask
    again without them (with ``"auto"`` they could read a token-major ``g`` through grouped gathers, or copy a
    ``g`` the pick left as given). Gradients as the float64 reference for every pick."""
    s1, s2 = SHAPES["C=12 runs, whole-row P2 (l=4)"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 40, torch.float32, ragged=False, seed=5)
    real_choice, real_bwd, real_bwd_w = tmon._model_choice, tmon.backward, tmon.backward_weight
    asked, layouts = [], []
    monkeypatch.setattr(tmon, "backward", lambda *a, **k: layouts.append(
        (k["g_layout"], _common.is_token_major(a[1]))) or real_bwd(*a, **k))
    monkeypatch.setattr(tmon, "backward_weight", lambda *a, **k: layouts.append(
        (k["g_layout"], _common.is_token_major(a[1]))) or real_bwd_w(*a, **k))
    for act in ("gelu", "none"):
        for bias in (b, None):
            for picks in ("bmm", "token_major", "grouped"):
                monkeypatch.setattr(tmon, "_model_choice", lambda q, *a, picks=picks: asked.append((q, a[5:])) or (
                    picks if q == "g_readers" else real_choice(q, *a)))
                want = ref.monarch_bwd_epilogue(_d(x), _d(g), _d(w1), _d(w2), _d(bias), n_in, act, True)
                for want_dx in (True, False):
                    asked.clear()
                    layouts.clear()
                    got = tmon.backward_epilogue(x, g, w1, w2, bias, n_in, act, want_dx)
                    assert [a for q, a in asked if q == "g_readers"] == [(act, bias is not None)], (act, picks)
                    layout = {"grouped": "row_major"}.get(picks, picks)
                    # the epilogue makes the token-major g where a pass of its own runs anyway (the derivative,
                    # or the copy that sums the bias); else the readers copy it, as the layout says
                    made = picks != "grouped" and (act != "none" or bias is not None)
                    assert layouts == [(layout, made)], (act, bias is not None, picks, want_dx)
                    for what, a, e in zip(("dx", "dw1", "dw2", "db"), got, want):
                        if what == "dx" and not want_dx:
                            assert a is None
                        elif e is None:
                            assert a is None
                        else:
                            assert_close(a, e, torch.float32, f"{act} bias={bias is not None} {picks} {what}")


def test_gradient_layout_follows_the_cost_model():
    """``g_layout="auto"`` reads ``g`` as the cost model picks (GPT-2's fc1 and fc2: a token-major copy read by
    cuBLAS; square Monarch: a token-major copy read by Triton tiles, since the grouped gathers of ``g`` as given
    run at the interleaved kernels' measured third of the bandwidth), ``"row_major"`` never copies,
    ``"token_major"`` and ``"bmm"`` always; a bad value is refused, and so is ``"bmm"`` on a ragged ``g``."""
    sh4 = mk.monarch_factor_shapes(768, 3072, 4)
    assert tmon._model_choice("g_readers", 16384, 768, 3072, sh4, torch.bfloat16) == "bmm"
    assert tmon._model_choice("g_readers", 16384, 4096, 4096, mk.monarch_factor_shapes(4096, 4096, 64),
                              torch.bfloat16) == "token_major"
    s1, s2 = SHAPES["C=12 runs, whole-row P2 (l=4)"]
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 40, torch.float32, ragged=False)
    copies, gemms = [], []
    real_copy, real_choice, real_bmm = tmon.to_token_major, tmon._model_choice, tmon._bmm_dy
    try:
        tmon.to_token_major = lambda t: copies.append(t) or real_copy(t)
        tmon._bmm_dy = lambda *a: gemms.append(1) or real_bmm(*a)
        for picks in ("grouped", "token_major", "bmm"):
            tmon._model_choice = lambda q, *a, picks=picks: picks if q == "g_readers" else real_choice(q, *a)
            for layout, want in (("auto", picks), ("row_major", "grouped"), ("token_major", "token_major"),
                                 ("bmm", "bmm")):
                copies.clear()
                gemms.clear()
                tmon.backward(x, g, w1, w2, n_in, g_layout=layout)
                tmon.backward_weight(x, g, w1, w2, g_layout=layout)
                assert len(copies) == 2 * (want != "grouped") and all(c is g for c in copies), (picks, layout)
                assert len(gemms) == 2 * (want == "bmm"), (picks, layout)
    finally:
        tmon.to_token_major, tmon._model_choice, tmon._bmm_dy = real_copy, real_choice, real_bmm
    with pytest.raises(ValueError, match="g_layout must be one of"):
        tmon.backward(x, g, w1, w2, n_in, g_layout="columns")
    with pytest.raises(ValueError, match="g_layout='bmm' needs whole blocks"):
        tmon.backward(x, g[:, :-1], w1, w2, n_in, g_layout="bmm")
    # the weight-gradient kernel is planned for the token-major g (no block group)
    plans, real_plan = [], plan.wgrad_launch
    try:
        tbd._plan.wgrad_launch = lambda *a: plans.append(real_plan(*a)) or plans[-1]
        tbd._wgrad_plan.cache_clear()  # the launch remembered from the calls above would skip the plan
        tmon.backward(x, g, w1, w2, n_in, g_layout="token_major", dxw="separate")
    finally:
        tbd._plan.wgrad_launch = real_plan
    assert [lp.g.group for lp in plans] == [1, 1]  # dw1 (natural) and dw2 (token-major g)
    assert plan.wgrad_launch(40, *s2, 4, (s2[1], s2[0]), 4).g.group == 4  # row-major g: all 4 blocks grouped
    with pytest.raises(ValueError, match="g_layout must be one of"):
        tmon.backward(x, g, w1, w2, n_in, g_layout="transposed")


@pytest.mark.parametrize("name", ["one block each", "q % l != 0 (scattered P1)"])
def test_backward_input_and_weight_fp32(name):
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 300, torch.float32, seed=2)
    assert_close(tmon.backward_input(g, w1, w2, n_in), ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in),
                 torch.float32, "dx")
    dw1, dw2 = tmon.backward_weight(x, g, w1, w2)
    r1, r2 = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    assert_close(dw1, r1, torch.float32, "dw1")
    assert_close(dw2, r2, torch.float32, "dw2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fused square, group = all 16", "C=12 runs, whole-row P2 (l=4)"])
def test_half_precision(dtype, name):
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 33, dtype, seed=3)
    # the kernels round the intermediate to the input dtype (as fly does): compare with that rounding's
    # worst case folded into the tolerance scale, i.e. against the float64 product of the rounded inputs
    for path in _paths(sh):
        out = tmon.forward(x, w1, w2, b, n_out, "relu", path=path)
        assert out.dtype == dtype
        assert_close(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "relu"), dtype, f"{path} fwd")
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in)
    r1, r2 = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    assert_close(dx, ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in), dtype, "dx")
    assert_close(dw1, r1, dtype, "dw1")
    assert_close(dw2, r2, dtype, "dw2")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on inf·w sums
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("name", ["fused square, group = all 16", "grouped C=2 (in-register transpose)"])
def test_nan_and_inf_inputs_propagate_like_reference(name, act):
    """Regression (#18 D2, D3): ReLU kept NaN -> 0 and the fused path turned ±inf into NaN through padded lanes.
    The non-finite pattern of every output must be the reference's, and the finite part must match."""
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 21, torch.float32, seed=4)
    x[2, 0] = math.inf
    x[5, min(3, n_in - 1)] = -math.inf
    x[7, n_in // 2] = math.nan
    b[0] = math.nan  # a NaN pre-activation: relu(NaN) must stay NaN
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, act)
    assert torch.isnan(expect).any() and torch.isinf(expect).any() or act in ("relu",)
    for path in _paths(sh):
        assert_close(tmon.forward(x, w1, w2, b, n_out, act, path=path), expect, torch.float32, f"{path} {act}")


def test_gathered_input_over_several_k_steps_is_planned():
    """The dy kernel of the "s = 80" shape gathers P2ᵀ g in groups of 4 of the 8 blocks (not whole rows) and
    accumulates 5 K steps in fp32 (the multi-K path with its deferred epilogue): what the backward tests reach."""
    lp = plan.bd_launch(600, 8, 2, 80, 4, (80, 8), (2, 8))
    assert lp.inp.mode == plan.GROUPED and lp.multi_k and not lp.in_full and lp.tile.group == 4
    assert plan.cdiv(80, lp.tile.block_k) == 5


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("what", ["blockdiag", "two_kernel", "fused"])
def test_fp16_pre_activation_overflow_like_torch(what, act):
    """Regression: act(F.linear(...)) rounds the pre-activation to fp16 before the activation, so -65536 is
    -inf there and gelu(-inf) = NaN; the epilogue activated the fp32 value (finite -0.0) instead. Odd output
    rows give -65536, even rows small exact values."""
    T = 3
    if what == "blockdiag":
        x = torch.ones(T, 64, dtype=torch.float16, device=DEVICE)
        w = torch.ones(1, 4, 64, dtype=torch.float16, device=DEVICE)
        w[:, 1::2] = -1024.0
        out = tbd.bd_forward(x, w, None, 4, act)
        pre = ref.blockdiag_fwd(x, w, None, 4)
    else:
        nb, width, big = (4, 64, -16.0) if what == "two_kernel" else (16, 16, -256.0)
        x = torch.ones(T, nb * width, dtype=torch.float16, device=DEVICE)
        w1 = torch.ones(nb, width, width, dtype=torch.float16, device=DEVICE)
        w2 = torch.full((nb, width, width), big, dtype=torch.float16, device=DEVICE)
        w2[:, ::2] = 1.0
        out = tmon.forward(x, w1, w2, None, nb * width, act, path=what)
        pre = ref.monarch_fwd(x, w1, w2, None, nb * width)
    assert torch.isneginf(pre).any()
    want = activations.apply(act, pre)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    assert torch.equal(out[want.isfinite()], want[want.isfinite()])


def test_relu_keeps_nan_and_inf_in_the_epilogue():
    """Regression (#18 D2): the block-diagonal epilogue used tl.maximum, whose max.f32 maps NaN to 0."""
    x = torch.tensor([[1.0, 2.0], [math.nan, 1.0], [math.inf, 0.5], [-math.inf, 1.0]], device=DEVICE)
    w = torch.ones(1, 1, 2, device=DEVICE)
    out = tbd.bd_forward(x, w, None, 1, "relu")
    assert_close(out, torch.relu(x.double().sum(1, keepdim=True)), torch.float32, "relu")


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
def test_blockdiag_epilogues_and_split_wgrad(act):
    g_ = torch.Generator().manual_seed(3)
    x = torch.randn(600, 30, generator=g_).to(DEVICE)
    w = torch.randn(4, 7, 8, generator=g_).to(DEVICE)
    b = torch.randn(26, generator=g_).to(DEVICE)
    assert_close(tbd.bd_forward(x, w, b, 26, act), ref.blockdiag_fwd(_d(x), _d(w), _d(b), 26, act), torch.float32,
                 "fwd")
    gy = torch.randn(600, 26, generator=g_).to(DEVICE)
    assert plan.wgrad_launch(600, 4, 7, 8, 4, None, 4).splits == 3  # every split is reached
    assert_close(tbd.bd_weight_grad(x, gy, 4, 7, 8), ref.blockdiag_wgrad(_d(x), _d(gy), 4, 7, 8), torch.float32,
                 "wgrad")


@pytest.mark.parametrize("layout", ["natural", "grouped C=2 store", "gathered over 5 K steps"])
def test_pre_activation_stored_beside_the_output(layout):
    """``bd_forward(..., pre_out=)``: the pre-activation (bias included) lands in ``pre_out`` through the same
    permuted store, the output is its activation; refused without an activation or with another layout."""
    g_ = torch.Generator().manual_seed(9)
    k, q, p = {"natural": (4, 7, 8), "grouped C=2 store": (4, 8, 8), "gathered over 5 K steps": (8, 2, 80)}[layout]
    in_perm = (p, k) if layout.startswith("gathered") else None
    out_perm = (q // 2, 2 * k) if layout.startswith("grouped") else None
    lp = plan.bd_launch(70, k, q, p, 4, in_perm, out_perm, True)
    assert (lp.out.mode, lp.out.c, lp.inp.mode, lp.multi_k) == {
        "natural": (plan.NATURAL, 1, plan.NATURAL, False), "grouped C=2 store": (plan.GROUPED, 2, plan.NATURAL, False),
        "gathered over 5 K steps": (plan.NATURAL, 1, plan.GROUPED, True)}[layout]
    x = torch.randn(70, k * p, generator=g_).to(DEVICE)
    w = torch.randn(k, q, p, generator=g_).to(DEVICE)
    b = torch.randn(k * q, generator=g_).to(DEVICE)
    pre = torch.full((70, k * q), math.nan, device=DEVICE)
    out = tbd.bd_forward(x, w, b, activation="gelu", in_perm=in_perm, out_perm=out_perm, pre_out=pre)
    plain = tbd.bd_forward(x, w, b, in_perm=in_perm, out_perm=out_perm)
    assert not pre.isnan().any()
    assert_close(pre, plain, torch.float32, f"{layout} pre")
    assert_close(out, activations.apply("gelu", plain), torch.float32, f"{layout} out")
    with pytest.raises(ValueError, match="only written with an activation"):
        tbd.bd_forward(x, w, b, in_perm=in_perm, out_perm=out_perm, pre_out=pre)
    with pytest.raises(ValueError, match="pre_out must match the output"):
        tbd.bd_forward(x, w, b, activation="relu", pre_out=pre.t().contiguous().t())


def test_paired_launch_equals_two_launches():
    """``bd_forward_pair`` runs two unrelated calls (a grouped P1 store into a token-major buffer; a gathered
    multi-K input with bias, GELU and a kept pre-activation) as one interleaved grid: every element as the
    separate launches give it, bit for bit; a call with no tokens leaves the other alone; bad arguments are
    refused."""
    g_ = torch.Generator().manual_seed(13)
    rnd = lambda *s: torch.randn(*s, generator=g_).to(DEVICE)
    xa, wa = rnd(70, 8 * 5), rnd(8, 8, 5)
    xb, wb, bb = rnd(33, 8 * 80), rnd(8, 2, 80), rnd(16)
    first = dict(x=xa, w=wa, out_perm=(8, 8), out=_common.empty_token_major(70, 64, device=DEVICE,
                                                                              dtype=torch.float32))
    pre = torch.full((33, 16), math.nan, device=DEVICE)
    second = dict(x=xb, w=wb, bias=bb, activation="gelu", in_perm=(80, 8), pre_out=pre)
    ya, yb = tbd.bd_forward_pair(first, second)
    assert ya is first["out"] and not ya.isnan().any() and not yb.isnan().any()
    assert torch.equal(ya, tbd.bd_forward(xa, wa, out_perm=(8, 8)))
    assert torch.equal(yb, tbd.bd_forward(xb, wb, bb, activation="gelu", in_perm=(80, 8)))
    assert torch.equal(pre, tbd.bd_forward(xb, wb, bb, in_perm=(80, 8)))
    assert_close(yb, ref.blockdiag_fwd(_d(xb)[:, torch.tensor([(f % 80) * 8 + f // 80 for f in range(640)])],
                                       _d(wb), _d(bb), 16, "gelu"), torch.float32, "second vs reference")
    ya0, yb0 = tbd.bd_forward_pair(dict(x=xa[:0], w=wa), dict(x=xb, w=wb, in_perm=(80, 8)))
    assert ya0.shape == (0, 64) and torch.equal(yb0, tbd.bd_forward(xb, wb, in_perm=(80, 8)))
    with pytest.raises(ValueError, match="bd_forward_pair"):
        tbd.bd_forward_pair(dict(x=xa, w=wa, perm=(8, 8)), second)
    with pytest.raises(ValueError, match="bd_forward_pair"):
        tbd.bd_forward_pair(first, dict(x=xb.double(), w=wb.double()))


@pytest.mark.parametrize("schedule,dtype,x_layout", [("chain", torch.float32, "rows"), ("pair", torch.float32, "rows"),
                                                      ("unpaired", torch.float32, "rows"),
                                                      ("chain", torch.bfloat16, "rows"),
                                                      ("chain", torch.float32, "columns")])
def test_two_kernel_forward_pairs_stages_across_chunks(monkeypatch, schedule, dtype, x_layout):
    """With 128-token chunks (a small L2) and 300 tokens, the forward runs stage 1 of chunk 0, then stage 1
    of chunk i beside stage 2 of chunk i - 1, then stage 2 of the last chunk, through two intermediate
    buffers: as one chained launch (``chain``), as four launches (two of them paired), or, unpaired, two
    launches per chunk; all as the float64 reference, in bf16 too and from a column-major (token-major)
    input."""
    monkeypatch.setattr(_common, "device_info", lambda device: plan.DeviceInfo(num_sms=4, l2_bytes=64 * 1024))
    monkeypatch.setattr(plan, "CHUNK_IN_L2", True)
    monkeypatch.setattr(plan, "PAIR_STAGES", schedule != "unpaired")
    monkeypatch.setattr(plan, "ONE_LAUNCH", schedule == "chain")
    s1, s2 = SHAPES["C=12 runs, whole-row P2 (l=4)"]
    sh, n_in, n_out, x, w1, w2, b, _ = _data(s1, s2, 300, dtype, seed=6)
    if x_layout == "columns":
        x = x.t().contiguous().t()
        assert _common.is_token_major(x)
    assert plan.chunk_tokens(300, sh.n_mid, 4, 64 * 1024, 128, 2) == 128
    calls = {"chain": [], "pair": [], "single": []}
    for name, attr in (("chain", "bd_forward_chain"), ("pair", "bd_forward_pair"), ("single", "bd_forward")):
        real = getattr(tmon, attr)
        monkeypatch.setattr(tmon, attr, lambda *a, real=real, seen=calls[name], **kw: seen.append(1) or real(*a, **kw))
    out = tmon.forward(x, w1, w2, b, n_out, "gelu", path="two_kernel")
    want = {"chain": (1, 0, 0), "pair": (0, 2, 2), "unpaired": (0, 0, 6)}[schedule]
    assert tuple(len(calls[k]) for k in ("chain", "pair", "single")) == want
    assert_close(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu"), dtype, schedule)


def test_chained_launch_equals_separate_launches(monkeypatch):
    """``bd_forward_chain`` over 300 tokens in 128-token chunks (three, the last ragged): every element as the
    paired launches give it, bit for bit, through two reused slots and with every chunk kept (with a kept
    pre-activation); each counter ends at its stage's program count, and no program found a dependency
    unfinished in launch order. One slot cannot serve a paired schedule (stage 1 of chunk c + 1 would
    overwrite what stage 2 of chunk c, beside it, still reads): the interpreter's in-order check reports it.
    Bad arguments are refused."""
    g_ = torch.Generator().manual_seed(21)
    rnd = lambda *s: torch.randn(*s, generator=g_).to(DEVICE)
    T, chunk, (k, q, p), (l, s, r) = 300, 128, (4, 12, 6), (4, 10, 12)
    x, w1, w2, bias = rnd(T, k * p), rnd(k, q, p), rnd(l, s, r), rnd(l * s)
    n_mid = k * q
    seen = []
    real = tbd.chain_counters
    monkeypatch.setattr(tbd, "chain_counters", lambda n, device: seen.append(real(n, device)) or seen[-1])

    def run(buffers, keep_pre):
        z = _common.empty_token_major(buffers * chunk if buffers < 3 else T, n_mid, device=DEVICE,
                                      dtype=torch.float32)
        out = torch.full((T, l * s), math.nan, device=DEVICE)
        pre = torch.full((T, l * s), math.nan, device=DEVICE) if keep_pre else None
        tbd.bd_forward_chain(dict(x=x, w=w1, out_perm=(l, r), out=z),
                             dict(x=z, w=w2, bias=bias, activation="gelu", out_perm=(s, l), out=out, pre_out=pre),
                             chunk=chunk, buffers=buffers)
        return z, out, pre

    want_z = tbd.bd_forward(x, w1, out_perm=(l, r), out=_common.empty_token_major(T, n_mid, device=DEVICE,
                                                                                  dtype=torch.float32))
    want_out = tbd.bd_forward(want_z, w2, bias, activation="gelu", out_perm=(s, l))
    want_pre = tbd.bd_forward(want_z, w2, bias, out_perm=(s, l))
    for buffers, keep_pre in ((2, False), (3, True)):
        z, out, pre = run(buffers, keep_pre)
        assert torch.equal(out, want_out), buffers
        if buffers == 3:
            assert torch.equal(z, want_z) and torch.equal(pre, want_pre)
        n1 = _plan_programs(128, k, q, p, (l, r), token_major_out=True)
        n2 = _plan_programs(128, l, s, r, (s, l), token_major_in=True, activation=True)
        assert seen[-1].tolist() == [3 * (n1 + n2), n1, n1, n1, n2, n2, n2, 0]
    assert_close(want_out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(bias), None, "gelu"), torch.float32,
                 "chained vs reference")
    with pytest.raises(RuntimeError, match="dependency unfinished"):
        run(1, False)
    z = _common.empty_token_major(2 * chunk, n_mid, device=DEVICE, dtype=torch.float32)
    out = torch.empty(T, l * s, device=DEVICE)
    with pytest.raises(ValueError, match="bd_forward_chain"):  # stage 2 must read what stage 1 writes
        tbd.bd_forward_chain(dict(x=x, w=w1, out=z), dict(x=z.clone(), w=w2, out=out), chunk=chunk, buffers=2)
    with pytest.raises(ValueError, match="bd_forward_chain"):  # two slots of 128 tokens do not fit in 100 rows
        tbd.bd_forward_chain(dict(x=x, w=w1, out=z[:100]), dict(x=z[:100], w=w2, out=out), chunk=chunk, buffers=2)


def _plan_programs(tokens, k, q, p, out_perm, token_major_in=False, token_major_out=False, activation=False):
    lp = plan.bd_launch(tokens, k, q, p, 4, None, out_perm, activation, token_major_in, token_major_out)
    return lp.grid[0] * lp.grid[1]


def test_grouped_gather_and_scatter_layouts_directly():
    """bd_forward through a P2ᵀ-style gather and a P1ᵀ-style scatter (8 blocks: groups of 4 in fp32, two
    groups) equals the same product through explicit index permutations."""
    g_ = torch.Generator().manual_seed(5)
    k, q, p = 8, 6, 5
    x = torch.randn(70, k * p, generator=g_).to(DEVICE)
    w = torch.randn(k, q, p, generator=g_).to(DEVICE)
    lp = plan.bd_launch(70, k, q, p, 4, (p, k), (q, k))
    assert lp.inp.mode == plan.GROUPED and lp.out.mode == plan.GROUPED and lp.tile.group == 4
    vt = lambda f, a, b: (f % a) * b + f // a  # logical column f lives at physical column vt(f)
    cols_in = torch.tensor([vt(f, p, k) for f in range(k * p)])
    cols_out = torch.tensor([vt(f, q, k) for f in range(k * q)])
    y_logical = ref.blockdiag_fwd(_d(x)[:, cols_in], _d(w), None, k * q)
    expect = torch.empty_like(y_logical)
    expect[:, cols_out] = y_logical
    assert_close(tbd.bd_forward(x, w, in_perm=(p, k), out_perm=(q, k)), expect, torch.float32, "grouped")


@pytest.mark.parametrize("p", [5, 80])  # one K step / a gathered input over several K steps
def test_token_major_operands(p):
    """Operands stored token-major (token stride 1, as the two-kernel intermediate, ``dy`` and ``z``): a
    gathered token-major input and a permuted token-major output need no block group (plan: group 1, whole
    row tile per run), and give the same values as through explicit index permutations; the buffer helper
    aligns every column to 16 bytes."""
    g_ = torch.Generator().manual_seed(7)
    k, q, T = 8, 6, 70
    xt = _common.empty_token_major(T, k * p, device=DEVICE, dtype=torch.float32)
    assert _common.is_token_major(xt) and xt.stride(1) % 16 == 0 and xt.stride(1) >= T
    xt.copy_(torch.randn(T, k * p, generator=g_))
    w = torch.randn(k, q, p, generator=g_).to(DEVICE)
    lp = plan.bd_launch(T, k, q, p, 4, (p, k), (q, k), in_token_major=True, out_token_major=True)
    assert lp.inp.mode == plan.GROUPED and lp.out.mode == plan.GROUPED and lp.tile.group == 1
    assert lp.multi_k == (p == 80)
    assert plan.bd_launch(T, k, q, p, 4, (p, k), (q, k)).tile.group > 1  # row-major: groups for ≥ 16-byte runs
    vt = lambda f, a, b: (f % a) * b + f // a
    cols_in = torch.tensor([vt(f, p, k) for f in range(k * p)])
    cols_out = torch.tensor([vt(f, q, k) for f in range(k * q)])
    expect = torch.empty(T, k * q, dtype=torch.float64)
    expect[:, cols_out] = ref.blockdiag_fwd(_d(xt)[:, cols_in], _d(w), None, k * q)
    out = _common.empty_token_major(T, k * q, device=DEVICE, dtype=torch.float32)
    assert tbd.bd_forward(xt, w, in_perm=(p, k), out_perm=(q, k), out=out) is out
    assert_close(out, expect, torch.float32, "token-major in and out")
    assert_close(tbd.bd_forward(xt.contiguous(), w, in_perm=(p, k), out_perm=(q, k)), expect, torch.float32,
                 "row-major")


def test_intermediates_are_token_major():
    """The two-kernel stage 1, the backward's dy and z write token-major buffers: their P1 / P1ᵀ stores take
    no block group, so stage 1 gets the full 128-row tile at 4096 wide with 64 blocks (the row-major store
    needed groups of 8 blocks for 16-byte runs and 64 rows)."""
    sh = mk.monarch_factor_shapes(4096, 4096, 64)
    row_major = plan.bd_launch(16384, sh.k, sh.q, sh.p, 2, None, (sh.l, sh.r))
    token_major = plan.bd_launch(16384, sh.k, sh.q, sh.p, 2, None, (sh.l, sh.r), out_token_major=True)
    assert (row_major.tile.group, row_major.tile.block_m) == (8, 64)
    assert (token_major.tile.group, token_major.tile.block_m) == (1, 128)
    s1, s2 = SHAPES["grouped C=1 runs, ragged p"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 33, torch.float32)
    seen = []
    real = tmon.bd_forward

    def spy(x, w, *args, out=None, **kw):
        y = real(x, w, *args, out=out, **kw)
        seen.append((_common.is_token_major(x), _common.is_token_major(y)))
        return y

    try:
        tmon.bd_forward = spy
        tmon.forward(x, w1, w2, b, n_out, path="two_kernel")
        tmon.backward(x, g, w1, w2, n_in)
    finally:
        tmon.bd_forward = real
    # forward: stage 1 writes z token-major, stage 2 reads it; backward: dy and z written token-major
    assert seen == [(False, True), (True, False), (False, True), (False, True)]


@pytest.mark.parametrize("schedule", ["chain", "pair", "unpaired"])
def test_forward_saving_keeps_the_intermediate_across_chunks(monkeypatch, schedule):
    """``forward_saving`` on the two-kernel path with a small L2 (128-token chunks, 300 tokens: three chunks,
    the last ragged), under each forward schedule (one chained launch, paired launches, two launches per
    chunk): the same output as ``forward``, the whole token-major intermediate (equal to a
    recomputed one) and the pre-activation (stage 2 without the activation); without an activation no
    pre-activation, and on the fused square path nothing is kept. ``backward_epilogue`` with what was kept
    (every want_dx / want_dw combination, GELU and bias) matches the float64 reference and recomputes no
    stage 1 and no stage 2."""
    monkeypatch.setattr(_common, "device_info", lambda device: plan.DeviceInfo(num_sms=4, l2_bytes=64 * 1024))
    monkeypatch.setattr(plan, "CHUNK_IN_L2", True)
    monkeypatch.setattr(plan, "PAIR_STAGES", schedule != "unpaired")
    monkeypatch.setattr(plan, "ONE_LAUNCH", schedule == "chain")
    s1, s2 = SHAPES["grouped C=1 runs, ragged p"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 300, torch.float32, seed=4)
    assert plan.chunk_tokens(300, sh.n_mid, 4, 64 * 1024, 128) == 128
    out, z, pre = tmon.forward_saving(x, w1, w2, b, n_out, "gelu")
    assert torch.equal(out, tmon.forward(x, w1, w2, b, n_out, "gelu"))
    assert _common.is_token_major(z) and z.shape == (300, sh.n_mid)
    assert torch.equal(z, tmon._z(x, w1, sh))
    assert_close(pre, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out), torch.float32, "pre-activation")
    assert_close(out, activations.apply("gelu", pre), torch.float32, "out = act(pre)")
    assert tmon.forward_saving(x, w1, w2, b, n_out)[2] is None
    for name in ("fused square, group = all 16", "fused square, group 16 of 32"):  # one and two groups
        fs1, fs2 = SHAPES[name]
        fsh = mk.MonarchShape.from_factors(fs1, fs2)
        fx, fw1, fw2 = (torch.randn(*s, device=DEVICE) for s in ((20, fsh.n_in), fs1, fs2))
        fout, fz, fpre = tmon.forward_saving(fx, fw1, fw2, activation="relu")
        assert fpre is None and _common.is_token_major(fz) and fz.shape == (20, fsh.n_mid)
        assert torch.equal(fout, tmon.forward(fx, fw1, fw2, activation="relu", path="fused"))
        assert_close(fz, tmon._z(fx, fw1, fsh), torch.float32, f"{name}: kept z")
    expect = ref.monarch_bwd_epilogue(_d(x), _d(g), _d(w1), _d(w2), _d(b), n_in, "gelu", True)
    recomputed, stage2 = [], []
    real_z, real_bd = tmon._z, tmon.bd_forward
    monkeypatch.setattr(tmon, "_z", lambda *a: recomputed.append(1) or real_z(*a))
    monkeypatch.setattr(tmon, "bd_forward",
                        lambda inp, w, *a, **kw: (stage2.append(w is w2), real_bd(inp, w, *a, **kw))[1])
    for want_dx, want_dw, zz in ((True, True, z), (False, True, z), (True, False, z), (True, False, None)):
        got = tmon.backward_epilogue(x, g, w1, w2, b, n_in, "gelu", want_dx, zz, want_dw, pre)
        for a, e, name in zip(got, expect, ("dx", "dw1", "dw2", "db")):
            wanted = want_dx if name == "dx" else want_dw if name != "db" else True
            if wanted:
                assert_close(a, e, torch.float32, f"{name} want_dx={want_dx} want_dw={want_dw}")
            else:
                assert a is None, name
    assert not recomputed and not any(stage2)
    # without a saved z: stage 1 once, shared by the pre-activation and dw2
    got = tmon.backward_epilogue(x, g, w1, w2, None, n_in, "relu", True)
    assert len(recomputed) == 1 and got[3] is None
    expect = ref.monarch_bwd_epilogue(_d(x), _d(g), _d(w1), _d(w2), None, n_in, "relu", True)
    for a, e, name in zip(got[:3], expect[:3], ("dx", "dw1", "dw2")):
        assert_close(a, e, torch.float32, f"{name} recomputed z")


def test_training_through_ops_keeps_the_intermediate(monkeypatch):
    """An eager training call on the triton backend runs ``forward_saving`` and hands its ``z`` to the
    first-order backward: no stage-1 recompute, gradients as the float64 reference's."""
    s1, s2 = SHAPES["C=12 runs, whole-row P2 (l=4)"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 50, torch.float32, seed=5)
    recomputed = []
    real_z = tmon._z
    monkeypatch.setattr(tmon, "_z", lambda *a: recomputed.append(1) or real_z(*a))
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
    mk.monarch_linear(leaves[0], leaves[1], leaves[2], leaves[3], out_features=n_out, activation="gelu",
                      backend="triton").backward(g)
    assert not recomputed
    dleaves = [t.double().requires_grad_() for t in (x, w1, w2, b)]
    mk.monarch_linear(*dleaves, out_features=n_out, activation="gelu", backend="torch").backward(g.double())
    for a, e, name in zip(leaves, dleaves, ("x", "w1", "w2", "bias")):
        assert_close(a.grad, e.grad, torch.float32, f"d{name}")


def test_strided_inputs_and_weights():
    s1, s2 = SHAPES["grouped C=1 runs, ragged p"]
    sh, n_in, n_out, _, w1, w2, b, _ = _data(s1, s2, 9, torch.float32, ragged=False)
    big = torch.randn(30, 2 * sh.n_in, device=DEVICE)
    x = big[::3, ::2]  # row stride 3·2n, column stride 2
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, transposed strides
    expect = ref.monarch_fwd(_d(x), _d(w1), _d(w2), None, sh.n_out)
    for path in _paths(sh):
        assert_close(tmon.forward(x, w1t, w2, None, sh.n_out, path=path), expect, torch.float32, path)
    g = torch.randn(60, 2 * sh.n_out, device=DEVICE)[::6, 1::2]
    dx, dw1, dw2 = tmon.backward(x, g, w1t, w2)
    assert_close(dx, ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), sh.n_in), torch.float32, "dx")
    r1, r2 = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    assert_close(dw1, r1, torch.float32, "dw1")
    assert_close(dw2, r2, torch.float32, "dw2")


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches(T):
    s1, s2 = SHAPES["fused square, group = all 16"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, T, torch.float32)
    for path in _paths(sh):
        out = tmon.forward(x, w1, w2, b, n_out, path=path)
        assert out.shape == (T, n_out)
        if T:
            assert_close(out, ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out), torch.float32, path)
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in)
    assert dx.shape == (T, n_in)
    if T:
        r1, r2 = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
        assert_close(dw1, r1, torch.float32, "dw1")
        assert_close(dw2, r2, torch.float32, "dw2")
    else:
        assert dw1.abs().sum() == 0 and dw2.abs().sum() == 0


def test_backend_through_ops_api_with_autograd():
    """The dispatcher runs the Triton backend (its fused monarch_bwd in first-order backward); grads and
    grads of grads match the torch backend."""
    s1, s2 = SHAPES["grouped C=2 (in-register transpose)"]
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 5, torch.float32)
    assert mk.resolve_backend("monarch", x, w1, w2, backend="triton") == "triton"
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
        out = mk.monarch_linear(*leaves, out_features=n_out, activation="gelu_tanh", backend=backend)
        first = torch.autograd.grad((out * g).sum(), leaves, retain_graph=True)  # first order: monarch_bwd
        grads = torch.autograd.grad((out * g).sum(), leaves, create_graph=True)
        gg = torch.autograd.grad(sum(gr.pow(2).sum() for gr in grads), leaves[:3])
        results[backend] = (out, *first, *grads, *gg)
    for a, c in zip(results["triton"], results["torch"]):
        assert_close(a, c.detach(), torch.float32)


def test_dx_dw1_split_follows_the_cost_model():
    """``dxw="auto"`` takes the fused dx/dw1 kernel where the cost model predicts it fastest (square Monarch,
    blocks ≤ 64) and cuBLAS where its whole-q tile is narrow (GPT-2's fc2: q = 192 padded to 256, 16-wide
    p-tiles); a bad ``dxw`` is refused, and so is ``"bmm"`` with a ragged ``n_in``."""
    from monarch_kernels import cost_model as cm

    assert cm.dxw_choice(cm.Problem.linear(16384, 4096, 4096, 64)) == "fused"
    sh = mk.monarch_factor_shapes(3072, 768, 4)
    assert tmon._model_choice("dxw_choice", 16384, 3072, 768, sh, torch.bfloat16) == "bmm"
    s1, s2 = SHAPES["grouped C=1 runs, ragged p"]
    _, n_in, _, x, w1, w2, _, g = _data(s1, s2, 5, torch.float32)
    with pytest.raises(ValueError, match="dxw must be one of"):
        tmon.backward(x, g, w1, w2, n_in, dxw="both")
    with pytest.raises(ValueError, match="dxw='bmm' needs whole blocks"):
        tmon.backward(x, g, w1, w2, n_in, dxw="bmm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["C=12 runs, whole-row P2 (l=4)", "grouped C=1 runs, ragged p"])
def test_backward_on_cublas_views(dtype, name):
    """``dy``/``dw2`` (``g_layout="bmm"``) and ``dx``/``dw1`` (``dxw="bmm"``) as batched GEMMs on strided views
    of the token-major ``g``, ``dy``, ``z`` and of ``x``, ``dx``: every combination against the float64
    reference, per element, over 300 tokens, NaN in one token of ``g`` propagating as the reference's, from a
    strided ``x``; ``backward_weight`` too. The intermediate buffers are poisoned (fixture): every element
    written."""
    s1, s2 = SHAPES[name]
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 300, dtype, ragged=False, seed=9)
    x = x.t().contiguous().t()  # column-major x
    g = g.clone()
    g[17, 3] = math.nan
    want_dx = ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in)
    want_dw = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    for g_layout in ("bmm", "token_major"):
        for dxw in ("bmm", "fused"):
            dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in, g_layout=g_layout, dxw=dxw)
            for what, got, want in (("dx", dx, want_dx), ("dw1", dw1, want_dw[0]), ("dw2", dw2, want_dw[1])):
                assert got.dtype == dtype
                assert_close(got, want, dtype, f"{name} {g_layout}/{dxw} {what}")
    for got, want in zip(tmon.backward_weight(x, g, w1, w2, g_layout="bmm"), want_dw):
        assert_close(got, want, dtype, f"{name} backward_weight bmm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_on_the_widest_half_precision_tiles(dtype):
    """Square 512 -> 512 in 8 blocks of 64 read ``g`` through P2ᵀ in groups of all 8 blocks: ``dy`` takes the
    full register budget (a gathered 16-bit input with a token-major output: 64 x 64 per block) and ``dw2``
    the weight-gradient kernel's widest interleaved tile (16 x 64 per block, 8 warps). Both against the float64
    reference per element, over a ragged 200 tokens split across programs, NaN in one token of ``g``."""
    s1 = s2 = (8, 64, 64)
    sh, n_in, n_out, x, w1, w2, _, g = _data(s1, s2, 200, dtype, ragged=False, seed=13)
    dy_plan = plan.bd_launch(200, sh.l, sh.r, sh.s, 2, (sh.s, sh.l), (sh.r, sh.l), out_token_major=True)
    assert (dy_plan.tile.block_m, dy_plan.tile.block_n, dy_plan.tile.group) == (64, 64, 8)
    dw2_plan = plan.wgrad_launch(200, sh.l, sh.s, sh.r, 2, (sh.s, sh.l), 132)
    assert (dw2_plan.tile.block_m, dw2_plan.tile.block_n, dw2_plan.tile.num_warps) == (16, 64, 8)
    g = g.clone()
    g[31, 5] = math.nan
    want_dw = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in, g_layout="row_major")
    assert_close(dx, ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in), dtype, "dx")
    assert_close(dw1, want_dw[0], dtype, "dw1")
    assert_close(dw2, want_dw[1], dtype, "dw2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_wide_single_block_tiles(dtype):
    """Stage 1 with 192-wide blocks written token-major takes 128 x 128 tiles (192 padded to 256: the padded
    columns must be neither stored nor mixed in), as GPT-2's 4-block layers do: forward with bias and GELU and
    the backward against the float64 reference per element, over a ragged 200 tokens."""
    s1, s2 = (4, 192, 24), (4, 40, 192)
    sh, n_in, n_out, x, w1, w2, b, g = _data(s1, s2, 200, dtype, ragged=True, seed=17)
    lp = plan.bd_launch(200, sh.k, sh.q, sh.p, 2, None, (sh.l, sh.r), out_token_major=True)
    assert (lp.tile.block_m, lp.tile.block_n, lp.tile.group) == (128, 128, 1)
    assert_close(tmon.forward(x, w1, w2, b, n_out, "gelu", path="two_kernel"),
                 ref.monarch_fwd(_d(x), _d(w1), _d(w2), _d(b), n_out, "gelu"), dtype, "forward")
    want_dw = ref.monarch_bwd_weight(_d(x), _d(g), _d(w1), _d(w2))
    dx, dw1, dw2 = tmon.backward(x, g, w1, w2, n_in, g_layout="row_major", dxw="separate")
    assert_close(dx, ref.monarch_bwd_input(_d(g), _d(w1), _d(w2), n_in), dtype, "dx")
    assert_close(dw1, want_dw[0], dtype, "dw1")
    assert_close(dw2, want_dw[1], dtype, "dw2")


def test_path_choice_and_validation():
    sh = mk.MonarchShape.from_factors((4, 5, 8), (4, 6, 5))
    with pytest.raises(ValueError, match="fused Monarch path needs"):
        tmon.choose_path(sh, "fused")
    with pytest.raises(ValueError, match="path must be one of"):
        tmon.choose_path(sh, "magic")
    assert tmon.choose_path(sh) == "two_kernel"
    shape = lambda n, nb: mk.monarch_factor_shapes(n, n, nb)
    assert tmon.choose_path(shape(1024, 32)) == "fused"  # square, c = 1, fits on chip
    assert tmon.choose_path(shape(4096, 64)) == "two_kernel"  # intermediate too large for a register tile
    assert tmon.choose_path(mk.monarch_factor_shapes(768, 3072, 4)) == "two_kernel"  # c = 48


def test_monarch_linear_layouts_get_coalesced_permutations():
    """Every MonarchLinear layout of the benchmark shapes moves its permuted runs as ≥ 32 contiguous bytes
    (grouped layout), in bf16 and fp32."""
    for n_in, n_out, nb in [(1024, 1024, 32), (2048, 2048, 32), (4096, 4096, 64), (768, 3072, 4), (3072, 768, 4)]:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        for item in (2, 4):
            launches = [plan.bd_launch(4096, sh.k, sh.q, sh.p, item, None, (sh.l, sh.r)),  # stage 1, P1
                        plan.bd_launch(4096, sh.l, sh.s, sh.r, item, None, (sh.s, sh.l)),  # stage 2, P2
                        plan.bd_launch(4096, sh.l, sh.r, sh.s, item, (sh.s, sh.l), (sh.r, sh.l))]  # dy
            for lp in launches:
                for lay, full in ((lp.out, lp.out_full), (lp.inp, lp.in_full)):
                    if lay.mode != plan.NATURAL:
                        assert lay.mode == plan.GROUPED, (n_in, n_out, nb, lay)
                        assert full or lay.group * lay.c * item >= plan.RUN_BYTES, (n_in, n_out, nb, lay)
