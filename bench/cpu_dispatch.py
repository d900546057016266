"""Measure where the C++ ``cpu`` backend beats the torch reference on this CPU (the rule behind
``monarch_kernels/cpu_dispatch.py``): both backends, side by side in one process, over token counts and
shapes, forward and forward+backward; prints the ratio torch-time / cpu-time (> 1: the C++ kernels win).

``python -m bench.cpu_dispatch [--op monarch|blockdiag] [--dtype float32] [--shapes 2048:8192:4] [--budget 0.3]``
"""
from __future__ import annotations

import argparse
import sys

import torch

import monarch_kernels as mk

from .timing import device_name, median_time_us

SHAPES = [(768, 3072, 4), (3072, 768, 4), (1024, 1024, 8), (2048, 2048, 16), (1024, 1024, 32), (4096, 4096, 64)]
TOKENS = [1, 4, 16, 64, 256, 1024]


def factors(op: str, n_in: int, n_out: int, nb: int, dtype: torch.dtype) -> list:
    """Random weights of the op's layer ``n_in -> n_out`` with ``nb`` blocks (variance-preserving scale)."""
    if op == "blockdiag":
        w = torch.randn(nb, n_out // nb, n_in // nb) * (n_in // nb) ** -0.5
        return [w.to(dtype)]
    sh = mk.monarch_factor_shapes(n_in, n_out, nb)
    return [(torch.randn(*sh.w1_shape) * sh.p ** -0.5).to(dtype), (torch.randn(*sh.w2_shape) * sh.r ** -0.5).to(dtype)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_dispatch", description=__doc__)
    p.add_argument("--op", default="monarch", choices=["monarch", "blockdiag"])
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--shapes", default=None, help="comma-separated n_in:n_out:nblocks (default: the built-in list)")
    args = p.parse_args(argv)
    if mk.available_backends()["cpu"] != "available":
        print(f"cpu backend unavailable: {mk.available_backends()['cpu']}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cpu")
    fn = mk.monarch_matmul if args.op == "monarch" else mk.blockdiag_matmul
    print(f"{device_name(dev)} | {args.op} | {args.dtype} | ratio = torch time / cpu time (fwd, fwd+bwd)")
    print("shape".ljust(22) + "".join(f"T={T}".rjust(14) for T in TOKENS))
    shapes = [tuple(int(v) for v in sh.split(":")) for sh in args.shapes.split(",")] if args.shapes else SHAPES
    for n_in, n_out, nb in shapes:
        ws = factors(args.op, n_in, n_out, nb, dtype)
        cells = []
        for T in TOKENS:
            x = torch.randn(T, n_in).to(dtype)
            ratio = []
            for mode in ("fwd", "fwdbwd"):
                t = {}
                for b in ("torch", "cpu"):
                    if mode == "fwd":
                        with torch.no_grad():
                            t[b] = median_time_us(lambda b=b: fn(x, *ws, backend=b), dev, budget_s=args.budget)
                    else:
                        leaves = [v.clone().requires_grad_() for v in (x, *ws)]
                        step = lambda b=b, lv=leaves: fn(*lv, backend=b).sum().backward()
                        t[b] = median_time_us(step, dev, budget_s=args.budget)
                ratio.append(t["torch"] / t["cpu"])
            cells.append(f"{ratio[0]:.2f}/{ratio[1]:.2f}")
        print(f"{n_in}->{n_out} nb={nb}".ljust(22) + "".join(c.rjust(14) for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
