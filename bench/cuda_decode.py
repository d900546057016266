"""Few-token (decode) Monarch products on the CUDA backend: predicted and, on a GPU, measured against dense.

``python -m bench.cuda_decode`` prints the cost model's H100 predictions (``monarch_kernels.cost_model`` with the
decode estimator of ``monarch_kernels.cuda_cost``; no GPU needed): decode-kernel time, its ratio to the floor
max(weight bytes / HBM bandwidth, one launch), and dense cuBLAS and the Triton path priced the same way, for
n = 2048, 4096, 8192, nblocks 4, 16, 64 and T = 1, 4, 16 (bf16 forward, square layers).

``python -m bench.cuda_decode --measure`` (on a GPU) first checks every decode kernel against float64
(:func:`check_rows`: forward with bias and each activation, dX, block-diagonal with plain and transposed
weights; 1-64 tokens, bf16/fp16/fp32, ragged and 1-wide blocks; outputs poisoned with NaN), then times, in the
same run, dense ``F.linear``, the ``cuda`` backend (decode kernels) and the ``triton`` backend on the same data
(forward, bf16; weights cold: L2 flushed between calls) next to the predictions (:func:`measure_rows`). Both are
cases of the one GPU check, ``bench/gpu_check.py``. The row-split forward (``ext.decode_kernel("rowsplit")``, not
the default until measured) is checked and timed beside the default cooperative kernel (``fwd_rowsplit``,
``rowsplit_us``); the predicted table prices it too (``rowsplit_us``, ``nan`` where its plan declines).
"""
from __future__ import annotations

import argparse
import sys

import torch

import monarch_kernels as mk
from monarch_kernels import cost_model as cm
from monarch_kernels import cuda_cost, ext

SIZES, NBLOCKS, TOKENS = (2048, 4096, 8192), (4, 16, 64), (1, 4, 16)
#: (w1 shape, w2 shape) of the correctness cases: square 4 blocks, c = 1 (64 blocks), ragged rows (element loads),
#: p = 1, q = 1, a GPT-2-like rectangular pair, 2048-wide blocks
CHECK_FACTORS = [((4, 256, 256), (4, 256, 256)), ((64, 64, 64), (64, 64, 64)), ((4, 5, 8), (4, 6, 5)),
                 ((4, 3, 1), (3, 2, 4)), ((8, 1, 4), (2, 3, 4)), ((4, 192, 192), (4, 768, 192)),
                 ((2, 2048, 2048), (2, 2048, 2048))]
CHECK_TOKENS = {torch.bfloat16: (1, 5, 16, 17, 33, 64), torch.float16: (1, 8, 40), torch.float32: (1, 7, 16)}
#: per-element tolerance: max |error| / max |reference|
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _elem_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    if a.shape != e.shape or torch.isnan(a).any():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def _rowsplit_err(prims, x, w1, w2, b, sh) -> float:
    """The forward with ``ext.decode_kernel("rowsplit")`` against float64, every activation (the cooperative
    kernel where the row-split plan declines, e.g. past 16 tokens)."""
    from monarch_kernels import reference as ref

    d = lambda t: t.double()
    with ext.decode_kernel("rowsplit"):
        return max(_elem_err(prims.monarch_fwd(x, w1, w2, b, sh.n_out, act),
                             ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, act))
                   for act in ("none", "relu", "gelu", "gelu_tanh"))


