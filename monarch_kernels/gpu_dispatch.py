"""When ``auto`` takes a GPU kernel backend over the torch reference on a CUDA device (the CUDA counterpart of
:mod:`monarch_kernels.cpu_dispatch`).

The rule is the cost model's (:mod:`monarch_kernels.cost_model`, at the current GPU's constants —
:func:`device`: the H200's where it runs on one, the H100's otherwise — its efficiencies calibrated on the H200
measurements of ``bench/RESULTS.md`` §8): a backend is preferred for a call when its predicted time
is the lowest among the backends that have a cost estimator and can run the call, the torch reference included
— so ``auto`` never takes a path the model predicts slower than the reference. An eager call also pays its
backend's host time (:data:`HOST_S`, measured on the H200's machine: ~357 µs per Triton forward against 154 for
the reference and 50 for the extension), which decides every call whose device work is shorter — below ~16K
tokens at the benchmark widths; a call made while a CUDA graph is captured is priced by device time alone
(:func:`capturing`; ``torch.compile(mode="reduce-overhead")`` decides at trace time, i.e. as eager). The first device
session measured the previous revision's kernels; once ``bench/gpu_check.sh`` has measured these, its side-by-side
device-time ratios should replace the model here (as the CPU rule's constants came from measurements).

The call's ``dims = (T, n_in, n_out, block)`` (see :func:`monarch_kernels.backends.resolve`) carry the fused
activation (:class:`monarch_kernels.backends.Dims`: the reference pays extra passes for it, the Triton kernels
fuse it) and whether there is a bias (a training call's bias gradient: a read of ``g`` for dense and the
reference, folded into the copy of ``g`` where the Triton backward makes one) but not the factor shapes; the rule
prices the ``MonarchLinear`` layout with the same block size, ``nblocks = ceil(max(n_in, n_out) / block)``. Under
``torch.compile`` with a dynamic batch (``T`` not a plain int) it prices a large batch, so no guard on the token count
enters the graph.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Optional

import torch

from . import cost_model as cm
from .backends import activation_of, bias_of

#: ``T`` priced when the token count is symbolic (a compiled graph with a dynamic batch)
SYMBOLIC_TOKENS = 16384
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _problem(dims: tuple, activation: str, bias: bool) -> cm.Problem:
    tokens, n_in, n_out, block = dims
    nblocks = max(1, min(math.ceil(max(n_in, n_out) / max(block, 1)), n_in, n_out))
    return cm.Problem.linear(SYMBOLIC_TOKENS if tokens is None else max(tokens, 1), n_in, n_out, nblocks,
                             activation, bias)


@lru_cache(maxsize=1)
def device() -> cm.Device:
    """The constants the rule prices with: those of the current GPU (:func:`monarch_kernels.cost_model.device_for`,
    e.g. the H200's measured bandwidth), the H100's without one."""
    if not torch.cuda.is_available():
        return cm.H100_SXM
    return cm.device_for(torch.cuda.get_device_name())


def _path(backend: str, problem: cm.Problem) -> str:
    if backend == "torch":
        return "reference"
    if backend == "triton":
        return cm.triton_path(problem, dev=device())
    paths = [p for b, p in cm.estimators() if b == backend]
    return paths[0] if paths else ""


@lru_cache(maxsize=4096)
def predicted_seconds(backend: str, op: str, dtype: str, dims: tuple, training: bool = False,
                      activation: str = "none", bias: bool = False) -> float:
    """The cost model's time for ``backend`` on a Monarch forward (``op == "monarch"``) with ``activation`` fused
    into its epilogue, or a block-diagonal forward (``"blockdiag"``, ``dims[3]`` = input block; its prices
    have no activation) with these dims, with ``training`` plus its backward (and with ``bias`` the bias
    gradient); ``inf`` without an estimator."""
    tokens, n_in, n_out, block = dims
    if op == "blockdiag":
        k = math.ceil(n_in / block)
        return cm.blockdiag_seconds(backend, SYMBOLIC_TOKENS if tokens is None else max(tokens, 1), k,
                                    math.ceil(n_out / k), block, dtype, device(), training=training, bias=bias)
    problem = _problem(dims, activation, bias)
    path = _path(backend, problem)
    if (backend, path) not in cm.estimators():
        return math.inf
    dev = device()
    return cm.estimate(backend, path, "fwdbwd" if training else "fwd", problem, dtype, dev).time(dev)


#: Host time of one eager Monarch call (s) per (backend, with its backward), measured on the H200 lending
#: machine (``bench/RESULTS.md`` §8, "Host time per call": 200 forwards of 16 tokens back to back through
#: ``mk.monarch_linear``, one synchronise; the forward-plus-backward from ``gpu_check``'s 16-token rows, whose
#: device work is a few µs): Triton's launcher and this library's planning, the reference's five torch calls,
#: the extension's one op. A call whose device work is shorter than its host time costs its host time.
#: Block-diagonal calls were not measured (one kernel instead of two): they are priced by device time alone.
#: The Triton entries predate the memoised launches (``bench/RESULTS.md`` §7e: our share of a forward's host time
#: cut 2.2-2.4x, measured without a GPU): until re-measured (``bench/gpu_profile.py --only host``) they
#: overprice eager Triton calls, which only keeps ``auto`` on the reference longer.
HOST_S = {("triton", False): 357e-6, ("triton", True): 1262e-6, ("torch", False): 154e-6,
          ("torch", True): 861e-6, ("cuda", False): 50e-6}


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (whose replays pay no host time)."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a build without CUDA
        return False


def call_seconds(backend: str, op: str, dtype: str, dims: tuple, training: bool = False, activation: str = "none",
                 eager: bool = True, bias: bool = False) -> float:
    """:func:`predicted_seconds`, and for an ``eager`` Monarch call at least the backend's host time
    (:data:`HOST_S`): host and device work overlap, so the slower of the two sets the pace."""
    t = predicted_seconds(backend, op, dtype, dims, training, activation, bias)
    return max(t, HOST_S.get((backend, training), 0.0)) if eager and op == "monarch" else t


def fastest(op: str, dtype: torch.dtype, dims: tuple, candidates: Iterable[str], training: bool = False,
            eager: Optional[bool] = None) -> str:
    """The candidate with the lowest predicted time (the first listed on ties); ``torch`` when none is priced.
    ``eager`` (default: unless a CUDA graph is being captured) prices host time too (:func:`call_seconds`)."""
    name = _DTYPES.get(dtype)
    if name is None:
        return "torch"
    eager = not capturing() if eager is None else eager
    key = (dims[0] if isinstance(dims[0], int) else None, *(int(d) for d in dims[1:]))
    act, bias = activation_of(dims), bias_of(dims)
    times = {c: call_seconds(c, op, name, key, training, act, eager, bias) for c in candidates}
    best = min(times, key=times.get)
    return best if math.isfinite(times[best]) else "torch"


def prefers(backend: str, op: str, dtype: torch.dtype, dims: tuple, others: Iterable[str] = (),
            training: bool = False, eager: Optional[bool] = None) -> bool:
    """Whether ``auto`` should take ``backend`` over ``others`` (the torch reference is always compared); with
    ``training`` by the forward-plus-backward prices (a backend that wins the forward can lose the step)."""
    candidates = [backend, *[o for o in others if o != backend], "torch"]
    return fastest(op, dtype, dims, candidates, training, eager) == backend


def fused_mlp_wins(fc1: cm.Problem, fc2: cm.Problem, dtype: torch.dtype, layer_backends: tuple,
                   eager: Optional[bool] = None, training: bool = False) -> bool:
    """Whether ``auto`` runs :func:`monarch_kernels.monarch_mlp` with Triton's fused hidden layer rather than
    the two layers on the backends ``auto`` picks for them (``layer_backends``, priced by :func:`call_seconds`):
    when :func:`monarch_kernels.cost_model.mlp_forward` (with ``training``: :func:`monarch_kernels.cost_model.
    mlp_training_step`, against the layers' training steps plus the activation derivative's elementwise pass
    they run between them) predicts it faster. Eager (as :func:`fastest`), the fused call costs at least the
    host time of the two Triton calls it replaces (:data:`HOST_S`; it plans and launches as many kernels, not
    measured on its own)."""
    name = _DTYPES.get(dtype)
    if name is None:
        return False
    dev = device()
    try:
        fused = (cm.mlp_training_step(fc1, fc2, name, dev) if training else cm.mlp_forward(fc1, fc2, name, dev))
    except ValueError:  # a pair the fused kernel does not take
        return False
    eager = not capturing() if eager is None else eager
    if eager:
        fused = max(fused.time(dev), 2 * HOST_S[("triton", training)])
    else:
        fused = fused.time(dev)
    layers = 0.0
    for problem, backend in zip((fc1, fc2), layer_backends):
        sh = problem.shape
        dims = (problem.tokens, problem.n_in, problem.n_out, max(sh.p, sh.q, sh.r, sh.s))
        layers += call_seconds(backend, "monarch", name, dims, training, problem.activation, eager, problem.bias)
    if training and fc1.activation != "none":
        layers += cm.activation_pass(fc1.tokens, fc1.n_out, name, dev, backward=True).time(dev)
    return fused < layers
