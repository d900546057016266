"""monarch-kernels: block-diagonal and Monarch matrix products with pluggable kernel backends.

Public API::

    monarch_matmul(x, w1, w2)        # M x,  M = P2 · BD(w2) · P1 · BD(w1)   (fly layout)
    monarch_linear(x, w1, w2, bias)  # functional MonarchLinear (ragged sizes, fused bias)
    blockdiag_matmul(x, w)           # BD(w) x
    blockdiag_linear(x, w, bias)     # functional BlockdiagLinear
    monarch_mlp(x, fc1_w1, fc1_w2, fc2_w1, fc2_w2, b1, b2)  # fc2(act(fc1(x))), hidden layer on chip (Triton)
    monarch_to_dense(w1, w2)         # dense (l·s, k·p) matrix
    project(W, nblocks)              # Frobenius-optimal Monarch factors of a dense W
    available_backends(), use_backend(name), set_backend(name), resolve_backend(op, x, *factors)
"""
from . import builtin, reference  # noqa: F401  (builtin registers the backends)
from .backends import (
    Backend,
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    set_backend,
    use_backend,
)
from .ops import (
    blockdiag_linear,
    blockdiag_matmul,
    monarch_linear,
    monarch_matmul,
    monarch_mlp,
    monarch_to_dense,
    resolve_backend,
)
from .projection import project
from .shapes import MonarchShape, monarch_factor_shapes

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "MonarchShape",
    "available_backends",
    "blockdiag_linear",
    "blockdiag_matmul",
    "get_backend",
    "monarch_factor_shapes",
    "monarch_linear",
    "monarch_matmul",
    "monarch_mlp",
    "monarch_to_dense",
    "project",
    "register_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
]
__version__ = "0.1.0"
