"""The recipe contract and runner: CLI, run folder (config.json, metrics.json, plots), seeding, progress.

A recipe module defines ``RECIPE = Recipe(name, add_arguments, run)``. ``run(args, ctx)`` trains and
evaluates, saves at least one plot through ``ctx.plot_path(...)`` and returns a JSON-serialisable dict of
measured metrics; the runner writes ``config.json`` before and ``metrics.json`` after, and checks that a
PNG was written. ``args.quick`` selects the small setting (< 30 s on 2 CPU cores) used by the tests.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch


@dataclass
class Recipe:
    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, "RunContext"], dict]
    description: str = ""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a fresh CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class RunContext:
    """What a recipe gets besides its arguments: the run folder, device, seed and a progress bar."""

    def __init__(self, out_dir: str, seed: int, device: torch.device, quick: bool):
        self.out_dir, self.seed, self.device, self.quick = out_dir, seed, device, quick
        os.makedirs(out_dir, exist_ok=True)
        self.generator = seed_everything(seed)

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def plot_path(self, name: str) -> str:
        if not name.endswith(".png"):
            raise ValueError(f"plot name must end in .png, got {name!r}")
        return self.path(name)

    def progress(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = ""):
        """A tqdm bar on a terminal; silent when output is redirected (use :meth:`log` for run logs)."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    def log(self, message: str) -> None:
        print(message, flush=True)


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def load_recipe(name: str) -> Recipe:
    from . import RECIPES

    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; `python -m methods list` shows the {len(RECIPES)} recipes")
    module = importlib.import_module(RECIPES[name][0])
    return module.RECIPE


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m methods {recipe.name}", description=recipe.description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small setting (< 30 s on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    recipe.add_arguments(p)
    return p


def run_recipe(name: str, argv: Optional[list[str]] = None) -> dict:
    """Run recipe ``name`` with command-line style ``argv``; returns its metrics (also in metrics.json)."""
    recipe = load_recipe(name)
    args = build_parser(recipe).parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", name)
    ctx = RunContext(out, args.seed, torch.device(args.device), args.quick)
    config = {"recipe": name, "args": vars(args), "git_commit": _git_commit(), "torch": torch.__version__,
              "python": sys.version.split()[0]}
    with open(ctx.path("config.json"), "w") as f:
        json.dump(config, f, indent=1, default=_json_default)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = recipe.run(args, ctx)
    if not isinstance(metrics, dict):
        raise TypeError(f"recipe {name!r} returned {type(metrics).__name__}, expected a dict of metrics")
    # CPU time (all threads of this process) is the steadier figure on a shared machine
    metrics = {**metrics, "wall_time_s": time.perf_counter() - start, "cpu_time_s": time.process_time() - cpu_start}
    with open(ctx.path("metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=_json_default)
    if not any(fn.endswith(".png") for fn in os.listdir(out)):
        raise RuntimeError(f"recipe {name!r} wrote no PNG plot into {out}")
    ctx.log(f"[{name}] wrote {out}/config.json, metrics.json and plots in {metrics['wall_time_s']:.1f} s")
    return metrics


def list_recipes() -> list[tuple[str, str, bool]]:
    from . import RECIPES

    def present(module: str) -> bool:
        return module in sys.modules or importlib.util.find_spec(module) is not None

    return [(n, summary, present(mod)) for n, (mod, summary) in RECIPES.items()]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m methods list | python -m methods <recipe> [--quick] [--seed N] [--out DIR] [options]")
        return 0 if argv else 2
    if argv[0] == "list":
        for n, summary, present in list_recipes():
            print(f"{n:18s} {'' if present else '(not yet implemented) '}{summary}")
        return 0
    metrics = run_recipe(argv[0], argv[1:])
    print(json.dumps(metrics, indent=1, default=_json_default))
    return 0
