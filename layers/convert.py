"""Model-level conversion: ``monarchify`` (dense -> structured), ``densify`` (reverse sparsification), and
state-dict key converters between this library and HazyResearch/fly.

Which layers ``monarchify`` converts (module paths and patterns: :mod:`monarch_kernels.layers.patterns`):

1. the dense layers: every ``nn.Linear`` (and subclass) and Hugging Face GPT-2 style ``Conv1D``;
2. those matching an ``include`` pattern (all when ``include`` is ``None``) and no ``exclude`` pattern;
3. with ``min(in, out) >= min_features`` and ``nblocks <= min(in, out)``;
4. unless unsafe to replace, where a wildcard matched them (a layer *named* literally in ``include`` is converted
   anyway, with a warning):

   * its weight is tied to another module's parameter (GPT-2's ``lm_head`` shares ``wte.weight``);
   * it is the model's output head (``model.get_output_embeddings()``, Hugging Face models);
   * its parent reads ``self.<name>.weight`` or ``.bias`` directly instead of calling it (for example
     ``nn.MultiheadAttention.out_proj`` and, on its inference fast path, ``nn.TransformerEncoderLayer.linear1``):
     found by reading the source of the parent's classes (torch's and transformers' base classes excepted).

:func:`fuse_activations` then folds the activation modules applied directly to converted layers' outputs (in
``nn.Sequential`` order or a traceable ``forward``'s dataflow) into the layers (their kernels apply it in the
epilogue).

Every matched layer that is not converted is listed with its reason in the returned :class:`Conversion`
(``.skipped``); unsafe skips are also reported with a ``UserWarning``. A pattern that matches no dense layer,
or a selection with nothing left to convert, raises ``ValueError``.

Hugging Face models (anything with a ``config`` that has ``to_dict``) get the conversion recorded in
``config.monarch`` (:mod:`monarch_kernels.layers.hf` rebuilds a saved model from it); ``densify`` removes the
entries again.
"""
from __future__ import annotations

import functools
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx
from torch import nn

from monarch_kernels import activations, monarch_factor_shapes

from .blockdiag_linear import BlockdiagLinear
from .calibrate import input_second_moments, output_error
from .monarch_linear import FLY_KEYS, MonarchLinear
from .patterns import Patterns, as_patterns, path_matches
from .structured import StructuredLinear

#: structured layer kinds ``monarchify`` builds, by the name of its ``layer`` argument
LAYER_TYPES = {"monarch": MonarchLinear, "blockdiag": BlockdiagLinear}
#: version of the ``config.monarch`` record
RECORD_FORMAT = 1


