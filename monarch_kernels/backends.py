"""Backend registry and dispatch.

A *backend* implements the five primitives of :mod:`monarch_kernels.reference` (``blockdiag_fwd``,
``blockdiag_wgrad``, ``monarch_fwd``, ``monarch_bwd_input``, ``monarch_bwd_weight``; optionally ``monarch_bwd``,
``monarch_bwd_epilogue`` and ``monarch_fwd_saving`` for faster training, and a fused MLP: ``monarch_mlp_fusable``,
``monarch_mlp_fwd``, ``monarch_mlp_fwd_saving``, ``monarch_mlp_bwd``) for some devices and dtypes. Backends register
themselves here; the ops in :mod:`monarch_kernels.ops` resolve a backend name once per call (``"auto"`` picks per
device, dtype and shape) and pass the concrete name into the custom op.

Selection, most specific first: the ``backend=`` argument of a call, then :func:`use_backend` (a
``contextvars`` value: it applies to the current thread or asyncio task only), then :func:`set_backend` (the
process-wide default), then ``"auto"``. An explicitly requested backend that is not available, or does not
support the tensors' device or dtype, raises :class:`BackendUnavailableError`; nothing falls back silently.

Under ``torch.compile`` the choice is made once, while the graph is traced, and baked into it as a
constant: no guard is installed on the token count (the rules take their large-batch branch, see
:func:`resolve`), on lazy loading or on the selection state. A compiled function therefore keeps
the backend it was traced with; pass ``backend=`` (or ``MonarchLinear(..., backend=...)``) to pin one.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

AUTO = "auto"


class Dims(tuple):
    """A call's problem sizes ``(T, n_in, n_out, block)`` — a 4-tuple, as the ``prefer`` rules unpack it — with
    the activation fused into its epilogue as the attribute ``activation`` (``"none"``, ``"relu"``, ``"gelu"``,
    ``"gelu_tanh"``) and whether it adds a bias (``bias``: a training call's backward computes its gradient):
    rules that price the call (:mod:`.gpu_dispatch`) read them, the others need not."""

    activation: str
    bias: bool

    def __new__(cls, sizes, activation: str = "none", bias: bool = False):
        dims = super().__new__(cls, sizes)
        dims.activation = activation
        dims.bias = bias
        return dims


def activation_of(dims: tuple) -> str:
    """The fused activation a ``prefer`` rule's ``dims`` carry (``"none"`` for a plain tuple)."""
    return getattr(dims, "activation", "none")


def bias_of(dims: tuple) -> bool:
    """Whether a ``prefer`` rule's ``dims`` are those of a call with a bias (``False`` for a plain tuple)."""
    return getattr(dims, "bias", False)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (not built, not installed, wrong device/dtype)."""


@dataclass
class Backend:
    """One implementation of the primitives.

    ``load`` returns the module holding the primitives, or raises ``ImportError``/``RuntimeError`` with the
    reason it is unavailable (called lazily, once). ``supports(device, dtype)`` says whether it can run
    tensors of that kind; ``prefer(op, device, dtype, dims)`` whether ``auto`` should choose it for a call
    (``dims`` are the problem sizes ``(T, n_in, n_out, block)``, a :class:`Dims` that also carries the fused
    activation); ``prefer_training``, same arguments, the rule
    for a call whose gradients autograd will want (forward and backward both run on the backend), ``prefer``
    when ``None``; ``priority`` orders the ``auto`` search (higher first).
    """

    name: str
    load: Callable[[], object]
    supports: Callable[[torch.device, torch.dtype], bool]
    prefer: Callable[[str, torch.device, torch.dtype, tuple], bool] = lambda *a: True
    priority: int = 0
    prefer_training: Optional[Callable[[str, torch.device, torch.dtype, tuple], bool]] = None
    description: str = ""
    _module: object = field(default=None, repr=False)
    _error: Optional[str] = field(default=None, repr=False)
    _loaded: bool = field(default=False, repr=False)

    def module(self):
        if not self._loaded:
            try:
                self._module = self.load()
            except (ImportError, RuntimeError, OSError) as exc:  # reason kept for available_backends()
                self._error = f"{type(exc).__name__}: {exc}"
            self._loaded = True
        if self._module is None:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {self._error}")
        return self._module

    @property
    def available(self) -> bool:
        try:
            self.module()
        except BackendUnavailableError:
            return False
        return True


_REGISTRY: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # the registry in ``auto``'s search order
_default = AUTO  # set_backend: the process-wide default
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("monarch_kernels_backend", default=None)


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend
    _BY_PRIORITY[:] = sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {[AUTO, *sorted(_REGISTRY)]}")
    return _REGISTRY[name]


def available_backends() -> dict[str, str]:
    """Every registered backend and its status: ``"available"`` or the reason it is not.

    Example: ``{'torch': 'available', 'triton': 'available', 'cuda': 'unavailable: ...'}``.
    """
    status = {}
    for name in sorted(_REGISTRY, key=lambda n: -_REGISTRY[n].priority):
        b = _REGISTRY[name]
        status[name] = "available" if b.available else f"unavailable: {b._error}"
    return status


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != AUTO:
        get(name)
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"`` restores automatic choice).

    A :func:`use_backend` block in effect in the calling thread or task still takes precedence there.
    """
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend name in effect for the calling thread or task: the innermost :func:`use_backend`, else
    the process-wide default of :func:`set_backend` (``"auto"`` unless changed)."""
    name = _override.get()
    return _default if name is None else name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed calls of this thread (or asyncio task) with backend ``name``.

    Other threads keep their own choice (threads start from the :func:`set_backend` default)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def resolve(op: str, device: torch.device, dtype: torch.dtype, dims: tuple, requested: Optional[str] = None,
            training: bool = False, activation: str = "none", bias: bool = False) -> str:
    """The concrete backend name a call will use.

    ``op`` is ``"blockdiag"`` or ``"monarch"``; ``dims`` is ``(T, n_in, n_out, block)``; ``training``: autograd
    records the call (its backward will run on the same backend), so ``auto`` asks each backend's
    ``prefer_training`` rule; ``activation``: fused into the call's epilogue, ``bias``: the call adds one (the
    rules receive them as ``dims.activation`` and ``dims.bias``, :class:`Dims`). While
    ``torch.compile`` traces, the choice is a trace-time constant that does not depend on the input's sizes
    (they may be symbolic, and a rule comparing them would guard the graph on every threshold): ``T``,
    ``n_in`` and ``n_out`` reach the ``prefer`` rules as ``None``, meaning "any size", and the rules take their
    large-batch branch; ``block`` is a size of the weights (static).
    """
    if torch.compiler.is_compiling():
        return _resolve_at_trace_time(op, device, dtype, (None, None, None, int(dims[3])), requested, training,
                                      activation, bias)
    return _resolve(op, device, dtype, dims, requested, training, activation, bias)


def _resolve(op: str, device: torch.device, dtype: torch.dtype, dims: tuple, requested: Optional[str],
             training: bool = False, activation: str = "none", bias: bool = False) -> str:
    name = get_backend() if requested is None else _check_name(requested)
    if name != AUTO:
        b = get(name)
        b.module()  # raises BackendUnavailableError with the reason
        if not b.supports(device, dtype):
            raise BackendUnavailableError(
                f"backend {name!r} does not support {dtype} tensors on {device}; "
                f"use backend='auto' or one of {sorted(n for n, s in available_backends().items() if s == 'available')}"
            )
        return name
    dims = Dims(dims, activation, bias)
    for b in _BY_PRIORITY:
        rule = b.prefer_training if training and b.prefer_training is not None else b.prefer
        if b.available and b.supports(device, dtype) and rule(op, device, dtype, dims):
            return b.name
    raise BackendUnavailableError(f"no backend supports {dtype} tensors on {device}")


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without its import of ``torch._dynamo``, which would double the
    time of ``import monarch_kernels`` (about 1.1 s): the decorator only sets this attribute, which Dynamo reads
    when it traces a call of ``fn`` (``tests/monarch_kernels/test_compile_dynamic.py`` checks both)."""
    fn._dynamo_marked_constant = True
    return fn


# Dynamo evaluates this once per trace and keeps the result as a constant (no guards): it cannot trace a
# ContextVar, and tracing the registry would guard on lazy loading and on the shape rules.
@_assume_constant_result
def _resolve_at_trace_time(op: str, device: torch.device, dtype: torch.dtype, dims: tuple, requested: Optional[str],
                           training: bool = False, activation: str = "none", bias: bool = False) -> str:
    return _resolve(op, device, dtype, dims, requested, training, activation, bias)


def impl(name: str):
    """The primitives module of backend ``name`` (already resolved)."""
    return get(name).module()
