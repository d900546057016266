"""Summaries, plots and timing shared by every recipe (and the latency timer shared with ``bench/``).

* :func:`mean_std` — mean and **sample** standard deviation (``ddof = 1``) of per-seed values with ``n`` stated;
  a single value has ``std = None`` (a single run, no spread to report). :func:`format_mean_std` prints it.
* :func:`paired` — per-seed differences ``a_i − b_i`` of two methods run on the same seeds (same data, same
  initialisation), with how many seeds are positive: the comparison that cancels the seed-to-seed variation.
* :func:`aggregate` — :func:`mean_std` at every numeric leaf of a list of per-seed result dicts.
* :func:`plot_curves` — the one plotting function: a row of panels of lines (optionally with a ± band), bars with
  sample-std error bars, scatters or histograms, written as a PNG (matplotlib's ``Agg`` backend is selected here).
* :func:`median_time_us` and :func:`interleaved_times_ms` — the latency timers (``bench.timing`` re-exports
  :func:`median_time_us`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch


# ---------------------------------------------------------------------------------------------- seed summaries
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` of per-seed values; ``std`` is the sample standard deviation
    (``ddof = 1``), ``None`` for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of two methods on the same seeds: :func:`mean_std` of ``a_i − b_i`` plus
    ``"positive"``/``"negative"``, the number of seeds with ``a_i > b_i`` / ``a_i < b_i``."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired needs two equally long non-empty sequences, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    return {**mean_std(d), "positive": sum(v > 0 for v in d), "negative": sum(v < 0 for v in d)}


def aggregate(per_seed: Sequence[Mapping]) -> dict:
    """:func:`mean_std` of every numeric leaf present in every per-seed dict (nested dicts are followed;
    lists, strings and booleans are left out)."""
    if not per_seed:
        raise ValueError("aggregate needs at least one per-seed result")
    out = {}
    for k, v in per_seed[0].items():
        vals = [r.get(k) for r in per_seed]
        if all(isinstance(x, Mapping) for x in vals):
            sub = aggregate(vals)
            if sub:
                out[k] = sub
        elif all(_number(x) for x in vals):
            out[k] = mean_std(vals)
    return out


def format_mean_std(s: Mapping, digits: int = 3, scale: float = 1.0) -> str:
    """``"0.937 ± 0.011 (n=3)"`` or ``"0.937 (single run)"`` for a :func:`mean_std` dict (values × ``scale``)."""
    m = f"{s['mean'] * scale:.{digits}f}"
    if s["std"] is None:
        return f"{m} (single run)"
    return f"{m} ± {s['std'] * scale:.{digits}f} (n={s['n']})"


# ----------------------------------------------------------------------------------------------------- plots
@dataclass
class Panel:
    """One subplot of :func:`plot_curves`.

    ``kind="line"``: ``series`` maps a label to ``(xs, ys)`` or ``(xs, ys, band)`` (a ± band, e.g. the sample std
    over seeds). ``kind="bar"``: ``series`` maps a label to per-seed values (or a :func:`mean_std` dict), drawn
    as a bar at the mean with a sample-std error bar and the seeds as dots; ``groups`` maps a group name to such a
    ``series`` for grouped bars (one colour per group). ``kind="scatter"``: ``series`` maps a label to
    ``(xs, ys)`` or ``(xs, ys, point_labels)``. ``kind="hist"``: ``series`` maps a label to values.
    """

    title: str
    series: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "line"
    xlabel: str = ""
    ylabel: str = ""
    groups: Optional[Mapping[str, Mapping[str, Any]]] = None
    logx: bool = False
    logy: bool = False
    vline: Optional[float] = None
    hline: Optional[Mapping[str, float]] = None
    ylim: Optional[tuple] = None
    markers: bool = False


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the one place the backend is chosen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_stats(v) -> tuple[float, float, list]:
    if isinstance(v, Mapping):
        return v["mean"], v["std"] or 0.0, list(v.get("values", []))
    s = mean_std(v)
    return s["mean"], s["std"] or 0.0, s["values"]


def _draw_bars(ax, groups: Mapping[str, Mapping[str, Any]]) -> None:
    cats = list(dict.fromkeys(c for series in groups.values() for c in series))
    width = 0.8 / max(1, len(groups))
    for g, (gname, series) in enumerate(groups.items()):
        for i, cat in enumerate(cats):
            if cat not in series:
                continue
            mean, std, vals = _bar_stats(series[cat])
            x = i + (g - (len(groups) - 1) / 2) * width
            ax.bar(x, mean, width * 0.95, yerr=std, capsize=3, color=f"C{g if len(groups) > 1 else i}",
                   label=gname if i == 0 and len(groups) > 1 else None, alpha=0.8)
            if len(vals) > 1:
                ax.plot([x] * len(vals), vals, "k.", ms=3)
    ax.set_xticks(range(len(cats)), cats, rotation=20 if max(map(len, cats)) > 6 else 0, ha="right"
                  if max(map(len, cats)) > 6 else "center", fontsize=8)


def plot_curves(path: str, panels: Sequence[Panel], title: Optional[str] = None, panel_size=(5.0, 3.8)) -> str:
    """Draw ``panels`` side by side and save them as the PNG ``path``; returns ``path``."""
    if not panels:
        raise ValueError("plot_curves needs at least one panel")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p.kind == "line":
            for label, s in p.series.items():
                xs, ys = list(s[0]), list(s[1])
                if not xs:
                    continue
                (line,) = ax.plot(xs, ys, marker="." if p.markers else None, label=label)
                if len(s) > 2 and s[2] is not None:
                    band = list(s[2])
                    ax.fill_between(xs, [y - b for y, b in zip(ys, band)], [y + b for y, b in zip(ys, band)],
                                    color=line.get_color(), alpha=0.2)
            for label, y in (p.hline or {}).items():
                ax.axhline(y, ls="--", lw=1, color="gray")
                ax.annotate(label, (ax.get_xlim()[0], y), fontsize=7, va="bottom")
        elif p.kind == "bar":
            _draw_bars(ax, p.groups if p.groups is not None else {"": p.series})
        elif p.kind == "scatter":
            for i, (label, s) in enumerate(p.series.items()):
                ax.scatter(s[0], s[1], label=label, color=f"C{i}", s=14)
                for x, y, t in zip(*s) if len(s) > 2 else ():
                    ax.annotate(str(t), (x, y), fontsize=6, color=f"C{i}")
        elif p.kind == "hist":
            for label, v in p.series.items():
                ax.hist(list(v), bins=50, alpha=0.7, label=label)
        else:
            raise ValueError(f"Panel.kind must be line, bar, scatter or hist, got {p.kind!r}")
        if p.vline is not None:
            ax.axvline(p.vline, color="gray", ls="--", lw=1)
        if p.logx:
            ax.set_xscale("log")
        if p.logy:
            ax.set_yscale("log")
        if p.ylim is not None:
            ax.set_ylim(*p.ylim)
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_band(curves: Sequence[Sequence[float]]) -> tuple[list, list, Optional[list]]:
    """``(xs = 1..T, mean, sample std or None)`` over equally long per-seed curves, for a line :class:`Panel`."""
    t = torch.tensor([list(c) for c in curves], dtype=torch.float64)
    std = t.std(0).tolist() if t.shape[0] > 1 else None
    return list(range(1, t.shape[1] + 1)), t.mean(0).tolist(), std


# ------------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_us(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5,
                   min_reps: int = 5, max_reps: int = 1000, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in microseconds.

    On CUDA uses ``triton.testing.do_bench`` when available (L2 flushed between runs); otherwise repeats
    ``fn`` until ``budget_s`` is spent (at least ``min_reps`` times) and takes the median of per-call times.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return 1e3 * do_bench(fn, warmup=25, rep=max(int(budget_s * 1e3), 20), return_mode="median")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def interleaved_times_ms(fns: Mapping[str, Callable[[], object]], device: torch.device, *, rounds: int = 10,
                         inner: int = 1) -> dict[str, list[float]]:
    """Wall times (ms) of each callable, timed in alternation ``A, B, A, B, …`` for ``rounds`` rounds after one
    warm-up round (so a change in machine load hits all of them alike); each sample is the mean of ``inner``
    consecutive calls. Returns ``{name: [ms per round]}`` (report the median)."""
    if not fns or rounds < 1 or inner < 1:
        raise ValueError("interleaved_times_ms needs callables, rounds >= 1 and inner >= 1")
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            if r:  # the first round is the warm-up
                times[k].append(1e3 * (time.perf_counter() - t0) / inner)
    return times
