"""The single front door: validated, dispatching, differentiable block-diagonal and Monarch products.

Five primitives are registered as ``torch.library`` custom ops (namespace ``monarch_kernels``), each with a
fake (meta) implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces
through them and the backward of every op is written with the same ops (hence double backward works). A sixth
op, ``monarch_bwd``, fuses ``monarch_bwd_input`` and ``monarch_bwd_weight`` for a first-order backward (no
autograd formula of its own: a backward that must be differentiable runs the two ops):

=====================  ===============================================  ==================================
op                     math (per token, real case)                       backward uses
=====================  ===============================================  ==================================
blockdiag_fwd          ``y = BD(w) x + b``                               blockdiag_fwd (wᵀ), blockdiag_wgrad
blockdiag_wgrad        ``dw = Σ_t BD-blocks of g xᵀ``                    blockdiag_fwd
monarch_fwd            ``o = M x + b``, ``M = P2 BD(w2) P1 BD(w1)``      monarch_bwd_input, monarch_bwd_weight
monarch_bwd_input      ``dx = Mᵀ g``                                     monarch_fwd, monarch_bwd_weight
monarch_bwd_weight     ``(dw1, dw2) = ∇_(w1,w2) ⟨g, M x⟩``               monarch_fwd, monarch_bwd_input, itself
monarch_bwd            both of the above in one call                     (first-order backward only)
=====================  ===============================================  ==================================

``M`` is bilinear in ``(w1, w2)``, so the derivative of ``monarch_bwd_weight`` in direction ``(h1, h2)`` is
``⟨g, M(h1, w2) x⟩ + ⟨g, M(w1, h2) x⟩``, which the ops above express exactly. Complex tensors follow
PyTorch's conjugate convention (gradients are taken with conjugated partners).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import activations, backends
from .shapes import (
    MonarchShape,
    check_bias,
    check_factor,
    check_input_width,
    check_monarch_factors,
    check_out_features,
    check_same,
    check_tensor,
)

_NS = "monarch_kernels"


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _unflat(t2d: Tensor, lead: tuple) -> Tensor:
    return t2d.reshape(*lead, t2d.shape[-1])


# --------------------------------------------------------------------------------------------------
# custom ops: inputs of any leading shape; the backend sees 2-D (T, features) tensors
# --------------------------------------------------------------------------------------------------


def _blockdiag_fwd_impl(x: Tensor, w: Tensor, bias: Optional[Tensor], n_out: int, activation: str, backend: str) -> Tensor:
    out = backends.impl(backend).blockdiag_fwd(_flat(x), w, bias, n_out, activation)
    return _unflat(out, x.shape[:-1])


_blockdiag_fwd = torch.library.custom_op(f"{_NS}::blockdiag_fwd", mutates_args=())(_blockdiag_fwd_impl)


@_blockdiag_fwd.register_fake
def _(x, w, bias, n_out, activation, backend):
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op(f"{_NS}::blockdiag_wgrad", mutates_args=())
def _blockdiag_wgrad(x: Tensor, g: Tensor, k: int, q: int, p: int, backend: str) -> Tensor:
    return backends.impl(backend).blockdiag_wgrad(_flat(x), _flat(g), k, q, p)


@_blockdiag_wgrad.register_fake
def _(x, g, k, q, p, backend):
    return x.new_empty(k, q, p)


def _monarch_fwd_impl(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], n_out: int, activation: str, backend: str
) -> Tensor:
    out = backends.impl(backend).monarch_fwd(_flat(x), w1, w2, bias, n_out, activation)
    return _unflat(out, x.shape[:-1])


_monarch_fwd = torch.library.custom_op(f"{_NS}::monarch_fwd", mutates_args=())(_monarch_fwd_impl)


@_monarch_fwd.register_fake
def _(x, w1, w2, bias, n_out, activation, backend):
    return x.new_empty(*x.shape[:-1], n_out)


@torch.library.custom_op(f"{_NS}::monarch_bwd_input", mutates_args=())
def _monarch_bwd_input(g: Tensor, w1: Tensor, w2: Tensor, n_in: int, backend: str) -> Tensor:
    out = backends.impl(backend).monarch_bwd_input(_flat(g), w1, w2, n_in)
    return _unflat(out, g.shape[:-1])


@_monarch_bwd_input.register_fake
def _(g, w1, w2, n_in, backend):
    return g.new_empty(*g.shape[:-1], n_in)


@torch.library.custom_op(f"{_NS}::monarch_bwd_weight", mutates_args=())
def _monarch_bwd_weight(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return backends.impl(backend).monarch_bwd_weight(_flat(x), _flat(g), w1, w2)


@_monarch_bwd_weight.register_fake
def _(x, g, w1, w2, backend):
    return w1.new_empty(w1.shape), w2.new_empty(w2.shape)


@torch.library.custom_op(f"{_NS}::monarch_bwd", mutates_args=())
def _monarch_bwd(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, n_in: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``monarch_bwd_input`` and ``monarch_bwd_weight`` in one call, for a first-order backward that needs both:
    backends with a ``monarch_bwd`` primitive share the recomputed intermediate and ``dy``; the others run the
    two primitives. No autograd formula: a backward that must itself be differentiable uses the two ops."""
    impl = backends.impl(backend)
    xf, gf = _flat(x), _flat(g)
    if hasattr(impl, "monarch_bwd"):
        dx, dw1, dw2 = impl.monarch_bwd(xf, gf, w1, w2, n_in)
    else:
        dx, (dw1, dw2) = impl.monarch_bwd_input(gf, w1, w2, n_in), impl.monarch_bwd_weight(xf, gf, w1, w2)
    return _unflat(dx, g.shape[:-1]), dw1, dw2


