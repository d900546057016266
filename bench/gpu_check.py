"""One prepared GPU check: probes, correctness of every GPU kernel against float64, timings, cost-model predictions.

``python3 -m bench.gpu_check --out DIR`` (what ``bench/gpu_check.sh`` runs on a lent H100/H200, with the machine's
own python, CUDA torch and triton, no network) runs *case providers* in order; every case yields result rows that
are printed and appended to ``DIR/gpu_check.jsonl`` as soon as they are measured, so a run cut short by a
time limit still leaves its data. Providers (``--only`` / ``--skip`` select by name):

* ``env``: device, versions, backends; ``probes``: copy bandwidth, an L2-resident copy bandwidth (the cost
  model's least certain constant) and a large cuBLAS GEMM (its dense rate);
* ``chain``: the chained (one-launch) two-kernel forward first, in a child process with a time limit, against
  the same forward as separate launches; if it fails or hangs the rest of the run uses separate launches;
* ``correctness``: forward (bias; one case with GELU), fused backward and dX of the Triton backend against
  the float64 reference on the same device, per element (``max |a − e| / max |e|``), outputs poisoned with NaN;
* ``timing``: dense ``F.linear``, the torch reference and every fast backend, forward and forward+backward
  (:func:`bench.ops.run_problem`), wall time (``us``, which waits for the host: ~300 µs per Triton forward on
  an H200) and kernel time alone (``device_us``, ``torch.profiler``), next to the cost model's prediction for
  the path ``auto`` takes (the device's constants, :func:`monarch_kernels.cost_model.device_for`);
* ``paths``: fused vs two-kernel forward, the two-kernel forward with each stage-2 store (grouped, token-major
  plus a transposing copy) and with L2 token chunks (the chained schedule), each beside the model's price; the
  backward with dx/dw1 fused, as two kernels or on cuBLAS and with ``g`` as given, token-major or read by
  cuBLAS, next to the cost model's picks; wall and device times;
* ``mlp``: the GPT-2 MLP (``768 -> 3072 -> 768``, GELU) forward and training step, dense vs Monarch.

Tile configurations are the launch plans' (``monarch_kernels/triton/plan.py``): nothing is autotuned unless
``--autotune`` (times alternative row tiles of the block-diagonal kernel at one shape). The shapes are chosen so
the whole run compiles at most :data:`MAX_COMPILES` Triton kernels; ``--dry-run`` (no GPU needed) runs every
case on ``meta`` tensors with launches intercepted and prints how many distinct kernels it would compile
(tests/bench/test_gpu_check_smoke.py checks the count). ``--smoke`` runs tiny shapes on the CPU through the
Triton interpreter.

Another backend adds its cases with :func:`register_provider` (a function ``ctx -> iterable of (name, fn)``
where ``fn()`` returns one row dict or a list of them), e.g. the CUDA decode kernels of ``csrc/cuda``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

import monarch_kernels as mk
from monarch_kernels import cost_model as cm
from monarch_kernels import reference as ref

from . import ops
from .timing import copy_bandwidth_gbs, device_name, device_time_us, median_time_us

#: the device run compiles at most this many Triton kernels (SPEC §5: the check fits one 10-minute call)
MAX_COMPILES = 60
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: (T, n_in, n_out, nblocks): correctness in bf16 on each, fp16/fp32 on the first two; GPT-2's fc1 (its GELU
#: epilogue and eager training) at the MLP row's 16384 tokens, whose tiles that row's layers then reuse (the
#: compile limit)
CHECK_SHAPES = [(4096, 4096, 4096, 64), (4096, 1024, 1024, 32), (16384, 768, 3072, 4), (4096, 3072, 768, 4),
                (2048, 2048, 2048, 32), (333, 1000, 3000, 4), (16, 4096, 4096, 64)]
TIMING_SHAPES = ["16384:1024:1024:32", "16384:2048:2048:32", "16384:4096:4096:64", "65536:4096:4096:64",
                 "16384:768:3072:4", "16384:3072:768:4", "16:4096:4096:64"]
SMOKE_CHECK = [(9, 48, 192, 4)]
SMOKE_TIMING = ["8:256:256:16"]
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Context:
    """What a case needs: the device, the mode, where rows go."""

    device: torch.device
    smoke: bool = False
    dry_run: bool = False
    autotune: bool = False
    budget_s: float = 0.1
    jsonl: Optional[str] = None
    rows: list = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def rand(self, *shape, dtype=torch.bfloat16, scale=1.0, gen=None) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(dtype=dtype).to(self.device)

    def time_us(self, fn: Callable[[], object]) -> float:
        if self.dry_run or self.smoke:
            return _once(fn)
        return median_time_us(fn, self.device, budget_s=self.budget_s)

    def device_us(self, fn: Callable[[], object]) -> float:
        """Kernel time alone (:func:`bench.timing.device_time_us`); the smoke and dry runs call ``fn`` once (nan)."""
        if self.dry_run or self.smoke:
            fn()
            return math.nan
        return device_time_us(fn)

    def emit(self, case: str, row: dict) -> None:
        row = {"case": case, "t_s": round(time.time() - self.started, 1), **row}
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")


def _once(fn: Callable[[], object], *args, **kwargs) -> float:
    """One call, wall time in µs: the smoke and dry runs check the script, not the numbers."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


