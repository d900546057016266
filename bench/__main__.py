"""``python -m bench``: time dense vs Monarch layers on the best available device and print the table.

Examples::

    python -m bench                       # default sweep (about a minute on 2 CPU cores)
    python -m bench --quick               # a few shapes, a few seconds each
    python -m bench --shapes 4096:1024:1024:32,16:2048:16 --dtype bfloat16 --device cuda --out bench/out
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

import monarch_kernels as mk

from . import ops, report
from .timing import copy_bandwidth_gbs, device_name, pick_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--shapes", default=None, help="comma-separated T:n_in:n_out:nblocks (or T:n:nblocks)")
    p.add_argument("--backends", default=None, help="comma-separated Monarch backends (default: all available)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--quick", action="store_true", help="small sweep, short timing budget")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="directory for results.json and speedup.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"fwd", "fwdbwd"}:
        print(f"error: --modes must be fwd and/or fwdbwd, got {args.modes!r}", file=sys.stderr)
        return 2
    try:
        problems = [ops.Problem.parse(s) for s in (args.shapes.split(",") if args.shapes
                                                   else ops.default_shapes(device, args.quick))]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backends = ops.monarch_backends(device, dtype, args.backends.split(",") if args.backends else None)
    budget = args.budget or (0.15 if args.quick else 0.6 if device.type == "cpu" else 0.1)

    name = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {name} | dtype: {str(dtype)[6:]} | torch {torch.__version__} | copy bandwidth {copy_gbs:.1f} GB/s")
    print(f"backends: {mk.available_backends()}  (timed: {backends})")
    rows = []
    for prob in problems:
        rows += ops.run_problem(prob, dtype, device, ["dense", *backends], modes, copy_gbs, budget)
    title = f"Monarch vs dense on {name}, {str(dtype)[6:]} (median of many runs; x = speedup, higher is better)"
    print(report.format_table(rows, title))
    if args.out:
        meta = {"device": name, "dtype": str(dtype)[6:], "torch": torch.__version__, "copy_gbs": copy_gbs,
                "backends": mk.available_backends(), "python": platform.python_version(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:]}
        for path in report.save(rows, meta, args.out, title):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
