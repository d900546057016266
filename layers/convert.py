"""Model-level conversion: ``monarchify`` (dense -> structured), ``densify`` (reverse sparsification), and
state-dict key converters between this library and HazyResearch/fly."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .blockdiag_linear import BlockdiagLinear
from .monarch_linear import FLY_KEYS, MonarchLinear
from .structured import StructuredLinear

Patterns = Union[str, Iterable[str], None]


def _patterns(p: Patterns, name: str) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    out = list(p)
    if not all(isinstance(s, str) for s in out):
        raise TypeError(f"{name} must be a glob pattern string or a list of them, got {p!r}")
    return out


def dense_view(module: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (``y = x @ W + b`` with
    ``W (in, out)``, as in Hugging Face ``transformers``); ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.t(), module.bias
    return None


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def monarchify(
    model: nn.Module,
    nblocks: int = 4,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    min_features: int = 1,
    project: bool = False,
    layer: str = "monarch",
    backend: Optional[str] = None,
) -> list[str]:
    """Replace dense linear layers of ``model`` in place by structured ones; returns the replaced names.

    A module is replaced when it is an ``nn.Linear`` or GPT-2 ``Conv1D``, its qualified name matches one
    of the ``include`` glob patterns (all match when ``None``) and none of ``exclude``, and
    ``min(in, out) ≥ max(min_features, nblocks)``. ``layer`` is ``"monarch"`` (``MonarchLinear``) or
    ``"blockdiag"`` (``BlockdiagLinear``). With ``project=True`` the pretrained weight is projected
    (Frobenius-optimal Monarch for ``"monarch"``, the diagonal blocks for ``"blockdiag"``) and the bias kept;
    otherwise the new layer is freshly initialised. Device and dtype follow the replaced layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"monarchify: model must be an nn.Module, got {type(model).__name__}")
    if layer not in ("monarch", "blockdiag"):
        raise ValueError(f"monarchify: layer must be 'monarch' or 'blockdiag', got {layer!r}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        view = dense_view(module)
        if view is None or not name:
            continue
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        weight, _ = view
        if min(weight.shape) < max(min_features, nblocks):
            continue
        chosen.append((name, view))
    for name, (weight, bias) in chosen:
        _replace(model, name, _structured_from(weight, bias, nblocks, project, layer, backend))
    return [name for name, _ in chosen]


def _structured_from(weight, bias, nblocks, project, layer, backend) -> StructuredLinear:
    out_f, in_f = weight.shape
    factory = {"device": weight.device, "dtype": weight.dtype}
    if layer == "monarch":
        if project:
            return MonarchLinear.from_dense(weight, bias, nblocks, backend=backend)
        return MonarchLinear(in_f, out_f, bias is not None, nblocks, backend=backend, **factory)
    new = BlockdiagLinear(in_f, out_f, bias is not None, nblocks, backend=backend, **factory)
    if project:
        k, q, p = new.weight.shape
        padded = torch.nn.functional.pad(weight.detach(), (0, k * p - in_f, 0, k * q - out_f))
        with torch.no_grad():
            new.weight.copy_(torch.stack([padded[i * q:(i + 1) * q, i * p:(i + 1) * p] for i in range(k)]))
            if bias is not None:
                new.bias.copy_(bias.detach())
    return new


def densify(model: nn.Module) -> list[str]:
    """Reverse sparsification in place: every ``MonarchLinear``/``BlockdiagLinear`` becomes the
    ``nn.Linear`` computing the same map. Returns the replaced names."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, StructuredLinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).to_linear())
    return names


def from_fly_state_dict(state_dict: dict) -> dict:
    """Rename fly's ``*.blkdiag1``/``*.blkdiag2`` keys to this library's ``*.w1``/``*.w2`` (other keys kept)."""
    return {_rename(k, FLY_KEYS): v for k, v in state_dict.items()}


def to_fly_state_dict(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """Rename ``*.w1``/``*.w2`` keys of ``MonarchLinear`` layers to fly's ``*.blkdiag1``/``*.blkdiag2``.

    With ``model`` given, only keys belonging to its ``MonarchLinear`` modules are renamed; without it,
    every key ending in ``.w1``/``.w2`` (or equal to ``w1``/``w2``) is.
    """
    inverse = {v: k for k, v in FLY_KEYS.items()}
    if model is None:
        return {_rename(k, inverse): v for k, v in state_dict.items()}
    prefixes = {f"{n}." if n else "" for n, m in model.named_modules() if isinstance(m, MonarchLinear)}
    out = {}
    for k, v in state_dict.items():
        head, _, leaf = k.rpartition(".")
        prefix = f"{head}." if head else ""
        out[_rename(k, inverse) if prefix in prefixes else k] = v
    return out


def _rename(key: str, mapping: dict) -> str:
    head, dot, leaf = key.rpartition(".")
    return f"{head}{dot}{mapping[leaf]}" if leaf in mapping else key
