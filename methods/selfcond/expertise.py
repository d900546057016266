"""Units of a language model (outputs of its linear-like layers), their max-pooled responses to sentences, their
expertise for a concept (average precision), and forcing the expert units during generation."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from monarch_kernels.layers import StructuredLinear



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


def select_units(expertise: Expertise, k: int, mode: str = "top", generator: Optional[torch.Generator] = None,
                 value: str = "on_p50") -> dict[str, tuple[Tensor, Tensor]]:
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
