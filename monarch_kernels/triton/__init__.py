"""Triton backend: the five primitives of :mod:`monarch_kernels.reference` as Triton kernels.

Runs on CUDA tensors (fp16, bf16, fp32), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before import (used by the tests). Kernels live in :mod:`.blockdiag` and
:mod:`.monarch`; this module only adapts argument conventions.
"""
from __future__ import annotations

from . import blockdiag as _bd
from . import monarch as _mon


def _bias(bias):
    return bias.contiguous() if bias is not None else None


def blockdiag_fwd(x, w, bias, n_out, activation="none"):
    return _bd.blockdiag_forward(x, w, _bias(bias), n_out, activation)


def blockdiag_wgrad(x, g, k, q, p):
    return _bd.blockdiag_weight_grad(x, g, k, q, p)


def monarch_fwd(x, w1, w2, bias, n_out, activation="none"):
    return _mon.forward(x, w1, w2, _bias(bias), n_out, activation)


def monarch_bwd_input(g, w1, w2, n_in):
    return _mon.backward_input(g, w1, w2, n_in)


def monarch_bwd_weight(x, g, w1, w2):
    return _mon.backward_weight(x, g, w1, w2)