Provider = Callable[[Context], Iterable[tuple]]
PROVIDERS: list[tuple[str, Provider, bool]] = []


def register_provider(name: str, provider: Provider, needs_extension: bool = False) -> None:
    """Add a case provider (run after the built-in ones, in registration order). ``needs_extension``: its
    cases use the compiled ``monarch_kernels._C`` (the ``cuda`` backend); ``gpu_check.sh`` runs those in a
    second process once the extension build it starts in the background has finished (``--after-build``)."""
    PROVIDERS.append((name, provider, needs_extension))


def element_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a − e| / max |e|`` over the finite expected elements; ``inf`` if the non-finite positions differ
    or an element was not written."""
    if actual.device.type == "meta":  # dry run: nothing was computed
        return math.nan
    a, e = actual.double(), expected.double()
    if a.shape != e.shape or not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        return math.inf
    fin = torch.isfinite(e)
    if not fin.any():
        return 0.0
    return ((a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp_min(1e-30)).item()


def _poison_allocations():
    """Every buffer the Triton kernels allocate starts as NaN (an unwritten element fails the comparison)."""
    from monarch_kernels.triton import _common

    _common.empty = lambda *shape, device, dtype: torch.full(shape, math.nan, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------ providers


def env_cases(ctx: Context):
    def run():
        import triton

        return {"device": device_name(ctx.device), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "backends": mk.available_backends()}
    yield "env", run


def probe_cases(ctx: Context):
    if ctx.dry_run:
        return
    big = (1 << 20) if ctx.smoke else (1 << 30)
    yield "copy bandwidth", lambda: {"copy_GBps": _sig(copy_bandwidth_gbs(ctx.device, nbytes=big))}

    def l2_copy():
        # 8 MB copied into another 8 MB buffer, both resident in L2, kernel time alone (torch.profiler): bytes
        # read plus written per second from L2. (A per-call event timing of a 16 MB sum, this probe's first
        # version, measured 644 GB/s on an H200: the launch and the reduction, not the L2.)
        n = (1 << 18) if ctx.smoke else (8 << 20) // 2
        src = torch.ones(n, dtype=torch.bfloat16, device=ctx.device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)
        us = ctx.device_us(fn) if ctx.device.type == "cuda" else median_time_us(fn, ctx.device, budget_s=ctx.budget_s)
        return {"l2_copy_GBps": _sig(4 * n / (us * 1e-6) / 1e9), "bytes": 4 * n}
    yield "L2 copy bandwidth (2 x 8 MB, kernel time)", l2_copy

    def gemm():
        n = 256 if ctx.smoke else 8192
        a, b = ctx.rand(n, n), ctx.rand(n, n)
        us = ctx.time_us(lambda: a @ b)
        return {"dense_TFLOPs": _sig(2 * n**3 / (us * 1e-6) / 1e12), "n": n, "dtype": "bfloat16"}
    yield "dense GEMM rate", gemm


def _sig(v: float) -> float:
    """Four significant digits (a slow CPU smoke run measures small numbers that must not round to 0)."""
    return float(f"{v:.4g}")


#: the chained forward runs first in a child process with this time limit (s): if its in-kernel waits never
#: resolved on the device, the child is killed and the rest of the run takes separate launches, not a hang
CHAIN_PROBE_S = 120
#: (T, n_in, n_out, nblocks): the chained forward's probe (the first correctness case's forward, so its compile
#: is reused); the smoke run's, with a 64 KB L2 so that it has several chunks
CHAIN_SHAPE, SMOKE_CHAIN_SHAPE = (4096, 4096, 4096, 64), (300, 48, 192, 4)


def chain_probe(smoke: bool = False, dry_run: bool = False) -> dict:
    """One chained two-kernel forward (``plan.CHUNK_IN_L2`` on, ``plan.ONE_LAUNCH``: token chunks ordered by
    in-kernel waits) against
    the same forward as separate launches, bit for bit, and against float64; its counters at the end (every
    chunk's stage-1 and stage-2 tiles counted, no dependency found missing)."""
    from monarch_kernels.triton import _common
    from monarch_kernels.triton import blockdiag as tbd
    from monarch_kernels.triton import monarch as tmon
    from monarch_kernels.triton import plan

    T, n_in, n_out, nb = SMOKE_CHAIN_SHAPE if smoke else CHAIN_SHAPE
    dtype = torch.float32 if smoke else torch.bfloat16
    device = torch.device("meta" if dry_run else "cuda" if torch.cuda.is_available() else "cpu")
    sh = mk.monarch_factor_shapes(n_in, n_out, nb)
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)
    x, w1, w2 = rnd(T, n_in), rnd(*sh.w1_shape, scale=sh.p ** -0.5), rnd(*sh.w2_shape, scale=sh.r ** -0.5)
    counters = []
    real = tbd.chain_counters
    small_l2 = {"device_info": lambda dev: plan.DeviceInfo(num_sms=4, l2_bytes=64 * 1024)} if smoke else {}
    with _patched(tbd, chain_counters=lambda n, dev: counters.append(real(n, dev)) or counters[-1]), \
            _patched(_common, **small_l2), _patched(plan, CHUNK_IN_L2=True):
        chained = tmon.forward(x, w1, w2, None, n_out, path="two_kernel")
        with _patched(plan, ONE_LAUNCH=False):
            separate = tmon.forward(x, w1, w2, None, n_out, path="two_kernel")
    row = {"shape": f"T={T} {n_in}->{n_out} nb={nb}", "dtype": DTYPE_NAMES[dtype], "launches": len(counters)}
    if dry_run:
        return {**row, "ok": True}
    c = counters[0].tolist() if counters else []
    chunks = (len(c) - 2) // 2
    exact = ref.monarch_fwd(x.double(), w1.double(), w2.double(), None, n_out)
    row.update(chunks=chunks, counters=c, chain_vs_separate=f"{element_error(chained, separate):.1e}",
               chain_vs_float64=f"{element_error(chained, exact):.1e}")
    per_chunk = c[1:1 + chunks] + c[1 + chunks:1 + 2 * chunks]
    row["ok"] = (len(counters) == 1 and chunks > 1 and torch.equal(chained, separate) and c[-1] == 0
                 and c[0] == chunks * (c[1] + c[1 + chunks]) and len(set(c[1:1 + chunks])) == 1
                 and len(set(c[1 + chunks:1 + 2 * chunks])) == 1 and min(per_chunk) > 0)
    return row