def check_rows(device: torch.device) -> list[dict]:
    """Every decode kernel against float64 on fresh random data (the ``cuda`` backend's primitives)."""
    from monarch_kernels import reference as ref

    prims = mk.backends.impl("cuda")
    gen = torch.Generator(device="cpu").manual_seed(1)
    d = lambda t: t.double()
    rows = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # fresh allocations are filled with NaN
    try:
        for s1, s2 in CHECK_FACTORS:
            sh = mk.MonarchShape.from_factors(s1, s2)
            for dtype, tokens in CHECK_TOKENS.items():
                for T in tokens:
                    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(device, dtype)
                    x, g, b = rnd(T, sh.n_in), rnd(T, sh.n_out), rnd(sh.n_out)
                    w1, w2 = rnd(*s1, sc=sh.p ** -0.5), rnd(*s2, sc=sh.r ** -0.5)
                    bb = rnd(sh.k * sh.q)
                    err = {"fwd": max(_elem_err(prims.monarch_fwd(x, w1, w2, b, sh.n_out, act),
                                                ref.monarch_fwd(d(x), d(w1), d(w2), d(b), sh.n_out, act))
                                      for act in ("none", "relu", "gelu", "gelu_tanh")),
                           "dx": _elem_err(prims.monarch_bwd_input(g, w1, w2, sh.n_in),
                                           ref.monarch_bwd_input(d(g), d(w1), d(w2), sh.n_in)),
                           "fwd_rowsplit": _rowsplit_err(prims, x, w1, w2, b, sh),
                           "bd": _elem_err(prims.blockdiag_fwd(x, w1, bb, sh.k * sh.q, "relu"),
                                           ref.blockdiag_fwd(d(x), d(w1), d(bb), sh.k * sh.q, "relu"))}
                    wt = w1.transpose(1, 2).contiguous().transpose(1, 2)  # served as W_bᵀ in place
                    err["bd_t"] = _elem_err(prims.blockdiag_fwd(x, wt, None, sh.k * sh.q, "none"),
                                            ref.blockdiag_fwd(d(x), d(w1), None, sh.k * sh.q))
                    rows.append({"w1": str(s1), "w2": str(s2), "dtype": str(dtype)[6:], "T": T,
                                 **{k: f"{v:.1e}" for k, v in err.items()},
                                 "ok": all(v < ELEM_TOL[dtype] for v in err.values())})
    finally:
        torch.use_deterministic_algorithms(previous)
    return rows


def predicted_rows(sizes=SIZES, nblocks=NBLOCKS, tokens=TOKENS, dtype: str = "bfloat16") -> list[dict]:
    rows = []
    for n in sizes:
        for nb in nblocks:
            for T in tokens:
                pr = cm.Problem.linear(T, n, n, nb)
                t = cm.estimate("cuda", "decode", "fwd", pr, dtype).time()
                path = cm.triton_path(pr)
                dense = cm.dense("fwd", pr, dtype).time()
                triton = cm.estimate("triton", path, "fwd", pr, dtype).time()
                floor = cuda_cost.floor_seconds(pr, dtype)
                sh = pr.shape
                split = cuda_cost.rowsplit_plan(T, (sh.k, sh.q, sh.p, sh.l, sh.s, sh.r), n, dtype) is not None
                rs = cuda_cost.rowsplit_kernel(pr, dtype, cm.H100_SXM).time(cm.H100_SXM) if split else float("nan")
                rows.append({"n": n, "nblocks": nb, "T": T, "floor_us": round(floor * 1e6, 2),
                             "cuda_us": round(t * 1e6, 2), "vs_floor": round(t / floor, 2),
                             "rowsplit_us": round(rs * 1e6, 2),
                             "dense_us": round(dense * 1e6, 2), "x_dense": round(dense / t, 2),
                             f"triton_{path}_us": round(triton * 1e6, 2), "x_triton": round(triton / t, 2)})
    return rows


