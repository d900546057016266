"""The recipe contract and runner: settings as data, CLI, run folder (config.json, metrics.json, plots), seeding.

A recipe module declares its settings as a frozen dataclass with defaults (the default run), a ``QUICK`` dict
of overrides (the < 30 s run used by the tests) and a ``run(cfg, ctx) -> dict``::

    @dataclass(frozen=True)
    class Config:
        epochs: int = option(100, "training epochs")
        layer: str = option("monarch", "hidden layers", choices=LAYERS)
        ks: tuple[int, ...] = option((2, 4, 8), "subset sizes")

    QUICK = {"epochs": 3}
    RECIPE = Recipe("name", Config, run, quick=QUICK, description="...")

The runner builds the CLI from the dataclass (``--epochs 5``, ``--layer dense``, ``--ks 2 4`` or ``--ks 2,4``,
``--flag/--no-flag`` for booleans), then resolves the settings in this order: the dataclass defaults, the
``QUICK`` overrides when ``--quick`` is given, the flags the user passed (which always win). It writes
``config.json`` with the resolved settings *before* calling ``run``; the dataclass is frozen, so the run cannot
change them afterwards: what is written is what ran. ``run`` never reads ``--quick`` itself: everything the quick
setting changes is a field of the config.

``ctx.observe(name=value)`` records a setting read back from the objects the run built (e.g. the number of epochs
in the loss history, a model's width); after ``run`` the runner checks every observed value against the config
and fails if they differ, and stores them in ``metrics.json`` under ``"observed"``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import RECIPES

COMMON_FLAGS = ("quick", "seed", "out", "device", "threads")


def option(default: Any, help: str, *, choices: Optional[Iterable] = None) -> Any:
    """A config field with its default, a help text for the CLI and optional allowed values (for a tuple field,
    allowed values of each element)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass(frozen=True)
class Recipe:
    """A runnable recipe: ``run(cfg, ctx)`` trains and evaluates with the settings ``cfg`` (an instance of
    ``config``, a frozen dataclass), saves at least one plot through ``ctx.plot_path(...)`` and returns a
    JSON-serialisable dict of measured metrics. ``quick`` maps field names to the values of the quick setting."""

    name: str
    config: type
    run: Callable[[Any, "RunContext"], dict]
    quick: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not (dataclasses.is_dataclass(self.config) and self.config.__dataclass_params__.frozen):
            raise TypeError(f"recipe {self.name!r}: config must be a frozen dataclass type")
        names = {f.name for f in dataclasses.fields(self.config)}
        clash = names & set(COMMON_FLAGS)
        if clash:
            raise TypeError(f"recipe {self.name!r}: config fields {sorted(clash)} clash with the common flags")
        unknown = set(self.quick) - names
        if unknown:
            raise TypeError(f"recipe {self.name!r}: QUICK names fields the config lacks: {sorted(unknown)}")

    def resolve(self, quick: bool = False, **flags) -> Any:
        """The settings of a run: defaults, then the quick overrides (if ``quick``), then ``flags``."""
        return dataclasses.replace(self.config(), **{**(self.quick if quick else {}), **flags})


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a fresh CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_list(seed: int, n: int) -> list[int]:
    """The seeds of an ``n``-seed run starting at ``seed``: ``seed, seed+1, …, seed+n−1``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of seeds must be a positive int, got {n!r}")
    return [seed + i for i in range(n)]


class RunContext:
    """What a recipe gets besides its settings: the run folder, device, seed, a seeded generator, a progress bar,
    a log and :meth:`observe`."""

    def __init__(self, out_dir: str, seed: int, device: torch.device):
        self.out_dir, self.seed, self.device = out_dir, seed, device
        os.makedirs(out_dir, exist_ok=True)
        self.generator = seed_everything(seed)
        self.observed: dict[str, Any] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def plot_path(self, name: str) -> str:
        if not name.endswith(".png"):
            raise ValueError(f"plot name must end in .png, got {name!r}")
        return self.path(name)

    def progress(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = ""):
        """A tqdm bar on a terminal; silent when output is redirected (use :meth:`log` for run logs)."""
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    def log(self, message: str) -> None:
        print(message, flush=True)

    def observe(self, **values) -> None:
        """Record settings as the run's objects actually received them (checked against the config after the run).
        Observing the same name twice with different values is an error (the run used two values)."""
        for k, v in values.items():
            v = _jsonable(v)
            if k in self.observed and self.observed[k] != v:
                raise RuntimeError(f"observed {k}={v!r} after {k}={self.observed[k]!r}: the run used two values")
            self.observed[k] = v


# ----------------------------------------------------------------------------------------------- the CLI
def _field_type(tp) -> tuple[type, bool, bool]:
    """``(element type, is_tuple, is_optional)`` of a config annotation (int, float, str, bool, Optional[...],
    tuple[T, ...])."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {tp!r}")
        tp, optional = args[0], True
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"tuple config fields must be tuple[T, ...], got {tp!r}")
        return args[0], True, optional
    if tp not in (int, float, str, bool):
        raise TypeError(f"unsupported config annotation {tp!r}")
    return tp, False, optional