def chain_cases(ctx: Context):
    """:func:`chain_probe` before anything else runs the chained forward: on a GPU in a child process that is
    killed after :data:`CHAIN_PROBE_S` seconds; if it fails or hangs, ``plan.ONE_LAUNCH`` is switched off for
    the rest of this run (and the row says so), so one stuck kernel does not cost the whole device call."""
    def run():
        if ctx.dry_run or ctx.smoke or ctx.device.type != "cuda":
            return chain_probe(ctx.smoke, ctx.dry_run)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--chain-probe"], capture_output=True,
                                 text=True, cwd=root, timeout=CHAIN_PROBE_S)
            last = (res.stdout.strip().splitlines() or [""])[-1]
            row = json.loads(last) if res.returncode == 0 and last.startswith("{") else {
                "ok": False, "failure": f"exit {res.returncode}: {(res.stdout + res.stderr)[-400:]}"}
        except subprocess.TimeoutExpired:
            row = {"ok": False, "failure": f"no result within {CHAIN_PROBE_S} s (waits never resolved?)"}
        if not row.get("ok"):
            from monarch_kernels.triton import plan

            plan.ONE_LAUNCH = False
            row["rest_of_run"] = "plan.ONE_LAUNCH = False (separate launches)"
        return row
    yield "chain", run


