"""Self-conditioning pre-trained language models (Suau, Zappella & Apostoloff, ICML 2022).

Expert units are found and forced, with no training and no gradients:

1. **Units** are the output coordinates of every linear-like layer of a causal LM: ``nn.Linear``, Hugging
   Face GPT-2 ``Conv1D`` and the structured layers of :mod:`layers` (``MonarchLinear``, ``BlockdiagLinear``).
   In GPT-2 these are ``attn.c_attn`` (3d), ``attn.c_proj`` (d), ``mlp.c_fc`` (4d, pre-GELU because the hook
   sits on the linear map) and ``mlp.c_proj`` (d). ``lm_head`` is left out by default, as in the official
   layer regex.
2. **Responses** (:func:`collect_responses`): forward hooks record each unit's output, and the response of
   unit ``m`` to sentence ``s`` is the max over tokens ``z_m(s) = max_t y_m(s, t)``.
3. **Expertise** (:func:`compute_expertise`): every unit is a detector of concept ``c`` with score
   ``z_m``; ``AP_m = Σ_n (R_n − R_{n−1}) P_n`` is its average precision (:func:`average_precision`, equal to
   ``sklearn.metrics.average_precision_score``) on positive (concept) vs negative sentences. Per unit the
   positive median ``on_p50``, ``on_p90`` and the negative mean ``off_mean`` are kept as well.
4. **Intervention** ``do(c, k)`` (:func:`select_units`, :func:`force_units`): the ``k`` units of highest AP
   are set to ``on_p50`` at *every* position, both for the prompt and for every generated token.
   ``mode="random"`` forces ``k`` random units to their own ``on_p50`` instead (the official ``top_n=0``
   control).
5. **Measures**: the concept's frequency in the generations and the perplexity of the generated text under
   the *unforced* model (:func:`generated_perplexity`).

Where this follows / deviates from apple/ml-selfcond:

* hooks on the same four GPT-2 layer kinds, max pooling, AP, forcing to ``on_p50`` at all positions and
  random-unit controls follow ``selfcond/{responses,expertise,generation}.py``;
* the max over tokens here runs over the real tokens only; the official code pads sentences with EOS to
  length 128 and its max also runs over the pads (:func:`collect_responses` has ``include_padding`` for
  that behaviour);
* generation is our own loop (:func:`generate`, full recomputation, optional top-k/top-p, a
  ``torch.Generator`` for reproducibility) instead of Hugging Face ``generate``; it works for any module
  that maps ``(B, T)`` token ids to logits ``(B, T, V)`` or to an object with ``.logits``;
* the concept sentences come from the training text itself (the official ones from OneSec, 700 positive /
  1000 negative); generation starts from a newline token (the official single example starts from EOS)
  with top-k 10 at temperature 1, as in the official ``generate_batch.py`` sweep.

The demo (:data:`RECIPE`, ``python -m methods selfcond``) trains a small GPT-2 (Hugging Face
``GPT2LMHeadModel``, random init, Monarch MLPs through :func:`monarch_kernels.layers.monarchify`) on Shakespeare, with a
2000-word vocabulary by default (concept words are single tokens, as with GPT-2's BPE) or characters
(``--tokenizer char``). The concept is a theme: dialogue lines with one of the theme's words vs lines
without. For ``k`` expert units and for ``k`` random units it reports the fraction of generated samples that
contain a theme word, theme words per 100 words, the forced model's next-token probability mass on the
theme words, and the perplexity of the samples under the unforced model.
"""
from __future__ import annotations

import contextlib
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from monarch_kernels.layers import StructuredLinear

from .data import CharTokenizer, WordTokenizer, load_shakespeare
from .models import tiny_gpt2
from .recipe import Recipe, option
from .report import Panel, plot_curves
from .train import fit, lm_batches, lm_eval_loss, lm_loss, step_batches

# ---------------------------------------------------------------------------------------------------------
# units and hooks