def _parse_tuple(elem: type, choices) -> Callable[[str], list]:
    def parse(text: str) -> list:
        out = [elem(v) for v in text.split(",") if v.strip()]
        bad = [v for v in out if choices and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"invalid choice(s) {bad} (choose from {', '.join(map(str, choices))})")
        return out
    return parse


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    """The recipe's command line: the common flags plus one flag per config field (defaults shown; flags not
    given are absent from the parsed namespace, so the runner knows what the user passed)."""
    p = argparse.ArgumentParser(prog=f"python -m methods {recipe.name}", description=recipe.description,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", default=False,
                   help="the small setting (< 30 s on 2 CPU cores): " +
                        ", ".join(f"{k}={_show(v)}" for k, v in recipe.quick.items()))
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    hints = typing.get_type_hints(recipe.config)
    for f in dataclasses.fields(recipe.config):
        elem, is_tuple, optional = _field_type(hints[f.name])
        choices = f.metadata.get("choices")
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} (default {_show(f.default)}"
        help_ += f"; quick {_show(recipe.quick[f.name])})" if f.name in recipe.quick else ")"
        help_ = help_.replace("%", "%%")  # argparse formats help with %
        if elem is bool and not is_tuple:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        elif is_tuple:
            p.add_argument(flag, dest=f.name, nargs="+", type=_parse_tuple(elem, choices), help=help_,
                           metavar=f.name.upper())
        else:
            p.add_argument(flag, dest=f.name, type=elem, choices=choices, help=help_)
    return p


def parse_config(recipe: Recipe, argv: list[str]) -> tuple[argparse.Namespace, Any, list[str]]:
    """``(common flags, resolved config, names of the config fields the user set)`` for ``argv``."""
    ns = build_parser(recipe).parse_args(argv)
    names = {f.name for f in dataclasses.fields(recipe.config)}
    flags = {k: v for k, v in vars(ns).items() if k in names}
    for k, v in flags.items():
        if isinstance(v, list):  # nargs="+" of comma lists: flatten to one tuple
            flags[k] = tuple(x for part in v for x in part)
            if len(set(flags[k])) != len(flags[k]):
                raise SystemExit(f"error: --{k.replace('_', '-')} lists a value twice: {_show(flags[k])}")
    common = argparse.Namespace(**{k: getattr(ns, k) for k in COMMON_FLAGS})
    return common, recipe.resolve(common.quick, **flags), sorted(flags)


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
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples become lists, numpy/torch scalars plain numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def load_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; `python -m methods list` shows the {len(RECIPES)} recipes")
    return importlib.import_module(RECIPES[name][0]).RECIPE


def run_recipe(name: str, argv: Optional[list[str]] = None) -> dict:
    """Run recipe ``name`` with command-line style ``argv``; returns its metrics (also in metrics.json)."""
    recipe = load_recipe(name)
    common, cfg, user_flags = parse_config(recipe, list(argv or []))
    if common.threads:
        torch.set_num_threads(common.threads)
    out = common.out or os.path.join("runs", name)
    ctx = RunContext(out, common.seed, torch.device(common.device))
    config = {"recipe": name, "quick": common.quick, "seed": common.seed, "device": common.device,
              "threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg), "user_flags": user_flags,
              "quick_overrides": dict(recipe.quick) if common.quick else {}, "git_commit": _git_commit(),
              "torch": torch.__version__, "python": sys.version.split()[0]}
    write_json(ctx.path("config.json"), config)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = recipe.run(cfg, ctx)
    if not isinstance(metrics, dict):
        raise TypeError(f"recipe {name!r} returned {type(metrics).__name__}, expected a dict of metrics")
    # CPU time (all threads of this process) is the steadier figure on a shared machine
    metrics = {**metrics, "observed": ctx.observed, "wall_time_s": time.perf_counter() - start,
               "cpu_time_s": time.process_time() - cpu_start}
    write_json(ctx.path("metrics.json"), metrics)
    recorded = _jsonable(config["config"])
    wrong = {k: (recorded.get(k, "<not a config field>"), v) for k, v in ctx.observed.items() if recorded.get(k) != v}
    if wrong:
        raise RuntimeError(f"recipe {name!r}: config.json records {{field: (recorded, used)}} = {wrong}")
    if not any(fn.endswith(".png") for fn in os.listdir(out)):
        raise RuntimeError(f"recipe {name!r} wrote no PNG plot into {out}")
    ctx.log(f"[{name}] wrote {out}/config.json, metrics.json and plots in {metrics['wall_time_s']:.1f} s")
    return metrics


def list_recipes() -> list[tuple[str, str, bool]]:
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
