"""``python -m bench.kernel_audit [--parts triton,cuda] [--scope full|quick|ci] [--model] [--out DIR]``

Compiles every GPU kernel configuration the dispatcher can launch for sm_90 (no GPU needed) and prints the
audit table; ``--model`` also prints the cost model's H100 predictions for the target shapes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="triton,cuda", help="comma-separated audit parts")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--scope", default="full", choices=("full", "quick", "ci"),
                   help="full: every benchmark shape; quick: three shapes; ci: one launch per kernel family")
    p.add_argument("--model", action="store_true", help="also print the cost-model predictions")
    p.add_argument("--out", default="bench/results/kernel_audit", help="directory for audit.json / audit.md")
    p.add_argument("--verbose", action="store_true", help="print each kernel as it compiles")
    args = p.parse_args(argv)

    from . import PARTS
    from .rows import format_table, save

    started = time.time()
    rows = []
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    progress = (lambda s: print("  " + s, flush=True)) if args.verbose else (lambda s: None)
    for name in [n for n in args.parts.split(",") if n]:
        if name not in PARTS:
            print(f"error: unknown part {name!r}; known: {sorted(PARTS)}", file=sys.stderr)
            return 2
        rows += PARTS[name](args.scope, dtypes, progress)
    import triton

    meta = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "target": "sm_90 (offline)",
            "python": platform.python_version(), "seconds": round(time.time() - started, 1),
            "command": "python -m bench.kernel_audit " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"kernel audit: {len(rows)} kernels, triton {triton.__version__}, target sm_90, "
          f"{meta['seconds']} s\n")
    print(format_table(rows))
    if args.model:
        from .model import model_report

        text, model_rows = model_report()
        print("\n" + text)
        meta["model"] = model_rows
    paths = save(rows, meta, args.out)
    print(f"\nwrote {', '.join(paths)}")
    failed = [r for r in rows if r.error and not r.error.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