def is_unit_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a linear-like layer whose outputs are units: ``nn.Linear``, GPT-2 ``Conv1D``,
    or a structured linear layer from :mod:`layers` (``MonarchLinear``, ``BlockdiagLinear``)."""
    return isinstance(module, (nn.Linear, StructuredLinear, Conv1D))


def _out_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):
        return int(module.out_features)
    if hasattr(module, "nf"):  # GPT-2 Conv1D
        return int(module.nf)
    raise TypeError(f"cannot tell the output size of {type(module).__name__}")


def unit_layers(model: nn.Module, include: Optional[Sequence[str]] = None,
                exclude: Sequence[str] = ("lm_head",)) -> dict[str, nn.Module]:
    """The unit layers of ``model`` in module order, ``{qualified name: module}``.

    ``include``/``exclude`` are regular expressions searched in the qualified name (the official code
    selects layers with a regex too); by default every linear-like layer except ``lm_head``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = {}
    for name, module in model.named_modules():
        if not name or not is_unit_layer(module):
            continue
        if include is not None and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        out[name] = module
    if not out:
        raise ValueError("no unit layers found: the model has no nn.Linear / Conv1D / MonarchLinear layers "
                         f"matching include={include} exclude={list(exclude)}")
    return out


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def _check_ids(name: str, ids) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        raise ValueError(f"{name} must be a LongTensor of token ids with shape (batch, seq_len), got "
                         f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, Tensor) else ''}")
    return ids