def correctness_cases(ctx: Context):
    from monarch_kernels import triton as tb

    shapes = SMOKE_CHECK if ctx.smoke else CHECK_SHAPES
    gen = torch.Generator().manual_seed(1234)
    for i, (T, n_in, n_out, nb) in enumerate(shapes):
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        dtypes = [torch.float32] if ctx.smoke else (
            [torch.bfloat16, [torch.float16, torch.float32][i]] if i < 2 else [torch.bfloat16])
        for dtype in dtypes:
            def run(T=T, n_in=n_in, n_out=n_out, nb=nb, sh=sh, dtype=dtype):
                r = lambda *s, scale=1.0: ctx.rand(*s, dtype=dtype, scale=scale, gen=gen)
                x, g, b = r(T, n_in), r(T, n_out), r(n_out)
                w1, w2 = r(*sh.w1_shape, scale=sh.p ** -0.5), r(*sh.w2_shape, scale=sh.r ** -0.5)
                d = lambda t: t.double()
                # bias and GELU on the GPT-2 shape; the others as the timings run them (no epilogue), so the
                # timings reuse these compiles
                epi = (n_in, n_out, nb) == (768, 3072, 4)
                bias, act = (b, "gelu") if epi else (None, "none")
                fwd_ref = ref.monarch_fwd(d(x), d(w1), d(w2), d(b) if epi else None, n_out, act)
                errs = {"fwd": element_error(tb.monarch_fwd(x, w1, w2, bias, n_out, act), fwd_ref)}
                if epi:  # eager training: the forward keeps z and the pre-activation, the backward uses them
                    out_s, z, pre = tb.monarch_fwd_saving(x, w1, w2, bias, n_out, act)
                    got = tb.monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, act, True, z, True, pre)
                    want = ref.monarch_bwd_epilogue(d(x), d(g), d(w1), d(w2), d(b), n_in, act, True)
                    errs["fwd_saving"] = element_error(out_s, fwd_ref)
                    errs.update({f"train_{k}": element_error(a, e) for k, a, e in zip(("dx", "dw1", "dw2", "db"),
                                                                                      got, want)})
                dx, dw1, dw2 = tb.monarch_bwd(x, g, w1, w2, n_in)
                r1, r2 = ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2))
                dx_ref = ref.monarch_bwd_input(d(g), d(w1), d(w2), n_in)
                errs.update(dx=element_error(dx, dx_ref), dw1=element_error(dw1, r1), dw2=element_error(dw2, r2))
                if _path(sh) == "fused" and dtype == torch.bfloat16:  # eager training: the kept z feeds dw2
                    # (the configuration the bf16 training timing compiles anyway)
                    _, z, _ = tb.monarch_fwd_saving(x, w1, w2, None, n_out, "none")
                    errs["train_dw2"] = element_error(
                        tb.monarch_bwd_epilogue(x, g, w1, w2, None, n_in, "none", False, z, True)[2], r2)
                if i == 0:  # dX alone (double backward): the stage-1 transpose kernel
                    errs["dx_alone"] = element_error(tb.monarch_bwd_input(g, w1, w2, n_in), dx_ref)
                ok = ctx.dry_run or all(e <= TOL[dtype] for e in errs.values())
                return {"shape": f"T={T} {n_in}->{n_out} nb={nb}", "dtype": DTYPE_NAMES[dtype], "impl": "triton",
                        "path": _path(sh),
                        "epilogue": "bias+gelu" if epi else "none", **{k: f"{v:.1e}" for k, v in errs.items()},
                        "ok": ok}
            yield "correctness", run


def _path(sh) -> str:
    from monarch_kernels.triton import monarch as tmon

    return tmon.choose_path(sh)


def timing_cases(ctx: Context):
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    state = {}

    def copy_gbs():
        if "copy" not in state:
            prior = [r.get("copy_GBps") for r in ctx.rows if "copy_GBps" in r]
            state["copy"] = prior[0] if prior else (1.0 if ctx.dry_run else copy_bandwidth_gbs(ctx.device))
        return state["copy"]

    for text in (SMOKE_TIMING if ctx.smoke else TIMING_SHAPES):
        def run(text=text):
            prob = ops.Problem.parse(text)
            impls = ["dense", "torch", *_fast_backends(ctx, dtype)]
            timer = ops.median_time_us
            if ctx.smoke or ctx.dry_run:
                ops.median_time_us = _once
            try:
                rows = ops.run_problem(prob, dtype, ctx.device, impls, ["fwd", "fwdbwd"], copy_gbs(), ctx.budget_s)
            finally:
                ops.median_time_us = timer
            pr = cm.Problem.linear(prob.tokens, prob.n_in, prob.n_out, prob.nblocks)
            dev = cm.device_for(device_name(ctx.device))
            out = []
            for r in rows:
                row = r.asdict()
                if r.impl == "triton":
                    op = "fwd" if r.mode == "fwd" else "fwdbwd"
                    row["path"] = cm.triton_path(pr, DTYPE_NAMES[dtype], dev)
                    row["predicted_us"] = round(cm.estimate("triton", row["path"], op, pr, DTYPE_NAMES[dtype],
                                                            dev).time(dev) * 1e6, 1)
                    row["predicted_dense_us"] = round(cm.dense(op, pr, DTYPE_NAMES[dtype], dev).time(dev) * 1e6, 1)
                out.append(row)
            return out
        yield "timing", run