def measure_rows(device: torch.device, budget_s: float = 0.05, sizes=SIZES, nblocks=NBLOCKS, tokens=TOKENS,
                 impls=("cuda", "triton")) -> list[dict]:
    """Side-by-side forward timings (bf16) of dense and the ``impls`` backends with the predictions (needs a GPU)."""
    from .timing import median_time_us

    status = mk.available_backends()
    impls = [b for b in impls if status[b] == "available"]
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in sizes:
        dense_w = (torch.randn(n, n, generator=gen) / n ** 0.5).to(device, torch.bfloat16)
        for nb in nblocks:
            sh = mk.monarch_factor_shapes(n, n, nb)
            w1 = (torch.randn(*sh.w1_shape, generator=gen) * sh.p ** -0.5).to(device, torch.bfloat16)
            w2 = (torch.randn(*sh.w2_shape, generator=gen) * sh.r ** -0.5).to(device, torch.bfloat16)
            for T in tokens:
                x = torch.randn(T, n, generator=gen).to(device, torch.bfloat16)
                with torch.no_grad():
                    t = {"dense": median_time_us(lambda: torch.nn.functional.linear(x, dense_w), device,
                                                 budget_s=budget_s)}
                    for b in impls:
                        t[b] = median_time_us(lambda b=b: mk.monarch_matmul(x, w1, w2, backend=b), device,
                                              budget_s=budget_s)
                    if "cuda" in impls:
                        with ext.decode_kernel("rowsplit"):
                            t["rowsplit"] = median_time_us(lambda: mk.monarch_matmul(x, w1, w2, backend="cuda"), device,
                                                           budget_s=budget_s)
                pr = cm.Problem.linear(T, n, n, nb)
                row = {"n": n, "nblocks": nb, "T": T, "auto": mk.resolve_backend("monarch", x, w1, w2),
                       "dense_us": round(t["dense"], 2)}
                for b in impls:
                    row[f"{b}_us"] = round(t[b], 2)
                    row[f"{b}_x_dense"] = round(t["dense"] / t[b], 2)
                if "cuda" in t:
                    row["cuda_vs_floor"] = round(t["cuda"] / (cuda_cost.floor_seconds(pr) * 1e6), 2)
                    row["rowsplit_us"] = round(t["rowsplit"], 2)
                row["cuda_pred_us"] = round(cm.estimate("cuda", "decode", "fwd", pr).time() * 1e6, 2)
                rows.append(row)
    return rows


def extension_on_gpu(ctx) -> bool:
    """Whether a ``bench/gpu_check.py`` run measures (a GPU, not a dry or smoke run) with the CUDA extension."""
    if ctx.device.type != "cuda" or getattr(ctx, "dry_run", False) or getattr(ctx, "smoke", False):
        return False
    return mk.available_backends()["cuda"] == "available"


def gpu_check_cases(ctx):
    """Case provider of ``bench/gpu_check.py``: the decode kernels' correctness, then their timings (GPU only)."""
    if not extension_on_gpu(ctx):
        return
    yield "cuda decode vs float64", lambda: check_rows(ctx.device)
    # dense and cuda only, 4 and 64 blocks: no Triton compiles in the extension pass (gpu_check.sh gives it 60 s;
    # the built-in timing provider times Triton at 16 tokens)
    yield "cuda decode timing (bf16 fwd)", lambda: measure_rows(ctx.device, budget_s=0.05, nblocks=(4, 64),
                                                                impls=("cuda",))


def format_rows(rows: list[dict], title: str) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = [title, "  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def run_cli(argv, prog: str, doc: str, predicted, check, measure, title: str, check_title: str,
            more_measures=()) -> int:
    """The command line of the CUDA benchmark modules: print ``predicted()`` rows under ``title``; with
    ``--measure`` (GPU only) also ``check(device)`` (rows with ``ok``), ``measure(device)`` rows and, for each
    ``(function, title)`` of ``more_measures``, ``function(device)`` rows. Exit status 0, 1 if a check failed, 2
    without a GPU."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="also check and time the kernels on the GPU")
    args = p.parse_args(argv)
    print(format_rows(predicted(), title))
    if not args.measure:
        return 0
    if not torch.cuda.is_available():
        print("error: --measure needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    checks = check(device)
    print()
    print(format_rows(checks, check_title))
    print()
    print(format_rows(measure(device), f"measured on {torch.cuda.get_device_name()}, bf16 forward"))
    for fn, more_title in more_measures:
        print()
        print(format_rows(fn(device), f"measured on {torch.cuda.get_device_name()}, {more_title}"))
    return 0 if all(r["ok"] for r in checks) else 1


def main(argv=None) -> int:
    return run_cli(argv, "python -m bench.cuda_decode", __doc__, predicted_rows, check_rows, measure_rows,
                   "cost model (H100 SXM), bf16 forward, square n x n, MonarchLinear factors",
                   "decode kernels vs float64 (max |error| / max |reference|)")


if __name__ == "__main__":
    sys.exit(main())
