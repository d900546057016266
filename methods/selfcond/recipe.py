"""``python -m methods selfcond``: a Monarch GPT-2 trained on Shakespeare, expert units for a theme, and the
theme's frequency and perplexity of generations with k expert vs k random units forced."""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..data import CharTokenizer, WordTokenizer, load_shakespeare
from ..models import tiny_gpt2
from ..recipe import Recipe, option
from ..report import Panel, plot_curves
from ..train import fit, lm_batches, lm_eval_loss, lm_loss, step_batches
from .expertise import Expertise, collect_responses, compute_expertise, force_units, select_units, unit_layers
from .generation import concept_probability, generate, generated_perplexity


#: theme lexicons (lower-case whole words); a line shows the concept when it contains one of them
THEMES = {
    "love": ("love", "loves", "loved", "lover", "lovers", "loving", "beloved"),
    "royalty": ("king", "kings", "queen", "queens", "crown", "throne", "majesty", "royal", "prince"),
    "death": ("death", "die", "dies", "died", "dead", "grave", "kill", "killed"),
    "war": ("war", "wars", "sword", "swords", "battle", "soldier", "soldiers", "fight"),
}


def theme_regex(words: Iterable[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def concept_lines(text: str, words: Iterable[str], n_pos: int, n_neg: int, generator: torch.Generator,
                  min_len: int = 24, max_len: int = 96) -> tuple[list[str], list[str]]:
    """Positive lines (containing a theme word) and negative lines (none) of dialogue from ``text``;
    speaker headings (short lines ending in '.') and stage directions ('[...]') are skipped."""
    pat = theme_regex(words)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if min_len <= len(ln) <= max_len and not ln.startswith("[")]
    pos = [ln for ln in lines if pat.search(ln)]
    neg = [ln for ln in lines if not pat.search(ln)]
    if len(pos) < n_pos or len(neg) < n_neg:
        raise ValueError(f"not enough concept lines: {len(pos)} positive / {len(neg)} negative available")
    pick = lambda xs, n: [xs[i] for i in torch.randperm(len(xs), generator=generator)[:n].tolist()]
    return pick(pos, n_pos), pick(neg, n_neg)


@dataclass(frozen=True)
class Config:
    concept: str = option("love", "theme whose lines form the concept", choices=sorted(THEMES))
    tokenizer: str = option("word", "word: a word vocabulary (concept words are single tokens, as with GPT-2's BPE); "
                                    "char: methods.data.CharTokenizer", choices=("word", "char"))
    vocab: int = option(2000, "word vocabulary size")
    max_chars: Optional[int] = option(None, "Shakespeare text used (characters; default all)")
    steps: int = option(2000, "LM training steps")
    n_layer: int = option(3, "GPT-2 layers")
    n_embd: int = option(128, "GPT-2 width")
    block: int = option(64, "training context length (tokens)")
    batch_size: int = option(32, "LM batch size")
    lr: float = option(3e-3, "AdamW peak learning rate (one-cycle schedule)")
    nblocks: int = option(4, "Monarch blocks of the MLP layers")
    sentences: int = option(300, "positive (and negative) concept lines")
    ks: tuple[int, ...] = option((0, 1, 3, 10, 30, 100, 300), "numbers of forced units")
    samples: int = option(100, "generations per k")
    gen_len: Optional[int] = option(None, "generated tokens per sample (default 20 words / 80 chars)")
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(10, "top-k sampling")
    random_draws: int = option(3, "random-unit sets per k (control)")
    load_lm: Optional[str] = option(None, "state dict (lm.pt of an earlier run with the same model options) to load "
                                          "instead of training; every run saves its LM as lm.pt")


QUICK = {"steps": 30, "n_layer": 2, "n_embd": 64, "block": 32, "sentences": 60, "samples": 16, "gen_len": 12,
         "random_draws": 1, "ks": (0, 3, 30), "vocab": 500, "max_chars": 1_000_000}


def _presence(texts: list[str], pat: re.Pattern) -> tuple[float, float]:
    """Fraction of texts with at least one concept word, and concept words per 100 words of text."""
    hits = [len(pat.findall(t)) for t in texts]
    nwords = max(1, sum(len(re.findall(r"[A-Za-z']+", t)) for t in texts))
    return sum(h > 0 for h in hits) / len(texts), 100.0 * sum(hits) / nwords


def train_lm(cfg: Config, tok, train_ids: Tensor, ctx) -> tuple[nn.Module, list[float]]:
    """A GPT-2 (Monarch MLPs) trained on the text (AdamW, one-cycle LR, gradient norm clipped at 1), or loaded
    from ``cfg.load_lm``; saved as ``lm.pt`` in the run folder."""
    torch.manual_seed(ctx.seed)
    model = tiny_gpt2(tok.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=4,
                      n_positions=max(128, cfg.block), mlp="monarch", nblocks=cfg.nblocks).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    losses = []
    if cfg.load_lm:
        model.load_state_dict(torch.load(cfg.load_lm, map_location=ctx.device, weights_only=True))
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
        def draw():
            xb, yb = lm_batches(train_ids, cfg.block, cfg.batch_size, ctx.generator)
            ctx.observe(block=xb.shape[1])
            return xb, yb

        hist = fit(model, opt, step_batches(draw), epochs=cfg.steps, loss_fn=lm_loss, schedule=sched,
                   clip_grad_norm=1.0, progress=ctx.progress,
                   desc="train LM")
        losses = hist.losses
        ctx.observe(steps=hist.epochs)
    ctx.observe(n_layer=len(model.transformer.h), n_embd=model.transformer.wte.embedding_dim)
    torch.save(model.state_dict(), ctx.path("lm.pt"))
    return model, losses


def generation_sweep(model, tok, expertise: Expertise, pat: re.Pattern, concept_ids, cfg: Config, gen_len: int,
                     ctx) -> tuple[dict, list, list]:
    """For every k: generations with the k expert units forced (and with k random units, ``random_draws`` sets),
    the same sampling noise for every k; returns the measures per mode and samples at k = 0 and k = max."""
    prompt = tok.encode("\n").repeat(cfg.samples, 1)
    results, base_texts, forced_texts = {"top": [], "random": []}, None, None
    for k in ctx.progress(cfg.ks, desc="generate"):
        for mode in ("top", "random"):
            rows = []
            for d in range(1 if (mode == "top" or k == 0) else cfg.random_draws):
                assignment = select_units(expertise, k, mode, generator=ctx.generator)
                gen = torch.Generator().manual_seed(ctx.seed * 1000 + d)
                with force_units(model, assignment):
                    out = generate(model, prompt, gen_len, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
                if cfg.gen_len is not None:
                    ctx.observe(gen_len=out.shape[1] - prompt.shape[1])
                    p_concept = (concept_probability(model, out, concept_ids, 1)
                                 if concept_ids is not None and len(concept_ids) else float("nan"))
                texts = [tok.decode(row[1:]) for row in out]
                rows.append((*_presence(texts, pat), generated_perplexity(model, out, 1), p_concept))
                base_texts = texts if k == 0 and base_texts is None else base_texts
                forced_texts = texts if mode == "top" and k == max(cfg.ks) else forced_texts
            mean = [statistics.fmean(r[i] for r in rows) for i in range(4)]
            results[mode].append({"k": k, "presence": mean[0], "concept_words_per_100_words": mean[1],
                                  "perplexity": mean[2], "p_concept_next_token": mean[3],
                                  "presence_draws": [r[0] for r in rows]})
            ctx.log(f"[selfcond] k={k:4d} {mode:6s}: p(concept in sample) {mean[0]:.3f}, {mean[1]:.2f} concept "
                    f"words/100 words, next-token p(concept) {mean[3]:.4f}, unforced-model perplexity {mean[2]:.2f}")
    ctx.observe(samples=prompt.shape[0], ks=[r["k"] for r in results["top"]])
    if any(cfg.ks):  # random draws are taken for k > 0 only
        ctx.observe(random_draws=max(len(r["presence_draws"]) for r in results["random"]))
    return results, base_texts, forced_texts


def run(cfg: Config, ctx) -> dict:
    text = load_shakespeare(max_chars=cfg.max_chars)
    tok = WordTokenizer(text, cfg.vocab) if cfg.tokenizer == "word" else CharTokenizer(text)
    unit_name = "word" if cfg.tokenizer == "word" else "char"
    gen_len = cfg.gen_len or (20 if cfg.tokenizer == "word" else 80)
    ids = tok.encode(text)
    train_ids, val_ids = ids[:int(0.95 * len(ids))], ids[int(0.95 * len(ids)):]
    # the text and the word vocabulary can be smaller than asked (the corpus is finite): observed when capped
    if cfg.max_chars is not None and len(text) >= cfg.max_chars:
        ctx.observe(max_chars=len(text))
    if cfg.tokenizer == "word" and tok.vocab_size >= cfg.vocab:
        ctx.observe(vocab=tok.vocab_size)
    model, losses = train_lm(cfg, tok, train_ids, ctx)
    val_loss = lm_eval_loss(model, val_ids, cfg.block, batches=4, batch_size=16, seed=ctx.seed)
    train_loss = statistics.fmean(losses[-20:]) if losses else float("nan")
    ctx.log(f"[selfcond] LM ({cfg.tokenizer} tokens): train loss {train_loss:.3f}, val loss {val_loss:.3f} "
            f"nats/{unit_name}")
    # concept sentences (dialogue lines with / without a theme word) and expertise
    words, pat = THEMES[cfg.concept], theme_regex(THEMES[cfg.concept])
    pos, neg = concept_lines(text, words, cfg.sentences, cfg.sentences, ctx.generator)
    ctx.observe(sentences=len(pos))
    layers = unit_layers(model)
    responses = collect_responses(model, [tok.encode("\n" + s) for s in pos + neg], layers)
    expertise = compute_expertise(responses, torch.tensor([1] * len(pos) + [0] * len(neg)), layers)
    order = expertise.ranking()
    kinds = Counter(layer.split(".", 3)[-1] for layer, _ in expertise.locate(order[:max(cfg.ks)]))
    concept_ids = (torch.tensor([tok.index[w] for w in words if w in tok.index]) if cfg.tokenizer == "word" else None)
    results, base_texts, forced_texts = generation_sweep(model, tok, expertise, pat, concept_ids, cfg, gen_len, ctx)
    top, rnd = results["top"], results["random"]
    xs = [max(k, 0.5) for k in cfg.ks]
    plot_curves(ctx.plot_path("selfcond.png"), [
        Panel(f"p('{cfg.concept}' word in a {gen_len}-{unit_name} sample)",
              {"expert units (top AP)": (xs, [r["presence"] for r in top]),
               "random units": (xs, [r["presence"] for r in rnd])}, xlabel="k forced units (0 plotted at 0.5)",
              logx=True, markers=True),
        Panel("perplexity of the samples (unforced model)",
              {"expert units (top AP)": (xs, [r["perplexity"] for r in top]),
               "random units": (xs, [r["perplexity"] for r in rnd])},
              xlabel="k forced units", logx=True, logy=True, markers=True),
        Panel(f"unit AP for '{cfg.concept}' ({expertise.num_units} units)", {"AP": expertise.ap.tolist()},
              kind="hist", logy=True)])
    best_top = max(r["presence"] for r in top[1:]) if len(top) > 1 else top[0]["presence"]
    best_rnd = max(r["presence"] for r in rnd[1:]) if len(rnd) > 1 else rnd[0]["presence"]
    return {"concept": cfg.concept, "tokenizer": cfg.tokenizer, "seed": ctx.seed, "lm_train_loss": train_loss,
            "lm_val_loss": val_loss, "uniform_loss": math.log(tok.vocab_size), "num_units": expertise.num_units,
            "ap_max": float(expertise.ap.max()), "ap_top10_mean": float(expertise.ap[order[:10]].mean()),
            "ap_median": float(expertise.ap.median()),
            "top10_units": [f"{layer}[{i}]" for layer, i in expertise.locate(order[:10])],
            f"top{max(cfg.ks)}_units_by_layer_kind": dict(kinds), "ks": list(cfg.ks), "expert": top, "random": rnd,
            "presence_base": top[0]["presence"], "presence_expert_best": best_top, "presence_random_best": best_rnd,
            "effect_appears": bool(best_top > top[0]["presence"] and best_top > best_rnd),
            "sample_unforced": base_texts[:3], "sample_forced_max_k": forced_texts[:3]}


RECIPE = Recipe("selfcond", Config, run, quick=QUICK,
                description="Self-conditioning (Suau et al. 2022): find expert units by AP, force them to steer "
                            "generation")