def _fast_backends(ctx: Context, dtype) -> list[str]:
    if ctx.dry_run:
        return ["triton"]
    return [n for n, s in mk.available_backends().items()
            if s == "available" and n != "torch" and mk.backends.get(n).supports(ctx.device, dtype)]


@contextlib.contextmanager
def _patched(module, **values):
    """``module``'s attributes set to ``values`` for the block (a plan variant), restored afterwards."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def path_cases(ctx: Context):
    from monarch_kernels.triton import monarch as tmon
    from monarch_kernels.triton import plan

    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    shapes = [(8, 256, 256, 16)] if ctx.smoke else [(16384, 1024, 1024, 32), (16384, 4096, 4096, 64),
                                                     (65536, 4096, 4096, 64), (16384, 768, 3072, 4)]
    for T, n_in, n_out, nb in shapes:
        def run(T=T, n_in=n_in, n_out=n_out, nb=nb):
            sh = mk.monarch_factor_shapes(n_in, n_out, nb)
            x, w1, w2 = ctx.rand(T, n_in, dtype=dtype), ctx.rand(*sh.w1_shape, dtype=dtype), ctx.rand(*sh.w2_shape,
                                                                                                         dtype=dtype)
            row = {"shape": f"T={T} {n_in}->{n_out} nb={nb}", "dtype": DTYPE_NAMES[dtype]}
            for path in ("fused", "two_kernel"):
                if tmon.path_applies(sh, path):
                    fn = lambda p=path: tmon.forward(x, w1, w2, None, n_out, path=p)
                    row[f"{path}_us"] = round(ctx.time_us(fn), 1)
                    row[f"{path}_device_us"] = round(ctx.device_us(fn), 1)
            dev = cm.device_for(device_name(ctx.device))
            pr = cm.Problem.linear(T, n_in, n_out, nb)
            real_choice = tmon._model_choice

            def variant(name: str, store: str = "auto", **plan_values):
                """``two_kernel_<name>_us`` (wall) and ``_device_us`` with the stage-2 store forced and the plan
                patched, beside the cost model's price of that plan (``_predicted_us``)."""
                if store != "auto":
                    tmon._model_choice = lambda q, *a, **k: (store if q.startswith("stage2_store")
                                                             else real_choice(q, *a, **k))
                try:
                    with _patched(plan, **plan_values):
                        fn = lambda: tmon.forward(x, w1, w2, None, n_out, path="two_kernel")
                        row[f"two_kernel_{name}_us"] = round(ctx.time_us(fn), 1)
                        row[f"two_kernel_{name}_device_us"] = round(ctx.device_us(fn), 1)
                        cost = (cm.estimate("triton", "two_kernel", "fwd", pr, DTYPE_NAMES[dtype], dev)
                                if store == "auto" else cm._two_kernel_forward(pr, DTYPE_NAMES[dtype], dev, False,
                                                                               store))
                        row[f"two_kernel_{name}_predicted_us"] = round(cost.time(dev) * 1e6, 1)
                finally:
                    tmon._model_choice = real_choice

            row["model_store"] = cm.stage2_store(pr, DTYPE_NAMES[dtype], dev)
            for store in plan.stage2_stores(T, T, False):
                variant(f"{store}_store", store)
            if nb == 64:  # the chained schedule of L2-sized token chunks (off by default: 1.9x the device time
                variant("chunked", CHUNK_IN_L2=True)  # on an H200 at 16384 x 4096/64; the compile limit: here only)
            return row
        yield "paths", run
    # backward: dx and dw1 from the fused kernel, from two or from cuBLAS; g as given, token-major or read by cuBLAS;
    # next to the model's picks
    bshapes = [(8, 256, 256, 16)] if ctx.smoke else [(16384, 4096, 4096, 64), (16384, 768, 3072, 4),
                                                      (16384, 3072, 768, 4)]
    for T, n_in, n_out, nb in bshapes:
        def run_bwd(T=T, n_in=n_in, n_out=n_out, nb=nb):
            sh = mk.monarch_factor_shapes(n_in, n_out, nb)
            x, g = ctx.rand(T, n_in, dtype=dtype), ctx.rand(T, n_out, dtype=dtype)
            w1, w2 = ctx.rand(*sh.w1_shape, dtype=dtype), ctx.rand(*sh.w2_shape, dtype=dtype)
            row = {"shape": f"T={T} {n_in}->{n_out} nb={nb}", "dtype": DTYPE_NAMES[dtype],
                   "model_picks": tmon._model_choice("dxw_choice", T, n_in, n_out, sh, dtype)}
            # dx and dw1: one Triton kernel, two, or two cuBLAS batched GEMMs on strided views
            for dxw in ("fused", "separate", "bmm"):
                fn = lambda d=dxw: tmon.backward(x, g, w1, w2, n_in, dxw=d)
                row[f"bwd_{dxw}_dxw_us"] = round(ctx.time_us(fn), 1)
                row[f"bwd_{dxw}_dxw_device_us"] = round(ctx.device_us(fn), 1)
            # g read by dy and dw2 as given (grouped gathers), copied token-major first (plain Triton tiles), or
            # copied and read by cuBLAS
            row["model_picks_g"] = tmon._model_choice("g_readers", T, n_in, n_out, sh, dtype)
            for layout in ("row_major", "token_major", "bmm"):
                fn = lambda lay=layout: tmon.backward(x, g, w1, w2, n_in, g_layout=lay)
                row[f"bwd_g_{layout}_us"] = round(ctx.time_us(fn), 1)
                row[f"bwd_g_{layout}_device_us"] = round(ctx.device_us(fn), 1)
            return row
        yield "paths", run_bwd
    if ctx.autotune and not ctx.smoke:
        yield from _autotune_cases(ctx, dtype)


