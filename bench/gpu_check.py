"""One prepared GPU check: correctness of every backend against float64, then the timing sweep.

``python -m bench.gpu_check --out DIR`` (what ``bench/gpu_check.sh`` runs on a lent H100/H200):

1. prints the device, versions and ``available_backends()``;
2. correctness, fresh random data per case, outputs poisoned with NaN: forward (bias + GELU epilogue),
   dX and dW of every non-reference backend and every Triton path, in bf16/fp16/fp32, on ragged and
   aligned shapes, against the float64 reference computed on the same device;
3. timing (``triton.testing.do_bench`` medians): dense ``F.linear`` (cuBLAS), the torch reference (fly-style
   two ``bmm`` + permutes) and every fast backend, forward and forward+backward, with GB/s, TFLOP/s, % of the
   copy bandwidth measured in the same run and speedups vs dense and vs the reference; a path table (fused
   vs two-kernel Triton forward);
4. writes ``DIR/gpu_check.json`` and prints the tables last.

``--smoke`` runs tiny shapes to test the script itself (on CPU, set ``TRITON_INTERPRET=1`` to include the Triton
kernels through the interpreter; tests/bench/test_gpu_check_smoke.py does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

import monarch_kernels as mk
from monarch_kernels import reference as ref

from . import ops, report
from .timing import copy_bandwidth_gbs, device_name, median_time_us

CHECK_SHAPES = [(4096, 768, 3072, 4), (4096, 3072, 768, 4), (2048, 1024, 1024, 32), (1024, 4096, 4096, 64),
                (333, 1000, 3000, 4), (1, 2048, 2048, 16), (16, 4096, 4096, 64)]
SMOKE_SHAPES = [(9, 48, 192, 4), (5, 30, 22, 4), (7, 256, 256, 16)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _poison_allocations():
    try:
        from monarch_kernels.triton import _common
    except ImportError:
        return
    _common.empty = lambda *shape, device, dtype: torch.full(shape, math.nan, device=device, dtype=dtype)


def _fused_applies(sh) -> bool:
    from monarch_kernels.triton import monarch as tmon

    return tmon.path_applies(sh, "fused")


def _variants(backend: str) -> list[tuple[str, dict]]:
    """(label, module functions) for a backend; Triton contributes one variant per path."""
    if backend != "triton":
        mod = mk.backends.impl(backend)
        return [(backend, {"fwd": mod.monarch_fwd, "dx": mod.monarch_bwd_input, "dw": mod.monarch_bwd_weight})]
    from monarch_kernels.triton import monarch as tmon

    out = []
    for path in ("fused", "two_kernel"):
        out.append((f"triton/{path}", {
            "fwd": lambda x, w1, w2, b, n, a, p=path: tmon.forward(x, w1, w2, b, n, a, path=p),
            "dx": lambda g, w1, w2, n, p=path: tmon.backward_input(g, w1, w2, n, path=p),
            "dw": lambda x, g, w1, w2, p=path: tmon.backward_weight(x, g, w1, w2, path=p),
        }))
    return out


def check_correctness(device, shapes, dtypes, backends) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for T, n_in, n_out, nb in shapes:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        for dtype in dtypes:
            rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)
            x, g = rnd(T, n_in), rnd(T, n_out)
            w1, w2 = rnd(*sh.w1_shape, scale=sh.p ** -0.5), rnd(*sh.w2_shape, scale=sh.r ** -0.5)
            b = rnd(n_out)
            d = lambda t: t.double()
            want = {
                "fwd": ref.monarch_fwd(d(x), d(w1), d(w2), d(b), n_out, "gelu"),
                "dx": ref.monarch_bwd_input(d(g), d(w1), d(w2), n_in),
                "dw": ref.monarch_bwd_weight(d(x), d(g), d(w1), d(w2)),
            }
            for backend in backends:
                for label, fns in _variants(backend):
                    if label.endswith("fused") and not _fused_applies(sh):
                        continue
                    errs = {
                        "fwd": _rel(fns["fwd"](x, w1, w2, b, n_out, "gelu"), want["fwd"]),
                        "dx": _rel(fns["dx"](g, w1, w2, n_in), want["dx"]),
                    }
                    dw1, dw2 = fns["dw"](x, g, w1, w2)
                    errs["dw"] = max(_rel(dw1, want["dw"][0]), _rel(dw2, want["dw"][1]))
                    ok = all(e < TOL[dtype] for e in errs.values())
                    rows.append({"shape": f"T={T} {n_in}->{n_out} nb={nb}", "dtype": str(dtype)[6:], "impl": label,
                                 **{k: f"{v:.1e}" for k, v in errs.items()}, "ok": ok})
    return rows


def time_paths(device, dtype, shapes, budget) -> list[dict]:
    """Fused vs two-kernel Triton forward on the same data."""
    from monarch_kernels.triton import monarch as tmon

    rows = []
    for T, n_in, n_out, nb in shapes:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        if not _fused_applies(sh):
            continue
        x = torch.randn(T, n_in, device=device, dtype=dtype)
        w1 = torch.randn(*sh.w1_shape, device=device, dtype=dtype)
        w2 = torch.randn(*sh.w2_shape, device=device, dtype=dtype)
        t = {p: median_time_us(lambda p=p: tmon.forward(x, w1, w2, None, n_out, path=p), device, budget_s=budget)
             for p in ("fused", "two_kernel")}
        rows.append({"shape": f"T={T} {n_in}->{n_out} nb={nb}", "c": sh.q // sh.l, "fused_us": round(t["fused"], 1),
                     "two_kernel_us": round(t["two_kernel"], 1), "fused_speedup": round(t["two_kernel"] / t["fused"], 2)})
    return rows


def _table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"{title}\n(none)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = [title, "  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU via the Triton interpreter")
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("error: no CUDA device (use --smoke to test the script on CPU)", file=sys.stderr)
        return 2
    started = time.time()
    status = mk.available_backends()
    fast = [n for n, s in status.items() if s == "available" and n != "torch"
            and mk.backends.get(n).supports(device, torch.float32)]
    print(f"device: {device_name(device)} | torch {torch.__version__} | python {platform.python_version()}")
    print(f"backends: {status}")
    _poison_allocations()

    shapes = SMOKE_SHAPES if args.smoke else CHECK_SHAPES
    dtypes = [torch.float32, torch.float16] if args.smoke else [torch.bfloat16, torch.float16, torch.float32]
    checks = check_correctness(device, shapes, dtypes, fast)
    print(f"correctness done in {time.time() - started:.0f} s")

    results = {"device": device_name(device), "torch": torch.__version__, "backends": status, "checks": checks}
    tables = [_table(checks, "correctness vs float64 reference (relative error; fwd has bias + GELU)")]
    if not args.skip_timing:
        dtype = torch.float32 if args.smoke else torch.bfloat16
        copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 20) if args.smoke else (1 << 30))
        problems = [ops.Problem.parse(s) for s in (["8:48:192:4"] if args.smoke else ops.GPU_SHAPES)]
        budget = 0.01 if args.smoke else 0.1
        rows = []
        for prob in problems:
            rows += ops.run_problem(prob, dtype, device, ["dense", "torch", *fast], ["fwd", "fwdbwd"], copy_gbs, budget)
        path_rows = time_paths(device, dtype, [(8, 256, 256, 16)] if args.smoke else
                               [(16384, 768, 3072, 4), (16384, 4096, 4096, 64), (16384, 2048, 2048, 32)], budget)
        results.update(copy_gbs=copy_gbs, timing=[r.asdict() for r in rows], paths=path_rows)
        tables.append(_table(path_rows, "Triton forward: fused (D2) vs two-kernel (D0)"))
        tables.append(report.format_table(rows, f"timing on {device_name(device)}, {str(dtype)[6:]}, "
                                                f"copy bandwidth {copy_gbs:.0f} GB/s"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"total {time.time() - started:.0f} s; wrote {args.out}/gpu_check.json\n")
    print("\n\n".join(tables))
    failed = [c for c in checks if not c["ok"]]
    if failed:
        print(f"\nFAILED correctness checks: {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