def dense_view(module: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (``y = x @ W + b`` with
    ``W (in, out)``, as in Hugging Face ``transformers``); ``None`` for any other module.

    Args:
        module: any module.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_conv1d(type(module)) and getattr(module, "weight", None) is not None:
        return module.weight.t(), module.bias
    return None


def _is_conv1d(cls: type) -> bool:
    return cls.__name__ == "Conv1D" and issubclass(cls, nn.Module) and "nf" in inspect.signature(cls).parameters


def dense_module(cls: type, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A dense module of class ``cls`` computing ``x Wᵀ + bias`` (the inverse of :func:`dense_view`).

    Args:
        cls: ``nn.Linear`` (or a subclass constructed as ``cls(in, out, bias=...)``) or a GPT-2 ``Conv1D``
            (constructed as ``cls(nf=out, nx=in)``, weight stored transposed ``(in, out)``).
        weight: ``(out, in)`` weight; device and dtype are kept.
        bias: ``(out,)`` bias or ``None``.
    """
    out_f, in_f = weight.shape
    with torch.no_grad():
        if _is_conv1d(cls):
            if bias is None:
                raise ValueError(f"dense_module: {cls.__name__} always has a bias; got bias=None")
            module = cls(nf=out_f, nx=in_f).to(device=weight.device, dtype=weight.dtype)
            module.weight.copy_(weight.t())
        elif isinstance(cls, type) and issubclass(cls, nn.Linear):
            module = cls(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            module.weight.copy_(weight)
        else:
            raise TypeError(f"dense_module: cls must be nn.Linear, a subclass of it or a GPT-2 Conv1D, got {cls!r}")
        if bias is not None:
            module.bias.copy_(bias)
    return module


@dataclass
class LayerConversion:
    """One converted (or, with ``dry_run``, to-be-converted) layer.

    Attributes:
        name: module path.
        source: class name of the dense layer (``"Linear"``, ``"Conv1D"``, ...).
        in_features, out_features: sizes.
        layer: ``"monarch"`` or ``"blockdiag"``.
        nblocks: blocks per factor.
        bias: whether the layer has a bias.
        params, new_params: parameters (weights and bias) before and after.
        flops, new_flops: forward FLOPs per token (2 per multiply-add, bias excluded) before and after.
        init: ``"calibrated"`` (fitted to captured inputs), ``"projected"`` (Frobenius projection of the
            weight) or ``"random"`` (fresh initialisation).
        error: relative error of the new weight: ``‖(M − W) X‖ / ‖W X‖`` on the calibration inputs when
            calibrated, ``‖M − W‖_F / ‖W‖_F`` when projected, ``None`` otherwise (and in a dry run).
    """

    name: str
    source: str
    in_features: int
    out_features: int
    layer: str
    nblocks: int
    bias: bool
    params: int
    new_params: int
    flops: int
    new_flops: int
    init: str
    error: Optional[float] = None


class Conversion(list):
    """What :func:`monarchify` converted (or, with ``dry_run=True``, would convert).

    A ``list`` of the converted module paths in model order, so ``for name in monarchify(...)`` and
    ``monarchify(...) == ["a", "b"]`` work, with the details attached:

    Attributes:
        layers: one :class:`LayerConversion` per converted path.
        skipped: ``{path: reason}`` for every dense layer that the patterns matched but that was not converted.
        dry_run: whether the model was left unchanged.

    ``str(conversion)`` (or :meth:`summary`) is a per-layer table with totals.
    """

    def __init__(self, layers: list, skipped: dict, dry_run: bool):
        super().__init__(row.name for row in layers)
        self.layers = list(layers)
        self.skipped = dict(skipped)
        self.dry_run = dry_run

    @property
    def params(self) -> tuple[int, int]:
        """Total parameters of the converted layers, ``(before, after)``."""
        return sum(r.params for r in self.layers), sum(r.new_params for r in self.layers)

    @property
    def flops(self) -> tuple[int, int]:
        """Total forward FLOPs per token of the converted layers, ``(before, after)``."""
        return sum(r.flops for r in self.layers), sum(r.new_flops for r in self.layers)

    def summary(self) -> str:
        """The per-layer table: path, sizes, kind, parameters and FLOPs before -> after, init and error."""
        head = ("layer", "shape", "new", "params", "flops/token", "init", "error")
        rows = [head]
        for r in self.layers:
            err = "" if r.error is None else f"{r.error:.3f}"
            rows.append((r.name, f"{r.source} {r.in_features}->{r.out_features}", f"{r.layer}/{r.nblocks}",
                         f"{r.params:,} -> {r.new_params:,}", f"{r.flops:,} -> {r.new_flops:,}", r.init, err))
        (p0, p1), (f0, f1) = self.params, self.flops
        verb = "would convert" if self.dry_run else "converted"
        rows.append((f"total ({len(self.layers)} {verb})", "", "", f"{p0:,} -> {p1:,} ({p1 / max(p0, 1):.2f}x)",
                     f"{f0:,} -> {f1:,} ({f1 / max(f0, 1):.2f}x)", "", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.extend(f"skipped {name}: {why}" for name, why in self.skipped.items())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def monarchify(
    model: nn.Module,
    nblocks: int = 4,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    min_features: int = 1,
    layer: str = "monarch",
    project: bool = True,
    calibrate: Optional[Iterable] = None,
    backend: Optional[str] = None,
    dry_run: bool = False,
    verbose: bool = False,
) -> Conversion:
    """Replace dense linear layers of ``model`` in place by Monarch (or block-diagonal) layers.

    Which layers are converted is described in :mod:`monarch_kernels.layers.convert`; patterns match whole
    module paths, ``*`` within one segment and ``**`` across segments (:mod:`monarch_kernels.layers.patterns`).

    Args:
        model: the model (modified in place unless ``dry_run``).
        nblocks: blocks per factor of every new layer.
        include: module-path pattern(s) to convert; ``None`` (default) means every dense layer. A pattern
            without wildcards names a layer and overrides the safety skips.
        exclude: module-path pattern(s) to leave dense.
        min_features: convert only layers with ``min(in, out) >= min_features``.
        layer: ``"monarch"`` (:class:`MonarchLinear`) or ``"blockdiag"`` (:class:`BlockdiagLinear`).
        project: ``True`` (default): start from the pretrained weight (Frobenius projection, or the
            activation-aware fit with ``calibrate``); ``False``: fresh random initialisation.
        calibrate: optional iterable of model inputs (each passed as ``model(**b)`` for a mapping, ``model(*b)``
            for a tuple or list, ``model(b)`` otherwise), run once through the dense model to capture every
            converted layer's input second moment; the new layers then minimise the output error on them
            (:mod:`monarch_kernels.layers.calibrate`). Needs ``project=True``.
        backend: kernel backend of the new layers (``None``: the process-wide choice).
        dry_run: only plan: return what would be converted, leave the model unchanged.
        verbose: print the per-layer table (and show a progress bar while calibrating).

    Returns:
        A :class:`Conversion`: the list of converted paths, with ``.layers`` (per-layer params, FLOPs, init,
        error), ``.skipped`` (path -> reason) and a printable table.

    Raises:
        ValueError: unknown ``layer``, bad ``nblocks``, a pattern that matches no dense layer, ``nblocks`` too
            large for a named layer, nothing left to convert, or ``calibrate`` with ``project=False``.

    Example::

        conv = monarchify(bert, nblocks=4, include=["encoder.layer.*.intermediate.dense",
                                                   "encoder.layer.*.output.dense"], calibrate=batches)
        print(conv)    # per-layer table; conv.skipped says what matched but was left dense, and why
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"monarchify: model must be an nn.Module, got {type(model).__name__}")
    if layer not in LAYER_TYPES:
        raise ValueError(f"monarchify: layer must be 'monarch' or 'blockdiag', got {layer!r}")
    for arg, value in (("nblocks", nblocks), ("min_features", min_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"monarchify: {arg} must be a positive int, got {value!r}")
    if calibrate is not None and not project:
        raise ValueError("monarchify: calibrate fits the new layers to the pretrained ones; it needs project=True")
    inc, exc = as_patterns(include, "include"), as_patterns(exclude, "exclude")

    dense = [(name, m, dense_view(m)) for name, m in model.named_modules() if name and dense_view(m) is not None]
    if not dense:
        raise ValueError(f"monarchify: {type(model).__name__} has no nn.Linear or Conv1D layer to convert")
    for arg, patterns in (("include", inc), ("exclude", exc)):
        for p in patterns:
            if not any(path_matches(name, p) for name, _, _ in dense):
                examples = ", ".join(name for name, _, _ in dense[:8]) + (", ..." if len(dense) > 8 else "")
                raise ValueError(f"monarchify: {arg} pattern {p!r} matches no dense layer ('*' stays within one "
                                 f"path segment, '**' crosses segments); dense layers: {examples}")

    unsafe = _unsafe_reasons(model)
    chosen, skipped, forced = [], {}, []
    for name, module, (weight, bias) in dense:
        if inc and not any(path_matches(name, p) for p in inc):
            continue
        named = name in inc  # a pattern without wildcards that equals the path names the layer
        out_f, in_f = weight.shape
        if any(path_matches(name, p) for p in exc):
            skipped[name] = "excluded"
        elif min(in_f, out_f) < min_features:
            skipped[name] = f"min(in, out) = {min(in_f, out_f)} < min_features = {min_features}"
        elif nblocks > min(in_f, out_f):
            if named:
                raise ValueError(f"monarchify: nblocks={nblocks} does not fit {name} ({in_f} -> {out_f}): "
                                 f"it needs nblocks <= min(in, out) = {min(in_f, out_f)}")
            skipped[name] = f"nblocks={nblocks} > min(in, out) = {min(in_f, out_f)}"
        elif name in unsafe and not named:
            skipped[name] = unsafe[name]
        else:
            if name in unsafe:
                forced.append(f"{name} ({unsafe[name]})")
            chosen.append((name, module, weight, bias))
    if not chosen:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items()) or "no layer matched"
        raise ValueError(f"monarchify: nothing to convert ({reasons})")
    safety = [f"{n} ({why})" for n, why in skipped.items() if why == unsafe.get(n)]
    if safety:
        warnings.warn("monarchify: left dense because replacing them is unsafe (name a layer in include to "
                      f"convert it anyway): {', '.join(safety)}", UserWarning, stacklevel=2)
    if forced:
        warnings.warn(f"monarchify: converting named layers although unsafe: {', '.join(forced)}",
                      UserWarning, stacklevel=2)

    init = "random" if not project else ("calibrated" if calibrate is not None else "projected")
    rows = [_plan_row(name, module, weight, bias, layer, nblocks, init) for name, module, weight, bias in chosen]
    if not dry_run:
        moments = (input_second_moments(model, [n for n, *_ in chosen], calibrate, progress=verbose)
                   if calibrate is not None else {})
        paths = _all_paths(model)
        for row, (name, module, weight, bias) in zip(rows, chosen):
            new = _structured_from(module, weight, bias, layer, nblocks, project, moments.get(name), backend)
            if project:
                row.error = _fit_error(new, weight, moments.get(name))
            for path in paths[id(module)]:
                _replace(model, path, new)
        _record(model, rows, inc, exc, layer, nblocks, init)
    result = Conversion(rows, skipped, dry_run)
    if verbose:
        print(result)
    return result


def _plan_row(name, module, weight, bias, layer, nblocks, init) -> LayerConversion:
    out_f, in_f = weight.shape
    if layer == "monarch":
        sh = monarch_factor_shapes(in_f, out_f, nblocks)
        structured = sh.k * sh.q * sh.p + sh.l * sh.s * sh.r
    else:
        structured = nblocks * -(-out_f // nblocks) * -(-in_f // nblocks)
    extra = out_f if bias is not None else 0
    return LayerConversion(name, type(module).__name__, in_f, out_f, layer, nblocks, bias is not None,
                           in_f * out_f + extra, structured + extra, 2 * in_f * out_f, 2 * structured, init)


@torch.no_grad()
def _fit_error(new: StructuredLinear, weight: torch.Tensor, second_moment: Optional[torch.Tensor]) -> float:
    approx, weight = new.dense_weight().double(), weight.detach().double()
    if second_moment is not None:
        return output_error(approx, weight, second_moment)
    return float((approx - weight).norm() / weight.norm().clamp_min(1e-300))


def _structured_from(module, weight, bias, layer, nblocks, project, second_moment, backend) -> StructuredLinear:
    cls = LAYER_TYPES[layer]
    if project:
        new = cls.from_dense(weight, bias, nblocks, second_moment=second_moment, backend=backend)
    else:
        new = cls(weight.shape[1], weight.shape[0], bias is not None, nblocks, backend=backend,
                  device=weight.device, dtype=weight.dtype)
    new.dense_type = type(module)
    return new


def _all_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path under which each submodule is registered (a module shared by two parents has two)."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


def _unsafe_reasons(model: nn.Module) -> dict[str, str]:
    """``{path: reason}`` for the dense layers that a wildcard must not convert (module docstring, rule 4)."""
    owners: dict[int, set] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(name)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    paths = _all_paths(model)
    reasons = {}
    for name, m in model.named_modules():
        if not name or dense_view(m) is None:
            continue
        why = []
        if m is head:
            why.append("output head (model.get_output_embeddings())")
        tied = sorted(owners.get(id(m.weight), set()) - set(paths[id(m)]))
        if tied:
            why.append(f"weight tied to {', '.join(tied)}")
        if len(paths[id(m)]) > 1:
            why.append(f"module shared with {', '.join(p for p in paths[id(m)] if p != name)}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _reads_child_params(type(parent), child):
            why.append(f"{type(parent).__name__} reads self.{child}.weight directly")
        if why:
            reasons[name] = "; ".join(why)
    return reasons


def _reads_child_params(cls: type, child: str) -> bool:
    """Whether the source of ``cls`` (or of a base class other than torch's and transformers' generic ones)
    reads ``self.<child>.weight`` or ``self.<child>.bias``."""
    if issubclass(cls, nn.MultiheadAttention) and child == "out_proj":
        return True
    pattern = re.compile(rf"self\.{re.escape(child)}\.(weight|bias)\b")
    return any(pattern.search(src) for src in _class_sources(cls))


@functools.lru_cache(maxsize=None)
def _class_sources(cls: type) -> tuple[str, ...]:
    generic = ("torch.nn.modules.module", "transformers.modeling_utils")
    out = []
    for base in cls.__mro__:
        if base in (nn.Module, object) or base.__module__ in generic:
            continue
        try:
            out.append(inspect.getsource(base))
        except (OSError, TypeError):  # built-in or source not shipped: nothing to read
            pass
    return tuple(out)


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _record(model, rows, include, exclude, layer, nblocks, init) -> None:
    """Record the conversion in ``model.config.monarch`` (Hugging Face configs; no-op for other models)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_dict", None)):
        return
    record = dict(getattr(config, "monarch", None) or {"format": RECORD_FORMAT, "layers": {}, "conversions": []})
    record["layers"] = {**record["layers"], **{r.name: {
        "layer": r.layer, "in_features": r.in_features, "out_features": r.out_features, "nblocks": r.nblocks,
        "bias": r.bias, "source": r.source} for r in rows}}
    record["conversions"] = [*record["conversions"], {"include": include or ["**"], "exclude": exclude,
                                                      "layer": layer, "nblocks": nblocks, "init": init}]
    config.monarch = record


def restructure(model: nn.Module, record: dict, *, backend: Optional[str] = None) -> list[str]:
    """Rebuild, in place, the structured layers that a ``config.monarch`` record lists (fresh weights, to be
    overwritten by a checkpoint), and attach the record to ``model.config``; the inverse of saving.

    Args:
        model: a freshly built dense model of the architecture the record was made on.
        record: the ``config.monarch`` dict written by :func:`monarchify` (``{"format", "layers", "conversions"}``).
        backend: kernel backend of the rebuilt layers.

    Returns:
        The rebuilt module paths.

    Raises:
        ValueError: the record is malformed or does not match the model (a listed layer is missing, is not a
            dense layer, or has other sizes or bias).
    """
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("layers"), dict)):
        raise ValueError(f"restructure: expected a config.monarch record of format {RECORD_FORMAT} "
                         f"({{'format', 'layers', 'conversions'}}), got {record!r:.200}")
    paths = _all_paths(model)
    for name, spec in record["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"restructure: the record lists layer {name!r}, which {type(model).__name__} does not "
                             "have (was the checkpoint saved from another architecture or config?)") from None
        view = dense_view(module)
        if view is None:
            raise ValueError(f"restructure: {name} is a {type(module).__name__}, expected a dense layer to rebuild")
        weight, bias = view
        if (tuple(weight.shape), bias is not None) != ((spec["out_features"], spec["in_features"]), spec["bias"]):
            raise ValueError(
                f"restructure: {name} is {spec['in_features']} -> {spec['out_features']} (bias={spec['bias']}) in the "
                f"record but {weight.shape[1]} -> {weight.shape[0]} (bias={bias is not None}) in the model")
        if spec.get("layer") not in LAYER_TYPES:
            raise ValueError(f"restructure: {name} has unknown layer kind {spec.get('layer')!r}")
        new = LAYER_TYPES[spec["layer"]](spec["in_features"], spec["out_features"], spec["bias"], spec["nblocks"],
                                         backend=backend, device=weight.device, dtype=weight.dtype)
        new.dense_type = type(module)
        for path in paths[id(module)]:
            _replace(model, path, new)
    config = getattr(model, "config", None)
    if config is not None:
        config.monarch = record
    return list(record["layers"])


def densify(model: nn.Module) -> list[str]:
    """Reverse sparsification in place: every ``MonarchLinear``/``BlockdiagLinear`` becomes the dense module
    computing the same map, of the class it was converted from (``dense_type``: ``nn.Linear``, or a GPT-2
    ``Conv1D`` with its weight stored transposed again), so that a densified Hugging Face model saves and loads
    as the original architecture. Removes the layers from ``config.monarch``. A layer with an ``activation``
    becomes the dense module followed by the activation's module: back in its old slot where
    :func:`fuse_activations` folded it (the :class:`FusedActivation` beside it), else as
    ``nn.Sequential(dense, act)``.

    Args:
        model: the model (modified in place).

    Returns:
        The replaced module paths.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify: model must be an nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if n and isinstance(m, StructuredLinear)]
    paths = _all_paths(model)
    for name in names:
        structured = model.get_submodule(name)
        with torch.no_grad():
            dense = dense_module(structured.dense_type, structured.dense_weight(), structured.bias)
        for path in paths[id(structured)]:
            if structured.activation == "none":
                _replace(model, path, dense)
                continue
            slot = _folded_slot(model, path)
            if slot is not None:  # put back what fuse_activations folded
                _replace(model, path, dense)
                _replace(model, slot, model.get_submodule(slot).activation)
            else:
                _replace(model, path, nn.Sequential(dense, activations.module(structured.activation)))
    config = getattr(model, "config", None)
    record = getattr(config, "monarch", None) if config is not None else None
    if record:
        remaining = {k: v for k, v in record["layers"].items() if k not in names}
        if remaining:
            config.monarch = {**record, "layers": remaining}
        else:
            del config.monarch
    return names


class FusedActivation(nn.Identity):
    """What :func:`fuse_activations` leaves where it folded an activation module into the structured layer
    beside it: an identity that keeps the original module, so that :func:`densify` can put it back (and the
    parent's attributes, indices and state-dict keys stay as they were).

    Args:
        activation: the activation module that was folded (kept as the child ``activation``).
        into: the attribute name, in the same parent, of the layer that now applies it.
    """

    def __init__(self, activation: nn.Module, into: str):
        super().__init__()
        self.activation = activation
        self.into = into

    def extra_repr(self) -> str:
        return f"into={self.into!r}"


#: Hugging Face ``transformers.activations`` classes a kernel epilogue computes, by class name
_HF_ACTIVATIONS = {"NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}


def _activation_kind(module: nn.Module) -> Optional[str]:
    """The fused activation ``module`` computes: ``nn.ReLU``, ``nn.GELU`` (exactly those classes), Hugging Face's
    tanh GELUs and its erf ``GELUActivation`` (when it calls ``F.gelu``), else ``None``."""
    kind = activations.of_module(module)
    if kind is not None or not type(module).__module__.startswith("transformers."):
        return kind
    name = type(module).__name__
    if name == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    return _HF_ACTIVATIONS.get(name)


class _ChildCalls(torch.fx.Tracer):
    """Traces a module's own ``forward`` only: every child module is one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _layer_then_activation(parent: nn.Module) -> list[tuple[str, str]]:
    """``(layer, activation)`` child names of ``parent`` where the structured layer's output feeds only that
    activation module, both called once in the parent's ``forward`` (``nn.Sequential`` order, or the dataflow of
    a ``forward`` that ``torch.fx`` can trace; none for one it cannot)."""
    children = parent._modules
    if not any(isinstance(m, StructuredLinear) for m in children.values()):
        return []
    if isinstance(parent, nn.Sequential):
        keys = list(children)
        return list(zip(keys, keys[1:]))
    try:
        graph = _ChildCalls().trace(parent)
    except Exception:  # control flow on values, unsupported calls: nothing proven, nothing fused
        return []
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count = {t: sum(1 for n in calls if n.target == t) for t in {n.target for n in calls}}
    pairs = []
    for node in calls:
        users = list(node.users)
        if (node.target in children and count[node.target] == 1 and len(users) == 1
                and users[0].op == "call_module" and users[0].target in children and count[users[0].target] == 1
                and users[0].args == (node,) and not users[0].kwargs):
            pairs.append((node.target, users[0].target))
    return pairs


def fuse_activations(model: nn.Module) -> list[str]:
    """Fold, in place, each activation module applied directly to a ``MonarchLinear``/``BlockdiagLinear``'s
    output into that layer's ``activation``: the kernels then apply it in their epilogue (one pass instead of two
    over the output, and the backward's fused paths) and the activation's slot holds a :class:`FusedActivation`
    (an identity). Which pairs: a structured layer and the next module of an ``nn.Sequential``, or, in any
    other parent, a layer whose output feeds only one activation module, both called once in the parent's
    ``forward``, as ``torch.fx`` traces it (e.g. Hugging Face GPT-2's MLP: ``act(c_fc(h))``; a ``forward`` that
    cannot be traced is left alone). Activations: ``nn.ReLU``, ``nn.GELU`` (exactly these classes), Hugging
    Face's ``GELUActivation`` and tanh GELUs (``gelu_new``). The map is the same up to rounding (the epilogue
    computes in fp32). Skipped: layers that already have an activation and layers reachable under more than one
    path (their other uses would change). Forward hooks on a folded activation module no longer run. The
    fusion is not recorded in ``config.monarch``: a model rebuilt from a checkpoint (:func:`restructure`) runs
    the activation module again. :func:`densify` undoes it.

    Args:
        model: the model (modified in place).

    Returns:
        The paths of the layers that took an activation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_activations: model must be an nn.Module, got {type(model).__name__}")
    paths = _all_paths(model)
    fused = []
    for name, parent in list(model.named_modules()):
        for layer_name, act_name in _layer_then_activation(parent):
            layer, act = parent._modules[layer_name], parent._modules[act_name]
            kind = _activation_kind(act) if act is not None else None
            if (kind is None or not isinstance(layer, StructuredLinear) or layer.activation != "none"
                    or len(paths[id(layer)]) > 1):
                continue
            layer.activation = kind
            setattr(parent, act_name, FusedActivation(act, layer_name))
            fused.append(f"{name}.{layer_name}" if name else layer_name)
    return fused


def _folded_slot(model: nn.Module, path: str) -> Optional[str]:
    """The path of the :class:`FusedActivation` that :func:`fuse_activations` left for the layer at ``path``."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for key, module in parent._modules.items():
        if isinstance(module, FusedActivation) and module.into == child:
            return f"{parent_name}.{key}" if parent_name else key
    return None


def from_fly_state_dict(state_dict: dict) -> dict:
    """Rename fly's ``*.blkdiag1``/``*.blkdiag2`` keys to this library's ``*.w1``/``*.w2`` (other keys kept).

    Args:
        state_dict: a state dict written by HazyResearch/fly.
    """
    return {_rename(k, FLY_KEYS): v for k, v in state_dict.items()}


def to_fly_state_dict(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """Rename ``*.w1``/``*.w2`` keys of ``MonarchLinear`` layers to fly's ``*.blkdiag1``/``*.blkdiag2``.

    Args:
        state_dict: a state dict of this library's layers.
        model: optional model the state dict belongs to; with it only keys of its ``MonarchLinear`` modules are
            renamed, without it every key ending in ``.w1``/``.w2`` (or equal to ``w1``/``w2``) is.
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
