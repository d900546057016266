"""``python -m methods ocm``: online class-incremental split MNIST, fine-tuning vs ER vs OCM (with and without
preservation), over seeds."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

import torch

from ..data import load_image_dataset
from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, format_mean_std, paired, plot_curves
from .stream import METHODS, run_stream


@dataclass(frozen=True)
class Config:
    dataset: str = option("mnist", "image dataset", choices=("mnist", "digits"))
    tasks: int = option(5, "class-incremental tasks (classes split evenly)")
    buffer_size: int = option(1000, "reservoir memory (official MNIST: 1000)")
    stream_batch: int = option(10, "incoming batch size")
    hidden: int = option(400, "encoder width (official MNIST: 400)")
    layer: str = option("monarch", "encoder and projection layers", choices=("dense", "monarch", "blockdiag"))
    lr: float = option(1e-3, "Adam learning rate")
    temperature: float = option(0.07, "InfoNCE temperature τ")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")
    methods: tuple[str, ...] = option(METHODS, "methods to compare", choices=METHODS)
    buffer_batch: int = option(64, "cap of the buffer batch min(cap, 7·classes seen)")
    crop_scale: float = option(0.3, "min area of the random resized crop")
    max_per_task: Optional[int] = option(None, "cap on stream samples per task")


QUICK = {"dataset": "digits", "seeds": 1, "hidden": 128, "max_per_task": 40, "buffer_size": 100, "buffer_batch": 16}
KEYS = ("final_accuracy", "forgetting", "old_tasks_accuracy", "last_task_accuracy", "final_accuracy_ncm",
        "forgetting_ncm")


def run(cfg: Config, ctx: RunContext) -> dict:
    split = load_image_dataset(cfg.dataset, ctx.seed)
    per = split.num_classes // cfg.tasks
    if per < 1:
        raise ValueError(f"--tasks must be <= {split.num_classes}")
    tasks = [list(range(t * per, (t + 1) * per)) for t in range(cfg.tasks)]
    n_steps = sum(math.ceil(min(int(torch.isin(split.y_train, torch.tensor(t)).sum()),
                                cfg.max_per_task or 10**9) / cfg.stream_batch) for t in tasks)
    bar = ctx.progress(total=n_steps * cfg.seeds * len(cfg.methods), desc="ocm")
    runs = {m: [] for m in cfg.methods}
    for seed in seed_list(ctx.seed, cfg.seeds):
        for m in cfg.methods:
            r = run_stream(m, split, tasks, seed=seed, buffer_size=cfg.buffer_size, stream_batch=cfg.stream_batch,
                           hidden=cfg.hidden, layer=cfg.layer, lr=cfg.lr, temperature=cfg.temperature,
                           max_per_task=cfg.max_per_task, buffer_batch_cap=cfg.buffer_batch,
                           crop_scale=(cfg.crop_scale, 1.0), progress=bar)
            r["old_tasks_accuracy"] = statistics.fmean(r["acc_matrix"][-1][:-1])
            r["last_task_accuracy"] = r["acc_matrix"][-1][-1]
            runs[m].append(r)
            ctx.observe(**r.pop("settings"), dataset=split.name)
            ctx.log(f"seed {seed} {m:11s} final acc {r['final_accuracy']:.3f} forgetting {r['forgetting']:.3f} "
                    f"(NCM {r['final_accuracy_ncm']:.3f} / {r['forgetting_ncm']:.3f})")
    bar.close()
    ctx.observe(seeds=len(runs[cfg.methods[0]]))
    summary = {m: aggregate([{k: r[k] for k in KEYS} for r in rs]) for m, rs in runs.items()}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[k] for r in runs[a]], [r[k] for r in runs[b]]) for k in KEYS}
                   for a, b in (("ocm", "er"), ("ocm", "ocm_no_pre"), ("er", "finetune")) if {a, b} <= set(runs)}
    for m in runs:
        ctx.log(f"{m:11s} final accuracy {format_mean_std(summary[m]['final_accuracy'])}")
    seen_acc = {m: [statistics.fmean(statistics.fmean(r["acc_matrix"][t][: t + 1]) for r in rs)
                    for t in range(len(tasks))] for m, rs in runs.items()}
    plot_curves(ctx.plot_path("ocm.png"), [
        Panel("mean accuracy over the tasks seen", {m: (range(1, len(tasks) + 1), v) for m, v in seen_acc.items()},
              xlabel="tasks learned", ylabel="accuracy", markers=True),
        Panel("at the end of the stream", kind="bar", groups={
            label: {m: summary[m][k] for m in runs} for k, label in (("final_accuracy", "final accuracy"),
                                                                   ("final_accuracy_ncm", "final acc. (NCM)"),
                                                                   ("forgetting", "forgetting"))})],
        title=f"online class-incremental split {cfg.dataset} ({cfg.tasks} tasks, buffer {cfg.buffer_size}, "
              f"{cfg.seeds} seeds, {cfg.layer} MLP)")
    return {"dataset": cfg.dataset, "tasks": tasks, "seeds": seed_list(ctx.seed, cfg.seeds), "summary": summary,
            "paired": comparisons, "runs": runs}


RECIPE = Recipe("ocm", Config, run, quick=QUICK,
                description="OCM (Guo et al. 2022): online class-incremental learning with 16-view rotation "
                            "pseudo-classes, InfoNCE and MI preservation, vs fine-tuning and experience replay")