def _autotune_cases(ctx: Context, dtype):
    """Alternative row tiles / warps of the grouped block-diagonal kernel, 4096 wide with 64 blocks (extra
    compiles: only with ``--autotune``)."""
    from monarch_kernels.triton import monarch as tmon
    from monarch_kernels.triton import plan

    sh = mk.monarch_factor_shapes(4096, 4096, 64)
    x, w1, w2 = ctx.rand(16384, 4096, dtype=dtype), ctx.rand(*sh.w1_shape, dtype=dtype), ctx.rand(*sh.w2_shape,
                                                                                                 dtype=dtype)
    default = plan.bd_tile
    for block_m, warps in ((32, 4), (64, 8), (64, 16), (128, 16)):
        def run(block_m=block_m, warps=warps):
            def tile(tokens, nblocks, n, k, itemsize, group, acc_fp32, **kw):
                t = default(tokens, nblocks, n, k, itemsize, group, acc_fp32, **kw)
                return plan.Tile(block_m, t.block_n, t.block_k, t.group, warps, t.num_stages)
            plan.bd_tile = tile
            try:
                us = ctx.time_us(lambda: tmon.forward(x, w1, w2, None, 4096, path="two_kernel"))
            finally:
                plan.bd_tile = default
            return {"shape": "T=16384 4096 nb=64", "block_m": block_m, "num_warps": warps, "us": round(us, 1)}
        yield "autotune", run


