"""``python -m bench.depthshrinker``: latency and throughput of DepthShrinker's merged networks vs unmerged.

Two measurements, each variant timed side by side in ONE process (on CPU interleaved round by round, so machine load
hits all variants alike; on CUDA with ``triton.testing.do_bench`` medians when triton is there):

* ``model``: the recipe's MobileNetV2-mini (:class:`monarch_kernels.layers.depthshrinker.MobileNetV2Mini`, random
  weights, random BN statistics, eval mode) at MNIST size — *original* (all activations), *removed* (activations of
  the chosen blocks removed, still unmerged) and *merged* (:func:`monarch_kernels.layers.depthshrink`: each removed
  block is one dense conv).
* ``blocks``: single inverted residual blocks at MobileNetV2 ImageNet shapes (e.g. 24 ch, t = 6, 56×56), unmerged
  (activation removed) vs the merged conv.

Every row prints device, dtype, input shape, parameters, median latency, throughput (images/s) and the ratio to
the unmerged variant. The 1×1 convs are ``MonarchLinear`` by default (``--pointwise dense`` for ``nn.Conv2d``); a
merged block is always one dense conv, so merging can add parameters while it removes layers. Examples::

    python -m bench.depthshrinker                     # CPU (or CUDA when available), float32
    python -m bench.depthshrinker --quick --threads 1
    python -m bench.depthshrinker --device cuda --dtype float16 --batch 1,256 --out bench/out/depthshrinker
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import torch
from torch import nn

from monarch_kernels.layers.depthshrinker import (
    MobileNetV2Mini,
    ShrinkableInvertedResidual,
    count_layers,
    depthshrink,
    set_removed,
)

from .timing import device_name, interleaved_times_ms, median_time_us, pick_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: (C_in, C_out, t, k, stride, H) — MobileNetV2 (ImageNet, 224) blocks the paper merges first
IMAGENET_BLOCKS = ((24, 24, 6, 3, 1, 56), (24, 32, 6, 3, 2, 56), (32, 32, 6, 3, 1, 28), (64, 64, 6, 3, 1, 14))
QUICK_BLOCKS = ((24, 24, 6, 3, 1, 28), (32, 32, 6, 3, 1, 14))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.depthshrinker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,64 on CPU, 1,256 on CUDA)")
    p.add_argument("--remove", default="1,1,1,1,1,0,0,0",
                   help="model: per-block removal flags (1 = remove) for the 8 MobileNetV2-mini blocks")
    p.add_argument("--pointwise", default="monarch", choices=["dense", "monarch"])
    p.add_argument("--what", default="model,blocks", help="model and/or blocks")
    p.add_argument("--rounds", type=int, default=None, help="CPU: interleaved timing rounds")
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="directory for results.json and depthshrinker.png")
    return p.parse_args(argv)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


@torch.no_grad()
def time_variants(variants: dict, x: torch.Tensor, device: torch.device, rounds: int) -> dict:
    """``{variant: (median ms, min ms)}`` per forward. CPU: interleaved rounds (A, B, C, A, B, C, …, after one
    warm-up round; ``bench.timing.interleaved_times_ms``); CUDA: ``bench.timing.median_time_us`` per variant
    (min = median there)."""
    if device.type == "cuda":
        out = {}
        for k, m in variants.items():
            ms = median_time_us(lambda m=m: m(x), device, budget_s=0.2) / 1e3
            out[k] = (ms, ms)
        return out
    times = interleaved_times_ms({k: (lambda m=m: m(x)) for k, m in variants.items()}, device, rounds=rounds)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def _rows(kind: str, shape: str, lat: dict, baseline: str, batch: int, extra: dict) -> list:
    return [{"what": kind, "shape": shape, "variant": k, "ms": med, "min_ms": mn, "images_per_s": batch / (med * 1e-3),
             "x_vs_unmerged": lat[baseline][0] / med, "x_vs_unmerged_min": lat[baseline][1] / mn,
             **extra.get(k, {})} for k, (med, mn) in lat.items()]


def bench_model(args, device, dtype, batches, rounds) -> list:
    flags = [bool(int(f)) for f in args.remove.split(",") if f.strip()]
    torch.manual_seed(0)
    original = MobileNetV2Mini(1, 10, pointwise=args.pointwise)
    if len(flags) != len(list(original.blocks)):
        raise SystemExit(f"error: --remove needs {len(list(original.blocks))} flags, got {len(flags)}")
    _randomize_bn(original, torch.Generator().manual_seed(0))
    original = original.to(device, dtype).eval()
    removed = MobileNetV2Mini(1, 10, pointwise=args.pointwise).to(device, dtype)
    removed.load_state_dict(original.state_dict())
    set_removed(removed, flags)
    removed.eval()
    merged = depthshrink(removed)
    variants = {"original": original, "removed_unmerged": removed, "merged": merged}
    extra = {k: {"conv_layers": count_layers(m)["conv"], "params": sum(p.numel() for p in m.parameters())}
             for k, m in variants.items()}
    rows = []
    for b in batches:
        x = torch.randn(b, 1, 28, 28, device=device, dtype=dtype)
        with torch.no_grad():
            err = (merged(x).float() - removed(x).float()).abs().max().item()
        lat = time_variants(variants, x, device, rounds)
        rs = _rows("model", f"{tuple(x.shape)}", lat, "removed_unmerged", b, extra)
        for r in rs:
            r["max_abs_diff_merged"] = err
        rows += rs
    return rows


def bench_blocks(args, device, dtype, batches, rounds, shapes) -> list:
    rows = []
    for cin, cout, t, k, s, h in shapes:
        torch.manual_seed(0)
        block = ShrinkableInvertedResidual(cin, cout, s, t, k, pointwise=args.pointwise)
        _randomize_bn(block, torch.Generator().manual_seed(0))
        block = block.to(device, dtype).eval()
        block.gate.mode = "remove"
        conv = block.merge()
        extra = {k: {"params": sum(p.numel() for p in m.parameters())}
                 for k, m in (("unmerged", block), ("merged", conv))}
        for b in batches:
            x = torch.randn(b, cin, h, h, device=device, dtype=dtype)
            lat = time_variants({"unmerged": block, "merged": conv}, x, device, rounds)
            rows += _rows("block", f"{cin}->{cout} t{t} k{k} s{s} {tuple(x.shape)}", lat, "unmerged", b, extra)
    return rows


def format_table(rows: list, title: str) -> str:
    head = ["what", "input / block", "variant", "params", "median ms", "min ms", "images/s", "x vs unmerged", "x (min)"]
    body = [[r["what"], r["shape"], r["variant"], f"{r['params']:,}", f"{r['ms']:.3f}", f"{r['min_ms']:.3f}",
             f"{r['images_per_s']:.0f}", f"{r['x_vs_unmerged']:.2f}", f"{r['x_vs_unmerged_min']:.2f}"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, body)])


def plot(rows: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["what"], r["shape"]) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels, vals = [], []
    for g in groups:
        for r in rows:
            if (r["what"], r["shape"]) == g:
                labels.append(f"{r['shape']} {r['variant']}")
                vals.append(r["x_vs_unmerged"])
    ax.barh(range(len(vals)), vals)
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the unmerged network/block (higher is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in (args.batch or ("1,64" if device.type == "cpu" else "1,256")).split(",")]
    rounds = args.rounds or (10 if args.quick else 40)
    what = set(args.what.split(","))
    if not what <= {"model", "blocks"}:
        print(f"error: --what must be model and/or blocks, got {args.what!r}", file=sys.stderr)
        return 2
    name = device_name(device)
    print(f"device: {name} | dtype: {args.dtype} | torch {torch.__version__} | pointwise {args.pointwise}")
    rows = []
    if "model" in what:
        rows += bench_model(args, device, dtype, batches, rounds)
        r0 = rows[0]
        print(f"model: MobileNetV2-mini, remove flags {args.remove}; "
              f"merged max |diff| {r0['max_abs_diff_merged']:.1e}; "
              "conv layers " + ", ".join(f"{r['variant']} {r['conv_layers']}" for r in rows[:3]))
    if "blocks" in what:
        rows += bench_blocks(args, device, dtype, batches, rounds, QUICK_BLOCKS if args.quick else IMAGENET_BLOCKS)
    title = (f"DepthShrinker merged vs unmerged on {name}, {args.dtype} (latency per forward, median and min of "
             f"{rounds} interleaved rounds on CPU; x = speed vs unmerged, measured side by side in one run; "
             "images/s from the median)")
    print(format_table(rows, title))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"device": name, "dtype": args.dtype, "torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": sys.argv[1:] if argv is None else list(argv)}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        plot(rows, os.path.join(args.out, "depthshrinker.png"), title)
        print(f"wrote {args.out}/results.json and depthshrinker.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
