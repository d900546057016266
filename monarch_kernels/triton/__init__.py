"""Triton backend: the primitives of :mod:`monarch_kernels.reference` as Triton kernels.

Runs on CUDA tensors (fp16, bf16, fp32), or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before import (used by the tests). Kernels live in :mod:`.blockdiag` and
:mod:`.monarch`, their launch plans in :mod:`.plan` (pure Python, importable without triton, read by
:mod:`monarch_kernels.cost_model`); this module only adapts argument conventions and imports the kernel
modules on first use.
"""
from __future__ import annotations


def _bias(bias):
    return bias.contiguous() if bias is not None else None


def blockdiag_fwd(x, w, bias, n_out, activation="none"):
    from .blockdiag import bd_forward

    return bd_forward(x, w, _bias(bias), n_out, activation)


def blockdiag_wgrad(x, g, k, q, p):
    from .blockdiag import bd_weight_grad

    return bd_weight_grad(x, g, k, q, p)


def monarch_fwd(x, w1, w2, bias, n_out, activation="none"):
    from .monarch import forward

    return forward(x, w1, w2, _bias(bias), n_out, activation)


def monarch_fwd_saving(x, w1, w2, bias, n_out, activation="none"):
    from .monarch import forward_saving

    return forward_saving(x, w1, w2, _bias(bias), n_out, activation)


def monarch_mlp_fusable(sh1, sh2, n_in, n_hidden, dtype, training=False):
    """Whether the fused MLP (:mod:`.mlp`) takes these layers: the forward, with ``training`` its backward too."""
    from .mlp import fusable

    return fusable(sh1, sh2, n_in, n_hidden, dtype, training)


def monarch_mlp_fwd(x, w1a, w2a, bias1, w1b, w2b, bias2, n_hidden, n_out, activation="gelu"):
    """``fc2(act(fc1(x)))`` with ``n_hidden`` hidden features and the hidden layer fused (:mod:`.mlp`), for
    layers :func:`monarch_mlp_fusable` takes."""
    from .mlp import mlp_forward

    return mlp_forward(x, w1a, w2a, _bias(bias1), w1b, w2b, _bias(bias2), n_out, activation)


def monarch_mlp_fwd_saving(x, w1a, w2a, bias1, w1b, w2b, bias2, n_hidden, n_out, activation="gelu"):
    """``(out, saved)``: :func:`monarch_mlp_fwd` and what :func:`monarch_mlp_bwd` needs (the two stage-1
    intermediates and fc2's regrouped ``w1``, :func:`.mlp.mlp_forward_saving`)."""
    from .mlp import mlp_forward_saving

    out, *saved = mlp_forward_saving(x, w1a, w2a, _bias(bias1), w1b, w2b, _bias(bias2), n_out, activation)
    return out, tuple(saved)


def monarch_mlp_bwd(x, g, w1a, w2a, bias1, w1b, w2b, has_bias2, saved, activation="gelu", want_dx=True,
                    want_dw=(True, True, True, True)):
    """``(dx, dw1a, dw2a, db1, dw1b, dw2b, db2)`` of :func:`monarch_mlp_fwd_saving` at ``g``, ``None`` for what is
    not wanted (``want_dx``, ``want_dw`` for ``w1a, w2a, w1b, w2b``) or has no bias (:func:`.mlp.mlp_backward`);
    ``saved``: what it returned beside the output."""
    from .mlp import mlp_backward

    return mlp_backward(x, g, w1a, w2a, _bias(bias1), w1b, w2b, *saved, activation, has_bias2, want_dx, want_dw)


def monarch_bwd_input(g, w1, w2, n_in):
    from .monarch import backward_input

    return backward_input(g, w1, w2, n_in)


def monarch_bwd_weight(x, g, w1, w2):
    from .monarch import backward_weight

    return backward_weight(x, g, w1, w2)


def monarch_bwd(x, g, w1, w2, n_in):
    from .monarch import backward

    return backward(x, g, w1, w2, n_in)


def monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, want_dx, z=None, want_dw=True, pre=None):
    from .monarch import backward_epilogue

    return backward_epilogue(x, g, w1, w2, _bias(bias), n_in, activation, want_dx, z, want_dw, pre)
