"""Printing, saving and plotting benchmark rows."""
from __future__ import annotations

import json
import math
import os


def format_table(rows: list, title: str) -> str:
    head = ["shape", "dtype", "impl", "mode", "median us", "GB/s", "TFLOP/s", "%copyBW", "x dense", "x torch"]
    body = []
    for r in rows:
        body.append([r.shape, r.dtype, r.impl, r.mode, f"{r.us:.1f}", f"{r.gbs:.1f}", f"{r.tflops:.3f}",
                     f"{r.pct_copy_bw:.0f}", _ratio(r.speedup_vs_dense), _ratio(r.speedup_vs_torch)])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 4 else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *map(line, body)])


def _ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def save(rows: list, meta: dict, out_dir: str, plot_title: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    path_json = os.path.join(out_dir, "results.json")
    with open(path_json, "w") as f:
        json.dump({"meta": meta, "rows": [r.asdict() for r in rows]}, f, indent=1)
    return [path_json, plot_speedups(rows, os.path.join(out_dir, "speedup.png"), plot_title)]


def plot_speedups(rows: list, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    impls = [i for i in dict.fromkeys(r.impl for r in rows) if i != "dense"]
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.5 * len(shapes) + 2.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        h = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            vals = [next((r.speedup_vs_dense for r in rows if r.shape == s and r.impl == impl and r.mode == mode),
                         float("nan")) for s in shapes]
            ax.barh([i + j * h for i in range(len(shapes))], vals, height=h, label=f"monarch[{impl}]")
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_yticks([i + 0.4 - h / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.set_xlabel("speedup vs dense F.linear (higher is better)")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
