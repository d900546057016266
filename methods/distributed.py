"""Training beyond one process: DDP / FSDP wrapping, global-batch sharding, exact-resume checkpoints, and one
``torchrun`` entry point that trains the Monarch recipe's tasks (:mod:`methods.tasks`) with the one training
loop, :func:`methods.train.fit` (this module supplies its batch-sharding, loss-averaging and checkpoint hooks).

Run the Monarch recipe's models under ``torchrun`` (gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node=2 -m methods.distributed --task gpt --mlp monarch --steps 200 --out runs/gpt_ddp
    torchrun --nproc_per_node=2 -m methods.distributed --task gpt --size large --strategy fsdp --out runs/gpt_fsdp
    # two machines, 8 GPUs each (run on both, node_rank 0 and 1; the checkpoint folder must be shared):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        -m methods.distributed --task gpt --size large --strategy fsdp --device cuda --out /shared/runs/gpt

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the same command trains in one process.

Semantics (what makes the runs comparable):

- every rank draws the same *global* batch from the same seeded generator and keeps its contiguous slice
  ``rows [rank·B/W, (rank+1)·B/W)``; the per-rank loss is the mean over its slice and DDP/FSDP average the
  gradients, so one step equals the single-process step on the global batch up to float summation order;
- the logged loss is the all-reduced mean of the per-rank losses (= the global-batch loss);
- a checkpoint holds the full (unsharded) model and optimizer state dicts with parameter-name keys
  (``torch.distributed.checkpoint.state_dict.get_state_dict(full_state_dict=True)``), the step, the learning-rate
  schedule position (a pure function of the step) and every RNG state (torch CPU/CUDA, python, numpy, the data
  generator). It is written by rank 0 with ``torch.save`` and read with ``torch.load(weights_only=True)``; it is
  layout-independent, so a checkpoint written under FSDP on 2 ranks resumes single-process and vice versa.
  Resuming continues the same trajectory bitwise on the same world size and device.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from .recipe import seed_everything
from .tasks import SIZES, TASKS, make_task
from .train import cosine_lr, fit, step_batches

CHECKPOINT_FORMAT = "monarch-kernels/train-checkpoint-v1"
STRATEGIES = ("none", "ddp", "fsdp")


# --------------------------------------------------------------------------------------------- environment
@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node), its device, and the
    process-group backend (``None`` when running in a single process without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    owns_group: bool = False  # whether init_distributed created the process group (cleanup destroys only then)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def init_distributed(device: str = "cpu", backend: Optional[str] = None) -> DistEnv:
    """Set up from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...).

    ``device`` is ``"cpu"`` or ``"cuda"``; under ``torchrun`` CUDA ranks use ``cuda:LOCAL_RANK``. The backend
    defaults to NCCL on CUDA and gloo on CPU. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) no process group
    is created and a single-process :class:`DistEnv` is returned. An already initialised process group (e.g.
    set up by a caller that runs several trainings in one launch) is reused and left alone by :func:`cleanup`.
    """
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"init_distributed: device must be 'cpu' or 'cuda[:i]', got {device!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("init_distributed: device='cuda' but torch.cuda.is_available() is False")
        dev = torch.device("cuda", local) if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend(), owns)


def cleanup(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# --------------------------------------------------------------------------------------------- wrapping
def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as separate FSDP units: every element of every ``nn.ModuleList`` (transformer
    blocks in GPT-2 and in the recipe's ViT); the root module takes the rest (embeddings, tied head)."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def wrap_model(model: nn.Module, env: DistEnv, strategy: str = "ddp",
               units: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None) -> nn.Module:
    """Move ``model`` to ``env.device`` and wrap it for data parallelism.

    ``strategy``: ``"none"``; ``"ddp"`` (``DistributedDataParallel``, full replica per rank, gradients
    all-reduced and averaged); ``"fsdp"`` (FSDP2 ``fully_shard``: parameters, gradients and optimizer state
    sharded across ranks; ``units(model)`` picks the separately sharded submodules, default
    :func:`default_fsdp_units`). In a single process (no process group) the model is returned unwrapped for
    every strategy. Build the optimizer *after* wrapping (FSDP replaces parameters by sharded DTensors).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrap_model: strategy must be one of {STRATEGIES}, got {strategy!r}")
    model = model.to(env.device)
    if not env.distributed or strategy == "none":
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    for unit in (units or default_fsdp_units)(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 shards in place, so it is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_batch(batch: Sequence[torch.Tensor], env: DistEnv) -> tuple:
    """This rank's contiguous slice of a global batch (every tensor split along dim 0)."""
    if not isinstance(batch, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise TypeError("shard_batch: batch must be a tuple of tensors with the global batch along dim 0")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch):
        raise ValueError(f"shard_batch: all tensors need the same dim 0, got {[tuple(t.shape) for t in batch]}")
    if n % env.world_size:
        raise ValueError(f"shard_batch: global batch {n} is not divisible by world_size {env.world_size}")
    per = n // env.world_size
    return tuple(t[env.rank * per:(env.rank + 1) * per].to(env.device) for t in batch)


def mean_across(value: torch.Tensor, env: DistEnv) -> float:
    """Mean of a scalar tensor over the ranks (the value itself in one process)."""
    value = value.detach().float().reshape(())
    if env.distributed:
        value = value.to(env.device).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / env.world_size
    return float(value.item())


# --------------------------------------------------------------------------------------------- RNG + checkpoints
def rng_state(generators: Optional[dict] = None) -> dict:
    """All RNG states as tensors/ints/tuples (loadable with ``weights_only=True``)."""
    py = random.getstate()
    npname, npkeys, nppos, nphas, npgauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npname, torch.from_numpy(np.asarray(npkeys, dtype=np.int64)), int(nppos), int(nphas), float(npgauss)],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise ValueError(f"set_rng_state: checkpoint has no state for generator {k!r}")
        g.set_state(state["generators"][k])


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, env: DistEnv,
                    generators: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """Write a full checkpoint (collective: call on every rank; rank 0 writes ``path`` atomically)."""
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        obj = {"format": CHECKPOINT_FORMAT, "step": int(step), "world_size": env.world_size, "model": msd,
               "optimizer": osd, "rng": rng_state(generators), "extra": extra or {}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    barrier(env)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
                    generators: Optional[dict] = None) -> dict:
    """Restore model, optimizer and RNG states from ``path`` (read with ``weights_only=True`` on every rank,
    so it must be visible to every node). Returns the checkpoint's ``{"step": int, "extra": dict}``."""
    if not os.path.isfile(path):
        raise ValueError(f"load_checkpoint: no checkpoint file at {path!r}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    set_state_dict(model, optimizer, model_state_dict=obj["model"], optim_state_dict=obj["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    set_rng_state(obj["rng"], generators)
    return {"step": obj["step"], "extra": obj["extra"], "world_size": obj["world_size"]}


def latest_checkpoint(folder: str) -> Optional[str]:
    """The ``step_<n>.pt`` file with the largest ``n`` in ``folder`` (``None`` if there is none)."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "step_*.pt"))
             if (m := re.search(r"step_(\d+)\.pt$", p))]
    return max(found)[1] if found else None


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m methods.distributed",
                                description="Train the Monarch recipe's models (char GPT-2 on Shakespeare, ViT on "
                                            "MNIST) in one process or under torchrun with DDP/FSDP, with exact resume.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="gpt")
    p.add_argument("--data", choices=("mnist", "digits"), default=None, help="vit only: dataset (default mnist)")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="model size (tiny: tests; small: the recipe's default; large: the FSDP example)")
    p.add_argument("--mlp", choices=("dense", "monarch"), default="monarch")
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="ignored in a single process")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=None, help="global batch (split over the ranks)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--out", default="runs/monarch_distributed", help="run folder (metrics.json, ckpt/)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into OUT/ckpt")
    p.add_argument("--resume", default=None, help="checkpoint file to resume from, or 'auto' (latest in OUT/ckpt)")
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps (and at the end)")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    try:
        task = make_task(args.task, args.size, seed=args.seed, dataset=args.data)
        cfg = task.train_config(global_batch=args.global_batch, lr=args.lr, warmup=args.warmup, steps=args.steps)
        seed_everything(args.seed)  # same seed on every rank: identical init, identical global batches
        model = wrap_model(task.build(args.mlp, args.nblocks, seed=args.seed), env, args.strategy)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
        gen = torch.Generator().manual_seed(args.seed + 1)
        start = 0
        ckpt_dir = os.path.join(args.out, "ckpt")
        resume = latest_checkpoint(ckpt_dir) if args.resume == "auto" else args.resume
        if resume:
            start = load_checkpoint(resume, model, opt, env, {"data": gen})["step"]
        batch = cfg["global_batch"]

        def checkpoint(step: int) -> None:  # one step per epoch: epoch index = step index
            if args.save_every and (step + 1) % args.save_every == 0:
                save_checkpoint(os.path.join(ckpt_dir, f"step_{step + 1}.pt"), model, opt, step + 1, env,
                                {"data": gen})

        hist = fit(model, opt, step_batches(lambda: task.batch(gen, batch)), epochs=args.steps, loss_fn=task.loss,
                   schedule=cosine_lr(cfg["lr"], args.steps, cfg["warmup"]), start_epoch=start,
                   prepare=lambda b: shard_batch(b, env), reduce=lambda loss: mean_across(loss, env),
                   evaluate=task.evaluate if args.eval_every else None, eval_every=args.eval_every,
                   on_epoch_end=checkpoint)
        final = task.evaluate(model)
        metrics = {"task": args.task, "size": args.size, "mlp": args.mlp, "strategy": args.strategy if env.distributed
                   else "none", "world_size": env.world_size, "backend": env.backend, "device": str(env.device),
                   "global_batch": batch, "start_step": start, "steps": args.steps, "resumed_from": resume,
                   "losses": hist.losses, "step_times_s": hist.step_times, "evals": hist.evals,
                   "final": final, "params": sum(p.numel() for p in unwrap(model).parameters())}
        if env.is_main:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            print(f"[distributed] rank0/{env.world_size} {args.task}-{args.mlp} steps {start}..{args.steps} "
                  f"loss {hist.losses[-1] if hist.losses else float('nan'):.4f} final {final}", flush=True)
        return metrics
    finally:
        cleanup(env)


if __name__ == "__main__":
    main()