@_monarch_bwd.register_fake
def _(x, g, w1, w2, n_in, backend):
    return g.new_empty(*g.shape[:-1], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _untracked_eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a forward call may run its implementation directly instead of through the custom op, with
    identical results: eager mode (not compiling, no profiler, no dispatch/function mode, no functorch
    transform), plain tensors, and nothing for autograd to record. Inference calls then skip the custom-op
    dispatch, which costs more than the kernel itself for a few tokens."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


# --------------------------------------------------------------------------------------------------
# autograd formulas (written with the ops themselves, so they are differentiable again)
#
# Each backward is the real-case formula evaluated at the *conjugated* saved tensors with the upstream
# gradient as is; that is PyTorch's convention ``grad = Jᴴ h`` for complex inputs and a no-op for real ones.
# --------------------------------------------------------------------------------------------------


def _saved(ctx):
    return [t.conj() for t in ctx.saved_tensors]


def _setup_blockdiag_fwd(ctx, inputs, output):
    x, w, bias, n_out, activation, backend = inputs
    ctx.save_for_backward(x, w, bias)
    ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation


def _backward_blockdiag_fwd(ctx, g):
    x, w, bias = ctx.saved_tensors
    if ctx.activation != "none":  # recompute the pre-activation instead of saving it
        pre = _blockdiag_fwd(x, w, bias, ctx.n_out, "none", ctx.backend)
        g = g * activations.grad(ctx.activation, pre)
    x, w = x.conj(), w.conj()
    k, q, p = w.shape
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _blockdiag_fwd(g, w.transpose(1, 2), None, x.shape[-1], "none", ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = _blockdiag_wgrad(x, g, k, q, p, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = _flat(g).sum(0)
    return dx, dw, db, None, None, None


_blockdiag_fwd.register_autograd(_backward_blockdiag_fwd, setup_context=_setup_blockdiag_fwd)


def _setup_blockdiag_wgrad(ctx, inputs, output):
    x, g, k, q, p, backend = inputs
    ctx.save_for_backward(x, g)
    ctx.backend = backend


def _backward_blockdiag_wgrad(ctx, h):
    # dw[kk] = Σ_t g_kk x_kkᵀ  =>  d/dx = BD(h)ᵀ g,  d/dg = BD(h) x.
    x, g = _saved(ctx)
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = _blockdiag_fwd(g, h.transpose(1, 2), None, x.shape[-1], "none", ctx.backend)
    if ctx.needs_input_grad[1]:
        dg = _blockdiag_fwd(x, h, None, g.shape[-1], "none", ctx.backend)
    return dx, dg, None, None, None, None


_blockdiag_wgrad.register_autograd(_backward_blockdiag_wgrad, setup_context=_setup_blockdiag_wgrad)


def _setup_monarch_fwd(ctx, inputs, output):
    x, w1, w2, bias, n_out, activation, backend = inputs
    ctx.save_for_backward(x, w1, w2, bias)  # the stage-1 intermediate is recomputed in backward, never saved
    ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation


def _backward_monarch_fwd(ctx, g):
    x, w1, w2, bias = ctx.saved_tensors
    if ctx.activation != "none":  # recompute the pre-activation instead of saving it
        pre = _monarch_fwd(x, w1, w2, bias, ctx.n_out, "none", ctx.backend)
        g = g * activations.grad(ctx.activation, pre)
    x, w1, w2 = x.conj(), w1.conj(), w2.conj()
    dx = dw1 = dw2 = db = None
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if need_x and need_w and not torch.is_grad_enabled():  # first-order backward: one fused call
        dx, dw1, dw2 = _monarch_bwd(x, g, w1, w2, x.shape[-1], ctx.backend)
    else:
        if need_x:
            dx = _monarch_bwd_input(g, w1, w2, x.shape[-1], ctx.backend)
        if need_w:
            dw1, dw2 = _monarch_bwd_weight(x, g, w1, w2, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = _flat(g).sum(0)
    return dx, dw1, dw2, db, None, None, None


_monarch_fwd.register_autograd(_backward_monarch_fwd, setup_context=_setup_monarch_fwd)


def _setup_monarch_bwd_input(ctx, inputs, output):
    g, w1, w2, n_in, backend = inputs
    ctx.save_for_backward(g, w1, w2)
    ctx.backend = backend


def _backward_monarch_bwd_input(ctx, h):
    # a = Mᵀ g  =>  ⟨h, a⟩ = ⟨g, M h⟩: d/dg = M h, d/dw = ∇_w ⟨g, M h⟩.
    g, w1, w2 = _saved(ctx)
    dg = dw1 = dw2 = None
    if ctx.needs_input_grad[0]:
        dg = _monarch_fwd(h, w1, w2, None, g.shape[-1], "none", ctx.backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw1, dw2 = _monarch_bwd_weight(h, g, w1, w2, ctx.backend)
    return dg, dw1, dw2, None, None


_monarch_bwd_input.register_autograd(_backward_monarch_bwd_input, setup_context=_setup_monarch_bwd_input)


def _setup_monarch_bwd_weight(ctx, inputs, output):
    x, g, w1, w2, backend = inputs
    ctx.save_for_backward(x, g, w1, w2)
    ctx.backend = backend


def _backward_monarch_bwd_weight(ctx, h1, h2):
    # (dw1, dw2) = ∇ ⟨g, M(w1, w2) x⟩; paired with (h1, h2) it is ⟨g, M(h1, w2) x⟩ + ⟨g, M(w1, h2) x⟩.
    x, g, w1, w2 = _saved(ctx)
    n_in, n_out, b = x.shape[-1], g.shape[-1], ctx.backend
    pairs = []  # (stage-1, stage-2) factors of each term of the directional derivative
    if h1 is not None:
        pairs.append((h1, w2))
    if h2 is not None:
        pairs.append((w1, h2))
    dx = dg = dw1 = dw2 = None
    if ctx.needs_input_grad[0] and pairs:
        dx = sum(_monarch_bwd_input(g, a, c, n_in, b) for a, c in pairs)
    if ctx.needs_input_grad[1] and pairs:
        dg = sum(_monarch_fwd(x, a, c, None, n_out, "none", b) for a, c in pairs)
    if ctx.needs_input_grad[2] and h2 is not None:
        dw1 = _monarch_bwd_weight(x, g, w1, h2, b)[0]
    if ctx.needs_input_grad[3] and h1 is not None:
        dw2 = _monarch_bwd_weight(x, g, h1, w2, b)[1]
    return dx, dg, dw1, dw2, None


_monarch_bwd_weight.register_autograd(_backward_monarch_bwd_weight, setup_context=_setup_monarch_bwd_weight)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def _check_activation(fn: str, activation: Optional[str], x: Tensor) -> str:
    act = activations.canonical(activation, fn)
    if act != "none" and x.is_complex():
        raise TypeError(f"{fn}: activation {act!r} needs real tensors, got {x.dtype}")
    return act


def _tokens(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def blockdiag_linear(
    x: Tensor,
    w: Tensor,
    bias: Optional[Tensor] = None,
    *,
    out_features: Optional[int] = None,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Block-diagonal linear map ``y = act(BD(w) x + bias)`` over the last dim of ``x``.

    ``x (..., n_in)`` with ``1 ≤ n_in ≤ k·p`` (a short input is treated as zero-padded, without a
    copy on kernel backends); ``w (k, q, p)``; output ``(..., out_features)`` with
    ``out_features ∈ [1, k·q]`` (default ``k·q``; the tail is dropped); ``bias (out_features,)``;
    ``activation`` one of ``None, "relu", "gelu", "gelu_tanh"`` (fused into the kernels' epilogue).
    """
    fn = "blockdiag_linear"
    check_tensor("x", x, fn)
    check_factor("w", w, fn)
    k, q, p = w.shape
    check_input_width(fn, x, k * p, True, f"w of shape ({k}, {q}, {p})")
    n_out = check_out_features(fn, out_features, k * q)
    check_same(fn, x, w=w)
    check_bias(fn, bias, x, n_out)
    act = _check_activation(fn, activation, x)
    name = backends.resolve("blockdiag", x.device, x.dtype, (_tokens(x), x.shape[-1], n_out, p), backend)
    op = _blockdiag_fwd_impl if _untracked_eager(x, w, bias) else _blockdiag_fwd
    return op(x, w, bias, n_out, act, name)


def blockdiag_matmul(x: Tensor, w: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Block-diagonal product ``BD(w) x``: ``x (..., k·p)``, ``w (k, q, p)`` -> ``(..., k·q)``.

    Block ``kk`` maps ``x[..., kk·p:(kk+1)·p]`` to ``y[..., kk·q:(kk+1)·q]`` (fly convention).
    """
    fn = "blockdiag_matmul"
    check_tensor("x", x, fn)
    check_factor("w", w, fn)
    k, q, p = w.shape
    check_input_width(fn, x, k * p, False, f"w of shape ({k}, {q}, {p})")
    return blockdiag_linear(x, w, backend=backend)


def monarch_linear(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    bias: Optional[Tensor] = None,
    *,
    out_features: Optional[int] = None,
    activation: Optional[str] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Monarch linear map ``o = act(P2 · BD(w2) · P1 · BD(w1) · x + bias)``, the functional ``MonarchLinear``.

    ``x (..., n_in)`` with ``1 ≤ n_in ≤ k·p`` (short inputs act as zero-padded);
    ``w1 (k, q, p)``, ``w2 (l, s, r)`` with ``l·r = k·q``; output ``(..., out_features)`` with
    ``out_features ∈ [1, l·s]`` (default ``l·s``); ``bias (out_features,)`` or ``None``;
    ``activation`` one of ``None, "relu", "gelu", "gelu_tanh"`` (fused into the kernels' epilogue; the
    backward recomputes the pre-activation instead of saving it).
    """
    fn = "monarch_linear"
    check_tensor("x", x, fn)
    sh = check_monarch_factors(fn, w1, w2)
    check_input_width(fn, x, sh.n_in, True, f"w1 of shape {tuple(w1.shape)}")
    n_out = check_out_features(fn, out_features, sh.n_out)
    check_same(fn, x, w1=w1)
    check_bias(fn, bias, x, n_out)
    act = _check_activation(fn, activation, x)
    return _dispatch_monarch(x, w1, w2, bias, sh, n_out, act, backend)


def _dispatch_monarch(x, w1, w2, bias, sh: MonarchShape, n_out: int, act: str, backend: Optional[str]) -> Tensor:
    """Resolve the backend for validated arguments and run the forward op (directly when nothing tracks it)."""
    block = max(sh.p, sh.q, sh.r, sh.s)
    name = backends.resolve("monarch", x.device, x.dtype, (_tokens(x), x.shape[-1], n_out, block), backend)
    op = _monarch_fwd_impl if _untracked_eager(x, w1, w2, bias) else _monarch_fwd
    return op(x, w1, w2, bias, n_out, act, name)


def monarch_matmul(x: Tensor, w1: Tensor, w2: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Monarch product ``M x`` with ``M = P2 · BD(w2) · P1 · BD(w1)`` (fly's ``blockdiag_butterfly_multiply``).

    ``x (..., k·p)``, ``w1 (k, q, p)``, ``w2 (l, s, r)`` with ``l·r = k·q``; output ``(..., l·s)``.

    1. stage 1: ``y[.., kk·q + qq] = Σ_pp w1[kk, qq, pp] · x[.., kk·p + pp]``;
    2. P1: stage-2 block ``ll`` takes ``z[.., ll, rr] = y[.., rr·l + ll]``;
    3. stage 2: ``o[.., ll, ss] = Σ_rr w2[ll, ss, rr] · z[.., ll, rr]``;
    4. P2: ``out[.., ss·l + ll] = o[.., ll, ss]``.

    For square factors ``(b, B, B)`` this is the paper's ``M = P L Pᵀ R`` with ``R = BD(w1)``, ``L = BD(w2)``.
    """
    fn = "monarch_matmul"
    check_tensor("x", x, fn)
    sh = check_monarch_factors(fn, w1, w2)
    check_input_width(fn, x, sh.n_in, False, f"w1 of shape {tuple(w1.shape)}")
    check_same(fn, x, w1=w1)
    return _dispatch_monarch(x, w1, w2, None, sh, sh.n_out, "none", backend)


def monarch_to_dense(w1: Tensor, w2: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """The dense ``(l·s, k·p)`` matrix ``M`` with ``monarch_matmul(x, w1, w2) == x @ M.T`` (differentiable)."""
    sh = check_monarch_factors("monarch_to_dense", w1, w2)
    eye = torch.eye(sh.n_in, dtype=w1.dtype, device=w1.device)
    return monarch_matmul(eye, w1, w2, backend=backend).transpose(0, 1)


def resolve_backend(op: str, x: Tensor, *factors: Tensor, backend: Optional[str] = None) -> str:
    """The backend a call of ``op`` (``"blockdiag"`` or ``"monarch"``) with these arguments would use."""
    if op not in ("blockdiag", "monarch"):
        raise ValueError(f"op must be 'blockdiag' or 'monarch', got {op!r}")
    check_tensor("x", x, "resolve_backend")
    if op == "blockdiag":
        (w,) = factors
        dims = (_tokens(x), x.shape[-1], w.shape[0] * w.shape[1], w.shape[2])
    else:
        sh = MonarchShape.from_factors(factors[0].shape, factors[1].shape)
        dims = (_tokens(x), x.shape[-1], sh.n_out, max(sh.p, sh.q, sh.r, sh.s))
    return backends.resolve(op, x.device, x.dtype, dims, backend)
