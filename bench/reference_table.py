"""The CPU comparison table: Monarch products on the ``cpu`` backend (C++ kernels) against the ``torch`` reference,
forward and forward+backward, side by side in one process.

Rows (``T`` tokens, square ``n -> n`` with ``b`` blocks, factors ``(b, n/b, n/b)``) are the shapes on which the
paper's implementation was compared (issue 19): large token counts at 1024-4096 wide, a GPT-2-MLP-like 768-wide
layer with 4 blocks, and the small calls T = 16 and T = 1 where per-call overhead dominates.

Variants are timed round-robin (one call of each per round, in an order that rotates every round, ``--rounds``
rounds after warm-up) and each cell is the median of that variant's rounds, so that the shared machine's noise
and the allocator's state fall on all variants alike. A forward is
``monarch_matmul(x, w1, w2)`` under ``no_grad``; a forward+backward is the same call on leaves that require grad
followed by ``out.backward(g)``.

``--baseline FILE:NAME`` adds a third implementation loaded from a Python file outside this repository, a
function ``NAME(x, w1, w2)`` with the same convention (for instance the paper's ``blockdiag_butterfly_multiply``
from HazyResearch/fly); its ratios are printed in extra columns. Nothing of it is imported by the library.

``python -m bench.reference_table [--rounds 9] [--threads 2] [--shapes 4096:1024:32,...] [--baseline F:N]``
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from typing import Callable

import torch

import monarch_kernels as mk

from .timing import device_name

ROWS = [(4096, 1024, 32), (4096, 2048, 32), (4096, 4096, 64), (2048, 768, 4), (16, 2048, 16), (1, 4096, 64)]


def load_baseline(spec: str) -> Callable:
    """``FILE:NAME`` -> the function ``NAME`` defined in the Python file ``FILE``."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise SystemExit(f"--baseline {spec!r}: expected FILE:NAME")
    module_spec = importlib.util.spec_from_file_location("monarch_bench_baseline", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def round_robin_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in µs of each function, timed one call of each per round (interleaved). The order
    rotates from round to round: a call's time depends on what ran just before it (the allocator hands the
    previous call's freed buffers, or fresh pages that fault on first touch, to the next one)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def calls(impls: dict[str, Callable], T: int, n: int, nb: int, dtype: torch.dtype, mode: str) -> dict[str, Callable]:
    """One zero-argument call per implementation for the problem ``(T, n, nb)`` in ``mode`` (fwd / fwdbwd)."""
    gen = torch.Generator().manual_seed(T * 7919 + n * 31 + nb)
    B = n // nb
    x = torch.randn(T, n, generator=gen).to(dtype)
    w1 = (torch.randn(nb, B, B, generator=gen) * B ** -0.5).to(dtype)
    w2 = (torch.randn(nb, B, B, generator=gen) * B ** -0.5).to(dtype)
    g = torch.randn(T, n, generator=gen).to(dtype)
    out = {}
    for name, fn in impls.items():
        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    return fn(x, w1, w2)
        else:
            leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]

            def run(fn=fn, leaves=leaves):
                for t in leaves:
                    t.grad = None
                fn(*leaves).backward(g)
        out[name] = run
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per cell (median; at least 7 for the table)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--shapes", default=None, help="comma-separated T:n:nblocks (default: the issue-19 rows)")
    p.add_argument("--baseline", default=None, help="FILE:NAME of an external fn(x, w1, w2) to compare as well")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be positive")
    try:
        rows = ROWS if args.shapes is None else [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
        if any(len(r) != 3 or min(r) < 1 or r[1] % r[2] for r in rows):
            raise ValueError
    except ValueError:
        p.error(f"--shapes {args.shapes!r}: expected T:n:nblocks with positive ints and nblocks dividing n")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    impls = {b: (lambda x, w1, w2, b=b: mk.monarch_matmul(x, w1, w2, backend=b)) for b in ("cpu", "torch")
             if mk.available_backends()[b] == "available"}
    if "cpu" not in impls:
        print(f"note: cpu backend unavailable ({mk.available_backends()['cpu']})", file=sys.stderr)
    if args.baseline:
        impls["base"] = load_baseline(args.baseline)
    print(f"{device_name(torch.device('cpu'))} | {args.dtype} | torch {torch.__version__} | median of "
          f"{args.rounds} interleaved rounds | ratio = other time / this time (> 1: faster)")
    head = ["T", "n", "blocks", "mode"] + [f"{k} us" for k in impls]
    if "cpu" in impls:
        head.append("cpu vs torch")
    if "base" in impls:
        head += [f"{k} vs base" for k in impls if k != "base"]
    print("  ".join(h.rjust(12) for h in head))
    for T, n, nb in rows:
        for mode in ("fwd", "fwdbwd"):
            us = round_robin_medians(calls(impls, T, n, nb, dtype, mode), args.rounds)
            cells = [str(T), str(n), str(nb), mode] + [f"{us[k]:.0f}" for k in impls]
            if "cpu" in impls:
                cells.append(f"{us['torch'] / us['cpu']:.2f}x")
            if "base" in impls:
                cells += [f"{us['base'] / us[k]:.2f}x" for k in impls if k != "base"]
            print("  ".join(c.rjust(12) for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