def mlp_cases(ctx: Context):
    """GPT-2 MLP ``fc2(gelu(fc1(x)))`` forward and training step: dense vs every fast backend (MonarchLinear
    semantics through the functional API, GELU fused into fc1's epilogue); and, for a backend with a fused MLP
    (Triton's hidden layer on chip, ``mk.monarch_mlp``), its forward and training step (``<backend>_mlp``: the
    output's and every gradient's error against float64 per element, the times, the model's predictions)."""
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    T, d, nb = (8, 64, 4) if ctx.smoke else (16384, 768, 4)

    def run():
        s1, s2 = mk.monarch_factor_shapes(d, 4 * d, nb), mk.monarch_factor_shapes(4 * d, d, nb)
        r = lambda *s: ctx.rand(*s, dtype=dtype, scale=0.05)
        x, gy = r(T, d), r(T, d)
        dense = [r(4 * d, d), r(4 * d), r(d, 4 * d), r(d)]
        mon = [r(*s1.w1_shape), r(*s1.w2_shape), r(4 * d), r(*s2.w1_shape), r(*s2.w2_shape), r(d)]
        variants = {"dense": (lambda p: F.linear(F.gelu(F.linear(x, p[0], p[1])), p[2], p[3]), dense)}
        for b in _fast_backends(ctx, dtype) + ["torch"]:
            variants[b] = (lambda p, b=b: mk.monarch_linear(
                mk.monarch_linear(x, p[0], p[1], p[2], activation="gelu", backend=b), p[3], p[4], p[5], backend=b), mon)
        row = {"shape": f"MLP T={T} {d}->{4 * d}->{d} nb={nb}", "dtype": DTYPE_NAMES[dtype]}
        fused = [b for b in _fast_backends(ctx, dtype) if hasattr(mk.backends.impl(b), "monarch_mlp_fwd")]
        for b in fused:
            fn = lambda p, b=b: mk.monarch_mlp(x, p[0], p[1], p[3], p[4], p[2], p[5], backend=b)
            with torch.no_grad():
                out = fn(mon)
                if not ctx.dry_run:
                    w = [t.double() for t in mon]
                    hidden = ref.monarch_fwd(x.double(), w[0], w[1], w[2], 4 * d, "gelu")
                    row[f"{b}_mlp_err"] = _sig(element_error(out, ref.monarch_fwd(hidden, w[3], w[4], w[5], d)))
                row[f"{b}_mlp_fwd_us"] = round(ctx.time_us(lambda: fn(mon)), 1)
                row[f"{b}_mlp_fwd_device_us"] = round(ctx.device_us(lambda: fn(mon)), 1)
            # training: the fused backward's gradients against float64 autograd through the reference's layers
            xg = x.detach().requires_grad_(True)
            for p in mon:
                p.requires_grad_(True)
            mk.monarch_mlp(xg, mon[0], mon[1], mon[3], mon[4], mon[2], mon[5], backend=b).backward(gy)
            if not ctx.dry_run:
                got = [xg.grad] + [p.grad for p in mon]
                xd = x.double().requires_grad_(True)
                w = [t.detach().double().requires_grad_(True) for t in mon]
                mk.monarch_mlp(xd, w[0], w[1], w[3], w[4], w[2], w[5], backend="torch").backward(gy.double())
                row[f"{b}_mlp_grad_err"] = _sig(max(element_error(a, e.grad) for a, e in zip(got, [xd] + w)))
            for p in mon:
                p.grad = None
            row[f"{b}_mlp_step_us"] = round(ctx.time_us(lambda: fn(mon).backward(gy)), 1)
            row[f"{b}_mlp_step_device_us"] = round(ctx.device_us(lambda: fn(mon).backward(gy)), 1)
            for p in mon:
                p.requires_grad_(False)
                p.grad = None
        for name, (fn, params) in variants.items():
            with torch.no_grad():
                row[f"{name}_fwd_us"] = round(ctx.time_us(lambda: fn(params)), 1)
                row[f"{name}_fwd_device_us"] = round(ctx.device_us(lambda: fn(params)), 1)
            for p in params:
                p.requires_grad_(True)
            row[f"{name}_step_us"] = round(ctx.time_us(lambda: fn(params).backward(gy)), 1)
            row[f"{name}_step_device_us"] = round(ctx.device_us(lambda: fn(params).backward(gy)), 1)
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        for name in variants:
            if name != "dense" and not ctx.dry_run:
                for what in ("fwd", "step", "fwd_device", "step_device"):
                    if not ctx.smoke:
                        row[f"{name}_x_dense_{what}"] = round(row[f"dense_{what}_us"] / row[f"{name}_{what}_us"], 2)
        for b in fused:
            if not ctx.dry_run and not ctx.smoke:
                for what in ("fwd", "fwd_device", "step", "step_device"):
                    row[f"{b}_mlp_x_dense_{what}"] = round(row[f"dense_{what}_us"] / row[f"{b}_mlp_{what}_us"], 2)
                dev = cm.device_for(device_name(ctx.device))
                fc1 = cm.Problem.linear(T, d, 4 * d, nb, "gelu", bias=True)  # both layers have a bias here
                fc2 = cm.Problem.linear(T, 4 * d, d, nb, bias=True)
                row[f"{b}_mlp_pred_us"] = round(cm.mlp_forward(fc1, fc2, DTYPE_NAMES[dtype], dev).time(dev) * 1e6, 1)
                row[f"{b}_mlp_step_pred_us"] = round(
                    cm.mlp_training_step(fc1, fc2, DTYPE_NAMES[dtype], dev).time(dev) * 1e6, 1)
        return row
    yield "mlp", run


for _name, _provider in (("env", env_cases), ("probes", probe_cases), ("chain", chain_cases),
                         ("correctness", correctness_cases),
                         ("timing", timing_cases), ("paths", path_cases), ("mlp", mlp_cases)):
    register_provider(_name, _provider)

from .cuda_decode import gpu_check_cases as _cuda_decode_cases  # noqa: E402  (csrc/cuda decode kernels)

register_provider("cuda_decode", _cuda_decode_cases, needs_extension=True)

from .cuda_resident import gpu_check_cases as _cuda_resident_cases  # noqa: E402  (csrc/cuda resident kernel)