@torch.no_grad()
def collect_responses(model: nn.Module, sentences: Sequence[Tensor], layers: dict[str, nn.Module], *,
                      batch_size: int = 64, pad_id: int = 0, include_padding: bool = False) -> Tensor:
    """Max-over-tokens responses of every unit of ``layers`` to each sentence.

    ``sentences``: a list of 1-D LongTensors of token ids (any lengths ≥ 1). Returns ``(N, M)`` with
    ``M = Σ_layer out_features`` in the order of ``layers``; ``z[s, m] = max_t y_m(s, t)``. Sentences are
    right-padded with ``pad_id`` (harmless for a causal LM) and the pads are left out of the max unless
    ``include_padding``.
    """
    if not sentences:
        raise ValueError("sentences must be a non-empty list of 1-D LongTensors")
    for i, s in enumerate(sentences):
        if not isinstance(s, Tensor) or s.dim() != 1 or s.dtype != torch.long or len(s) == 0:
            raise ValueError(f"sentences[{i}] must be a non-empty 1-D LongTensor of token ids")
    device = next(model.parameters()).device
    names = list(layers)
    captured: dict[str, Tensor] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            captured[name] = output
        return hook

    handles = [layers[n].register_forward_hook(make_hook(n)) for n in names]
    rows = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sentences), batch_size):
            chunk = sentences[start:start + batch_size]
            lengths = torch.tensor([len(s) for s in chunk])
            ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = s
            valid = (torch.arange(ids.shape[1])[None] < lengths[:, None]).to(device)
            captured.clear()
            model(ids.to(device))
            pooled = []
            for n in names:
                y = captured[n].float()
                if not include_padding:
                    y = y.masked_fill(~valid[..., None], float("-inf"))
                pooled.append(y.amax(dim=1).cpu())
            rows.append(torch.cat(pooled, dim=1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------------------
# expertise


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of every column of ``scores`` as a detector of ``labels`` (vectorised).

    ``scores``: ``(N,)`` or ``(N, M)``; ``labels``: ``(N,)`` of 0/1. Returns a scalar or ``(M,)``:
    ``AP = Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds in decreasing order, with tied
    scores forming one threshold, exactly as ``sklearn.metrics.average_precision_score``.
    """
    if not isinstance(scores, Tensor) or scores.dim() not in (1, 2):
        raise ValueError("scores must be a tensor of shape (N,) or (N, M)")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {tuple(labels.shape)}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0/1")
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels hold no positive example; average precision is undefined")
    squeeze = scores.dim() == 1
    s = scores.double()[:, None] if squeeze else scores.double()
    s_sorted, order = s.sort(dim=0, descending=True, stable=True)
    y = labels.double()[order]  # (N, M)
    tp = y.cumsum(0)
    rank = torch.arange(1, s.shape[0] + 1, dtype=torch.float64)[:, None]
    # the last row of each group of tied scores is a threshold
    end = torch.ones_like(s_sorted, dtype=torch.bool)
    end[:-1] = s_sorted[:-1] != s_sorted[1:]
    tp_end = torch.where(end, tp, torch.zeros_like(tp))
    prev = torch.cat([torch.zeros_like(tp[:1]), tp_end.cummax(0).values[:-1]])  # tp at the previous threshold
    ap = (end * (tp - prev) / n_pos * (tp / rank)).sum(0)
    return ap[0] if squeeze else ap


@dataclass
class Expertise:
    """Per-unit expertise of a model for one concept; units are indexed ``0..M-1`` in layer order."""

    layer_names: list[str]
    layer_sizes: list[int]
    ap: Tensor  # (M,) average precision
    on_p50: Tensor  # (M,) median response on positive sentences (the forcing value)
    on_p90: Tensor  # (M,)
    off_mean: Tensor  # (M,) mean response on negative sentences

    @property
    def num_units(self) -> int:
        return int(self.ap.numel())

    def locate(self, unit: Tensor) -> list[tuple[str, int]]:
        """``(layer name, index within the layer)`` of global unit indices."""
        offsets = torch.tensor([0] + list(self.layer_sizes)).cumsum(0)
        out = []
        for u in torch.as_tensor(unit).flatten().tolist():
            if not 0 <= u < self.num_units:
                raise ValueError(f"unit index {u} out of range [0, {self.num_units})")
            li = int(torch.searchsorted(offsets, u, right=True)) - 1
            out.append((self.layer_names[li], u - int(offsets[li])))
        return out

    def ranking(self) -> Tensor:
        """Unit indices sorted by decreasing AP (ties by index)."""
        return torch.sort(-self.ap, stable=True).indices


def compute_expertise(responses: Tensor, labels: Tensor, layers: dict[str, nn.Module]) -> Expertise:
    """AP, ``on_p50``, ``on_p90`` and ``off_mean`` of every unit from responses ``(N, M)`` and 0/1 labels
    ``(N,)`` (1 = the sentence shows the concept)."""
    sizes = [_out_features(m) for m in layers.values()]
    if responses.dim() != 2 or responses.shape[1] != sum(sizes):
        raise ValueError(f"responses must have shape (N, {sum(sizes)}) for these layers, got {tuple(responses.shape)}")
    labels = torch.as_tensor(labels)
    pos, neg = responses[labels == 1], responses[labels == 0]
    if len(neg) == 0:
        raise ValueError("labels hold no negative example")
    ap = average_precision(responses, labels).float()
    q = torch.quantile(pos.double(), torch.tensor([0.5, 0.9], dtype=torch.float64), dim=0).float()
    return Expertise(list(layers), sizes, ap, q[0], q[1], neg.mean(0))


def select_units(expertise: Expertise, k: int, mode: str = "top",
                 generator: Optional[torch.Generator] = None, value: str = "on_p50") -> dict[str, tuple[Tensor, Tensor]]:
    """The forcing assignment ``{layer: (unit indices, values)}`` for ``do(c, k)``.

    ``mode="top"``: the ``k`` units of highest AP; ``mode="random"``: ``k`` units drawn uniformly without
    replacement (control). Values are each unit's ``on_p50`` (or ``on_p90``/``off_mean`` via ``value``).
    """
    if not isinstance(k, int) or not 0 <= k <= expertise.num_units:
        raise ValueError(f"k must be an int in [0, {expertise.num_units}], got {k!r}")
    if mode == "top":
        units = expertise.ranking()[:k]
    elif mode == "random":
        units = torch.randperm(expertise.num_units, generator=generator)[:k]
    else:
        raise ValueError(f"mode must be 'top' or 'random', got {mode!r}")
    if value not in ("on_p50", "on_p90", "off_mean"):
        raise ValueError(f"value must be 'on_p50', 'on_p90' or 'off_mean', got {value!r}")
    vals = getattr(expertise, value)
    assignment: dict[str, list] = {}
    for u, (layer, idx) in zip(units.tolist(), expertise.locate(units)):
        assignment.setdefault(layer, []).append((idx, float(vals[u])))
    return {layer: (torch.tensor([i for i, _ in pairs]), torch.tensor([v for _, v in pairs]))
            for layer, pairs in assignment.items()}


@contextlib.contextmanager
def force_units(model: nn.Module, assignment: dict[str, tuple[Tensor, Tensor]]):
    """Context manager: while active, ``output[..., idx] = values`` for every layer in ``assignment`` at
    every position of every forward pass (prompt and generated tokens alike). Hooks are removed on exit
    (the official ``restore_units``). An empty assignment (k = 0) changes nothing."""
    modules = dict(model.named_modules())
    handles = []

    def make_hook(idx, values):
        def hook(module, inputs, output):
            forced = output.clone()
            forced[..., idx.to(output.device)] = values.to(device=output.device, dtype=output.dtype)
            return forced
        return hook

    try:
        for layer, (idx, values) in assignment.items():
            if layer not in modules or not is_unit_layer(modules[layer]):
                raise ValueError(f"assignment names {layer!r}, which is not a unit layer of the model")
            idx, values = torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(values, dtype=torch.float32)
            if idx.shape != values.shape or idx.dim() != 1:
                raise ValueError(f"assignment[{layer!r}] must be (indices (k,), values (k,)), got "
                                 f"{tuple(idx.shape)} and {tuple(values.shape)}")
            size = _out_features(modules[layer])
            if len(idx) and (idx.min() < 0 or idx.max() >= size):
                raise ValueError(f"assignment[{layer!r}] indices must lie in [0, {size})")
            handles.append(modules[layer].register_forward_hook(make_hook(idx, values)))
        yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# generation and perplexity


def _max_context(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, n_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample ``n_tokens`` continuations of ``prompt (B, T0)``; returns ``(B, T0 + n_tokens)``.

    Every step recomputes the whole (cropped) context, so units forced through :func:`force_units` are
    forced at every position, prompt included. Sampling runs on the CPU ``generator``.
    """
    _check_ids("prompt", prompt)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    ctx = _max_context(model)
    was_training = model.training
    model.eval()
    ids = prompt.clone()
    try:
        for _ in range(n_tokens):
            window = ids if ctx is None else ids[:, -ctx:]
            logits = _logits(model(window.to(device)))[:, -1].float().cpu() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None:
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass ≥ top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return ids


@torch.no_grad()
def generated_perplexity(model: nn.Module, ids: Tensor, prompt_len: int) -> float:
    """``exp`` of the mean next-token NLL of the generated part ``ids[:, prompt_len:]`` under ``model``
    (call it outside :func:`force_units` to score under the unforced model)."""
    _check_ids("ids", ids)
    if not 1 <= prompt_len < ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {ids.shape[1]}), got {prompt_len}")
    device = next(model.parameters()).device
    ctx = _max_context(model)
    if ctx is not None and ids.shape[1] > ctx:
        raise ValueError(f"ids are longer ({ids.shape[1]}) than the model's context ({ctx})")
    was_training = model.training
    model.eval()
    logits = _logits(model(ids.to(device))).float().cpu()
    model.train(was_training)
    nll = F.cross_entropy(logits[:, prompt_len - 1:-1].reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1))
    return float(torch.exp(nll))


