"""Layer and model benchmarks: where users feel the speed (issue: small batch, real models).

``python -m bench.models [--quick] [--device cuda] [--dtype bfloat16] [--out DIR]`` measures, side by side in
one process, dense vs Monarch (every available backend; ``torch``, the two-``bmm`` reference, is the baseline
the others are compared with):

1. **MLP** ``d -> 4d -> d`` with GELU (GPT-2-small width 768 and a wider 2048): forward and training step
   (forward + backward) time and tokens/s;
2. **transformer block** (GPT-2-small shaped) and a **small GPT** (Hugging Face GPT-2 architecture, Monarch
   MLPs through ``monarchify``): training-step tokens/s, eager and ``torch.compile``, and generation tokens/s
   (greedy decoding with the KV cache: the small-batch regime);
3. **saved activations** per layer: bytes autograd keeps for backward (``saved_tensors_hooks``), dense vs
   Monarch per backend, eager: the compiled backends recompute the stage-1 intermediate (the layer saves what
   ``nn.Linear`` saves, its input); the ``torch`` reference keeps it, as fly's Function does.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch
from torch import nn

import monarch_kernels as mk
from methods.models import tiny_gpt2
from monarch_kernels.layers import MonarchLinear

from .timing import device_name, median_time_us, pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mlp(d: int, variant: str, nblocks: int, device, dtype) -> nn.Module:
    """``Linear(d, 4d) -> GELU -> Linear(4d, d)`` with dense or Monarch (backend ``variant``) layers."""
    if variant == "dense":
        layers = [nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    else:
        backend = None if variant == "auto" else variant
        layers = [MonarchLinear(d, 4 * d, nblocks=nblocks, backend=backend),
                  MonarchLinear(4 * d, d, nblocks=nblocks, backend=backend)]
    return nn.Sequential(layers[0], nn.GELU(), layers[1]).to(device, dtype)


def variants(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = [n for n, s in mk.available_backends().items()
             if s == "available" and mk.backends.get(n).supports(device, dtype)]
    return ["dense", *names]


def _step(model, x):
    def run():
        for p in model.parameters():
            p.grad = None
        model(x).float().pow(2).mean().backward()
    return run


def bench_mlp(widths, tokens, device, dtype, budget, nblocks=4) -> list[dict]:
    rows = []
    for d in widths:
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        base = {}
        for v in variants(device, dtype):
            torch.manual_seed(0)
            model = mlp(d, v, nblocks, device, dtype)
            with torch.no_grad():
                fwd = median_time_us(lambda: model(x), device, budget_s=budget)
            train = median_time_us(_step(model, x), device, budget_s=budget)
            base.setdefault("fwd", fwd)
            base.setdefault("train", train)
            rows.append({"bench": "mlp", "shape": f"d={d} T={tokens}", "impl": v,
                         "fwd_ms": fwd / 1e3, "train_ms": train / 1e3,
                         "train_tok_s": tokens / (train * 1e-6),
                         "x_dense_fwd": base["fwd"] / fwd, "x_dense_train": base["train"] / train})
    return rows


def gpt(n_layer, d, n_head, vocab, n_pos, mlp_kind, backend, device, dtype):
    return tiny_gpt2(vocab, n_layer=n_layer, n_embd=d, n_head=n_head, n_positions=n_pos, mlp=mlp_kind, seed=0,
                     backend=backend).to(device, dtype)


def bench_gpt(cfgs, device, dtype, budget, compile_too: bool) -> list[dict]:
    """Training-step tokens/s (eager and compiled) and greedy-generation tokens/s."""
    rows = []
    for name, (n_layer, d, n_head, batch, seq, gen_tokens) in cfgs.items():
        vocab = 256
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        base = {}
        for v in variants(device, dtype):
            model = gpt(n_layer, d, n_head, vocab, seq + gen_tokens, "dense" if v == "dense" else "monarch",
                        None if v in ("dense", "auto") else v, device, dtype)

            def train_step(m=model):
                for p in m.parameters():
                    p.grad = None
                m(ids, labels=ids).loss.backward()

            row = {"bench": "gpt", "shape": f"{name} L={n_layer} d={d} B={batch} T={seq}", "impl": v}
            t = median_time_us(train_step, device, budget_s=budget)
            row["train_tok_s"] = batch * seq / (t * 1e-6)
            if compile_too:
                cmodel = torch.compile(model)

                def ctrain(m=cmodel):
                    for p in m.parameters():
                        p.grad = None
                    m(ids, labels=ids).loss.backward()

                ctrain()  # compile outside the timed region
                t = median_time_us(ctrain, device, budget_s=budget)
                row["train_tok_s_compiled"] = batch * seq / (t * 1e-6)
            prompt = ids[:1, :8]
            with torch.no_grad():
                gen = lambda m=model: m.generate(prompt, max_new_tokens=gen_tokens, do_sample=False,
                                                 min_new_tokens=gen_tokens, pad_token_id=0)
                t = median_time_us(gen, device, budget_s=budget, min_reps=3)
            row["generate_tok_s"] = gen_tokens / (t * 1e-6)
            for key in ("train_tok_s", "train_tok_s_compiled", "generate_tok_s"):
                if key in row:
                    base.setdefault(key, row[key])
                    row[f"x_dense_{key}"] = row[key] / base[key]
            rows.append(row)
    return rows


@contextlib.contextmanager
def count_saved_bytes(params):
    """Sum of bytes of tensors autograd saves for backward, excluding the parameters themselves."""
    ids = {p.data_ptr() for p in params}
    total = [0]

    def pack(t):
        if t.data_ptr() not in ids:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def bench_memory(widths, tokens, device, dtype) -> list[dict]:
    rows = []
    for d in widths:
        for v in variants(device, dtype):
            torch.manual_seed(0)
            layer = mlp(d, v, 4, device, dtype)[0]  # the d -> 4d layer
            x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            with count_saved_bytes(list(layer.parameters())) as saved:
                layer(x)
            rows.append({"bench": "saved_activations", "shape": f"{d}->{4 * d} T={tokens}", "impl": v,
                         "saved_MiB": saved[0] / 2**20, "x_input_bytes": saved[0] / x.numel() / x.element_size()})
    return rows


def format_rows(rows: list[dict]) -> str:
    out = []
    for bench in dict.fromkeys(r["bench"] for r in rows):
        sub = [r for r in rows if r["bench"] == bench]
        keys = [k for k in sub[0] if k != "bench"]
        for r in sub:
            keys += [k for k in r if k not in keys and k != "bench"]
        cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
        widths = {k: max(len(k), *(len(cell(r.get(k, "-"))) for r in sub)) for k in keys}
        out.append(f"[{bench}]")
        out.append("  ".join(k.ljust(widths[k]) for k in keys))
        out += ["  ".join(cell(r.get(k, "-")).ljust(widths[k]) for k in keys) for r in sub]
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mlp", "x_dense_train", "MLP training step"), ("mlp", "x_dense_fwd", "MLP forward"),
              ("gpt", "x_dense_train_tok_s", "GPT training tokens/s"),
              ("gpt", "x_dense_generate_tok_s", "GPT generation tokens/s")]
    panels = [p for p in panels if any(r["bench"] == p[0] and p[1] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (bench, key, name) in zip(axes[0], panels):
        sub = [r for r in rows if r["bench"] == bench and key in r]
        labels = [f"{r['shape']}\n{r['impl']}" for r in sub]
        ax.barh(range(len(sub)), [r[key] for r in sub], color=["gray" if r["impl"] == "dense" else "C0" for r in sub])
        ax.set_yticks(range(len(sub)), labels, fontsize=6)
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("speedup vs dense")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training (slow to compile on CPU)")
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    gpu = device.type == "cuda"
    budget = args.budget or (0.1 if gpu else (0.2 if args.quick else 0.5))
    tokens = (16384 if gpu else (256 if args.quick else 1024))
    widths = [768, 2048] if not args.quick or gpu else [768]
    gpt_cfgs = ({"block": (1, 768, 12, 8 if gpu else 2, 1024 if gpu else 128, 32),
                 "gpt": (12 if gpu else 4, 768 if gpu else 256, 12 if gpu else 4, 8 if gpu else 4,
                         1024 if gpu else 128, 64)}
                if not args.quick else {"gpt": (2, 128, 4, 4, 64, 16)})
    started = time.time()
    print(f"device: {device_name(device)} | dtype: {str(dtype)[6:]} | torch {torch.__version__}")
    rows = bench_mlp(widths, tokens, device, dtype, budget)
    rows += bench_memory(widths, tokens, device, dtype)
    rows += bench_gpt(gpt_cfgs, device, dtype, budget, args.compile)
    title = (f"dense vs Monarch on {device_name(device)}, {str(dtype)[6:]}, "
             f"{datetime.date.today().isoformat()} (speedup = dense time / time)")
    print(f"{title}  [{time.time() - started:.0f} s]\n")
    print(format_rows(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "models.json"), "w") as f:
            json.dump({"device": device_name(device), "dtype": str(dtype)[6:], "torch": torch.__version__,
                       "argv": sys.argv[1:], "rows": rows}, f, indent=1)
        print("wrote", plot(rows, os.path.join(args.out, "models.png"), title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