register_provider("cuda_resident", _cuda_resident_cases, needs_extension=True)


# ------------------------------------------------------------------------------------------ running


def run(ctx: Context, only: Optional[list[str]] = None, skip: Optional[list[str]] = None,
        after_build: Optional[bool] = None) -> list[dict]:
    """Run the providers in order (``after_build``: only those that need the extension, or only those that
    do not; ``None``: all), emitting every row as it comes."""
    for name, provider, needs_extension in PROVIDERS:
        if (only and name not in only) or (skip and name in skip):
            continue
        if after_build is not None and needs_extension != after_build and name != "env":
            continue
        for case, fn in provider(ctx):
            try:
                result = fn()
            except Exception as exc:  # one failing case must not lose the rest of the run
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            for row in result if isinstance(result, list) else [result]:
                ctx.emit(case, row)
    return ctx.rows


@dataclass
class DryRun:
    """Kernels a run would compile, counted without compiling (``offline.compile_only(count_only=True)``)."""

    keys: set = field(default_factory=set)


def dry_run(only=None, skip=None, autotune: bool = False) -> DryRun:
    """Run every case on ``meta`` tensors, the Triton backend standing in for a CUDA device, launches
    intercepted and counted by compile key; nothing is timed or compiled (``autotune``: the ``--autotune``
    cases too)."""
    from bench.kernel_audit.offline import compile_only
    from bench.kernel_audit.triton_part import h100_host
    from monarch_kernels import triton as tb

    backend = mk.backends.get("triton")
    saved = backend.supports, backend._module, backend._loaded, backend._error
    backend.supports = lambda device, dtype: dtype in (torch.float16, torch.bfloat16, torch.float32)
    backend._module, backend._loaded, backend._error = tb, True, None
    ctx = Context(torch.device("meta"), dry_run=True, autotune=autotune)
    result = DryRun()
    randn = torch.randn  # random data of benchmark sizes would take minutes on a CPU: shapes only
    torch.randn = lambda *shape, generator=None, **kw: torch.empty(*shape, device="meta", **kw)
    try:
        with h100_host(), compile_only(count_only=True, on_launch=lambda rec: result.keys.add(rec.key)):
            run(ctx, only=only, skip=[*(skip or []), "env", "probes"])
    finally:
        torch.randn = randn
        backend.supports, backend._module, backend._loaded, backend._error = saved
    errors = [r for r in ctx.rows if "error" in r]
    if errors:
        raise RuntimeError(f"dry run: {len(errors)} cases failed, first: {errors[0]}")
    return result


def _table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"{title}\n(none)"
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("case", "t_s")]
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = [title, "  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU via the Triton interpreter")
    p.add_argument("--dry-run", action="store_true", help="count the kernels a device run compiles (no GPU)")
    p.add_argument("--only", default="", help="comma-separated providers to run")
    p.add_argument("--skip", default="", help="comma-separated providers to skip")
    p.add_argument("--autotune", action="store_true", help="also time alternative tiles (extra compiles)")
    p.add_argument("--before-build", action="store_true", help="only providers that do not need the extension")
    p.add_argument("--after-build", action="store_true", help="only providers that need the extension")
    p.add_argument("--chain-probe", action="store_true", help=argparse.SUPPRESS)  # chain_cases' child process
    args = p.parse_args(argv)
    if args.chain_probe:
        _poison_allocations()
        print(json.dumps(chain_probe()))
        return 0
    only = [s for s in args.only.split(",") if s] or None
    skip = [s for s in args.skip.split(",") if s] or None
    if args.dry_run:
        n = len(dry_run(only, skip, args.autotune).keys)
        print(f"dry run: {n} distinct Triton kernels would be compiled (limit {MAX_COMPILES})")
        return 0 if n <= MAX_COMPILES else 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("error: no CUDA device (use --smoke to test the script on CPU, --dry-run to count compiles)",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ctx = Context(device, smoke=args.smoke, autotune=args.autotune, budget_s=0.01 if args.smoke else 0.1,
                  jsonl=os.path.join(args.out, "gpu_check.jsonl"))
    _poison_allocations()
    phase = True if args.after_build else False if args.before_build else None
    rows = run(ctx, only, skip, phase)
    print(f"\ntotal {time.time() - ctx.started:.0f} s; rows in {ctx.jsonl}\n")
    for case in dict.fromkeys(r["case"] for r in rows):
        print(_table([r for r in rows if r["case"] == case], case) + "\n")
    failed = [r for r in rows if r.get("ok") is False or "error" in r]
    if failed:
        print(f"FAILED: {len(failed)} rows (correctness or errors)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