# ---------------------------------------------------------------------------------------------------------
# the Shakespeare demo

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


@torch.no_grad()
def concept_probability(model: nn.Module, ids: Tensor, concept_ids: Tensor, prompt_len: int) -> float:
    """Mean next-token probability mass on the concept tokens over the generated positions of ``ids``
    (under whatever forcing is active)."""
    device = next(model.parameters()).device
    probs = _logits(model(ids.to(device))).float().softmax(-1)[:, prompt_len - 1:-1]
    return float(probs[..., concept_ids.to(device)].sum(-1).mean())


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

        hist = fit(model, opt, step_batches(draw), epochs=cfg.steps, loss_fn=lm_loss, schedule=sched, clip_grad_norm=1.0, progress=ctx.progress,
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
    ctx.observe(samples=prompt.shape[0], random_draws=max(len(r["presence_draws"]) for r in results["random"]),
                ks=[r["k"] for r in results["top"]])
    return results, base_texts, forced_texts


def run(cfg: Config, ctx) -> dict:
    text = load_shakespeare(max_chars=cfg.max_chars)
    tok = WordTokenizer(text, cfg.vocab) if cfg.tokenizer == "word" else CharTokenizer(text)
    unit_name = "word" if cfg.tokenizer == "word" else "char"
    gen_len = cfg.gen_len or (20 if cfg.tokenizer == "word" else 80)
    ids = tok.encode(text)
    train_ids, val_ids = ids[:int(0.95 * len(ids))], ids[int(0.95 * len(ids)):]
    ctx.observe(max_chars=len(text) if cfg.max_chars else None, vocab=tok.vocab_size if cfg.tokenizer == "word"
                else cfg.vocab)
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
        Panel("perplexity of the samples (unforced model)", {"expert units (top AP)": (xs, [r["perplexity"] for r in top]),
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
