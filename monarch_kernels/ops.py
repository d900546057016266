"""The single front door: validated, dispatching, differentiable block-diagonal and Monarch products.

Seven primitives are registered as ``torch.library`` custom ops (namespace ``monarch_kernels``), each with a
fake (meta) implementation and argument validation (shapes, dtypes, devices, bias length, ``n_out``/``n_in``)
in the op body and in the fake; the first six also have a vmap rule and a registered autograd formula written
with the same ops, so ``torch.compile(fullgraph=True)`` traces through them and every derivative order works:

=====================  ===============================================  ==================================
op                     math (per token, real case)                       backward uses
=====================  ===============================================  ==================================
blockdiag_fwd          ``y = act(BD(w) x + b)``                          blockdiag_fwd (wᵀ), blockdiag_wgrad
blockdiag_wgrad        ``dw = Σ_t BD-blocks of g xᵀ``                    blockdiag_fwd
monarch_fwd            ``o = act(M x + b)``, ``M = P2 BD(w2) P1 BD(w1)``  monarch_bwd(_input, _weight)
monarch_bwd_input      ``dx = Mᵀ g``                                     monarch_fwd, monarch_bwd_weight
monarch_bwd_weight     ``(dw1, dw2) = ∇_(w1,w2) ⟨g, M x⟩``               monarch_fwd, monarch_bwd_input, itself
monarch_bwd            ``(dx, dw1, dw2)``: both of the above in one call  the formulas of both
monarch_bwd_epilogue   ``(dx, dw1, dw2, db)`` of ``act(M x + b)``       (first order only: not differentiable)
=====================  ===============================================  ==================================

``monarch_bwd`` serves a first-order backward that needs ``dx`` and the weight gradients (backends with a
fused kernel share the recomputed intermediate), ``monarch_bwd_epilogue`` one with a fused activation that needs
the weight gradients (the C++ backend gets the pre-activation inside its one-pass backward instead of running a
forward first); a backward that must itself be differentiated runs the separate ops. ``M`` is bilinear in ``(w1, w2)``,
so the derivative of ``monarch_bwd_weight`` in direction ``(h1, h2)`` is ``⟨g, M(h1, w2) x⟩ + ⟨g, M(w1, h2) x⟩``, which
the ops above express exactly. Complex tensors follow PyTorch's conjugate convention (gradients are taken with
conjugated partners).

Eager calls skip the custom-op dispatch (:func:`_route`): an untracked forward runs the backend directly, a
tracked one runs inside a plain ``autograd.Function`` with the same formulas, whose first-order backward calls the
implementations directly too. On that route a backend with ``monarch_fwd_saving`` (the torch reference,
Triton) keeps the stage-1 intermediate for its first-order backward, as fly's ``BlockdiagButterflyMultiply``
does (``T·k·q`` more elements of activation memory, no stage-1 recompute), and Triton's two-kernel path with
an activation the pre-activation too (``T·n_out``, as ``nn.GELU`` keeps its input), and the CUDA backend where
a resident kernel runs the forward (its backward then runs Triton's kernels on that intermediate); the C++
backend, the CUDA one elsewhere, and every backend through the custom op (``torch.compile``, profiler, dispatch
modes), save only the inputs and recompute. A first-order
backward with an activation runs the backend's ``monarch_bwd_epilogue`` (C++: one pass that gets the
pre-activation from one stage-2 GEMM per row tile) instead of a forward followed by the backward.

``torch.library``'s autograd registration does not support ``torch.func`` transforms (its generated
``autograd.Function`` has no ``setup_context``); under ``torch.func.grad``/``vjp``/``jacrev``/``vmap`` the
same setup and backward functions run through an equivalent ``autograd.Function`` (:func:`_call`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import activations, backends
from .shapes import (
    MonarchShape,
    check_bias,
    check_blockdiag_op,
    check_blockdiag_wgrad_op,
    check_factor,
    check_input_width,
    check_monarch_factors,
    check_monarch_op,
    check_out_features,
    check_same,
    check_tensor,
)

_NS = "monarch_kernels"


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _unflat(t2d: Tensor, lead: tuple) -> Tensor:
    """``(T, n)`` -> ``(*lead, n)``, contiguous: every op returns contiguous tensors, as its fake does (a
    backend may return a transposed layout, e.g. the reference's bias epilogue when ``q = 1``). Never a view:
    autograd refuses in-place ops (``nn.ReLU(inplace=True)`` after the layer) on an output of a custom
    function that is a view of a tensor made inside it; ``detach`` gives the same memory as a tensor of its
    own (the ops' implementations run below autograd: nothing to detach from)."""
    out = t2d.contiguous().reshape(*lead, t2d.shape[-1])
    return out.detach() if out._is_view() else out


def _check_op_args(fn: str, backend, t: Tensor, activation="none") -> None:
    """The string arguments of a custom op: a registered (already resolved) backend that supports ``t``'s
    device and dtype, a known activation (real tensors only)."""
    if not isinstance(backend, str) or backend == backends.AUTO:
        raise ValueError(f"{fn}: backend must name a registered backend (already resolved), got {backend!r}")
    if not backends.get(backend).supports(t.device, t.dtype):
        raise backends.BackendUnavailableError(f"{fn}: backend {backend!r} does not support {t.dtype} tensors "
                                               f"on {t.device}")
    activations.canonical(activation, fn)
    if activation != "none" and t.is_complex():
        raise TypeError(f"{fn}: activation {activation!r} needs real tensors, got {t.dtype}")


# --------------------------------------------------------------------------------------------------
# custom ops: inputs of any leading shape; the backend sees 2-D (T, features) tensors. The *_impl
# functions skip validation: the public functions below validate first and call them directly in eager
# mode (see _route).
# --------------------------------------------------------------------------------------------------


def _blockdiag_fwd_impl(x: Tensor, w: Tensor, bias: Optional[Tensor], n_out: int, activation: str,
                        backend: str) -> Tensor:
    out = backends.impl(backend).blockdiag_fwd(_flat(x), w, bias, n_out, activation)
    return _unflat(out, x.shape[:-1])


def _check_blockdiag_fwd(x, w, bias, n_out, activation, backend):
    fn = f"{_NS}::blockdiag_fwd"
    check_blockdiag_op(fn, x, w, bias, n_out)
    _check_op_args(fn, backend, x, activation)


@torch.library.custom_op(f"{_NS}::blockdiag_fwd", mutates_args=())
def _blockdiag_fwd(x: Tensor, w: Tensor, bias: Optional[Tensor], n_out: int, activation: str, backend: str) -> Tensor:
    _check_blockdiag_fwd(x, w, bias, n_out, activation, backend)
    return _blockdiag_fwd_impl(x, w, bias, n_out, activation, backend)


@_blockdiag_fwd.register_fake
def _(x, w, bias, n_out, activation, backend):
    _check_blockdiag_fwd(x, w, bias, n_out, activation, backend)
    return x.new_empty(*x.shape[:-1], n_out)


def _check_blockdiag_wgrad(x, g, k, q, p, backend):
    fn = f"{_NS}::blockdiag_wgrad"
    check_blockdiag_wgrad_op(fn, x, g, k, q, p)
    _check_op_args(fn, backend, x)


def _blockdiag_wgrad_impl(x: Tensor, g: Tensor, k: int, q: int, p: int, backend: str) -> Tensor:
    return backends.impl(backend).blockdiag_wgrad(_flat(x), _flat(g), k, q, p).contiguous()


@torch.library.custom_op(f"{_NS}::blockdiag_wgrad", mutates_args=())
def _blockdiag_wgrad(x: Tensor, g: Tensor, k: int, q: int, p: int, backend: str) -> Tensor:
    _check_blockdiag_wgrad(x, g, k, q, p, backend)
    return _blockdiag_wgrad_impl(x, g, k, q, p, backend)


@_blockdiag_wgrad.register_fake
def _(x, g, k, q, p, backend):
    _check_blockdiag_wgrad(x, g, k, q, p, backend)
    return x.new_empty(k, q, p)


def _monarch_fwd_impl(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], n_out: int, activation: str, backend: str
) -> Tensor:
    out = backends.impl(backend).monarch_fwd(_flat(x), w1, w2, bias, n_out, activation)
    return _unflat(out, x.shape[:-1])


def _check_monarch_fwd(x, w1, w2, bias, n_out, activation, backend):
    fn = f"{_NS}::monarch_fwd"
    check_monarch_op(fn, w1, w2, x=x, bias=bias, n_out=n_out)
    _check_op_args(fn, backend, x, activation)


@torch.library.custom_op(f"{_NS}::monarch_fwd", mutates_args=())
def _monarch_fwd(
    x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], n_out: int, activation: str, backend: str
) -> Tensor:
    _check_monarch_fwd(x, w1, w2, bias, n_out, activation, backend)
    return _monarch_fwd_impl(x, w1, w2, bias, n_out, activation, backend)


@_monarch_fwd.register_fake
def _(x, w1, w2, bias, n_out, activation, backend):
    _check_monarch_fwd(x, w1, w2, bias, n_out, activation, backend)
    return x.new_empty(*x.shape[:-1], n_out)


def _check_monarch_bwd_input(g, w1, w2, n_in, backend):
    fn = f"{_NS}::monarch_bwd_input"
    check_monarch_op(fn, w1, w2, g=g, n_in=n_in)
    _check_op_args(fn, backend, g)


def _monarch_bwd_input_impl(g: Tensor, w1: Tensor, w2: Tensor, n_in: int, backend: str) -> Tensor:
    return _unflat(backends.impl(backend).monarch_bwd_input(_flat(g), w1, w2, n_in), g.shape[:-1])


@torch.library.custom_op(f"{_NS}::monarch_bwd_input", mutates_args=())
def _monarch_bwd_input(g: Tensor, w1: Tensor, w2: Tensor, n_in: int, backend: str) -> Tensor:
    _check_monarch_bwd_input(g, w1, w2, n_in, backend)
    return _monarch_bwd_input_impl(g, w1, w2, n_in, backend)


@_monarch_bwd_input.register_fake
def _(g, w1, w2, n_in, backend):
    _check_monarch_bwd_input(g, w1, w2, n_in, backend)
    return g.new_empty(*g.shape[:-1], n_in)


def _check_monarch_bwd_weight(x, g, w1, w2, backend):
    fn = f"{_NS}::monarch_bwd_weight"
    check_monarch_op(fn, w1, w2, x=x, g=g)
    _check_op_args(fn, backend, x)


def _monarch_bwd_weight_impl(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dw1, dw2 = backends.impl(backend).monarch_bwd_weight(_flat(x), _flat(g), w1, w2)
    return dw1.contiguous(), dw2.contiguous()


@torch.library.custom_op(f"{_NS}::monarch_bwd_weight", mutates_args=())
def _monarch_bwd_weight(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    _check_monarch_bwd_weight(x, g, w1, w2, backend)
    return _monarch_bwd_weight_impl(x, g, w1, w2, backend)


@_monarch_bwd_weight.register_fake
def _(x, g, w1, w2, backend):
    _check_monarch_bwd_weight(x, g, w1, w2, backend)
    return w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _check_monarch_bwd(x, g, w1, w2, n_in, backend):
    fn = f"{_NS}::monarch_bwd"
    check_monarch_op(fn, w1, w2, x=x, g=g, n_in=n_in)
    _check_op_args(fn, backend, x)


def _monarch_bwd_impl(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, n_in: int,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.impl(backend)
    xf, gf = _flat(x), _flat(g)
    if hasattr(impl, "monarch_bwd"):
        dx, dw1, dw2 = impl.monarch_bwd(xf, gf, w1, w2, n_in)
    else:
        dx, (dw1, dw2) = impl.monarch_bwd_input(gf, w1, w2, n_in), impl.monarch_bwd_weight(xf, gf, w1, w2)
    return _unflat(dx, g.shape[:-1]), dw1.contiguous(), dw2.contiguous()


@torch.library.custom_op(f"{_NS}::monarch_bwd", mutates_args=())
def _monarch_bwd(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, n_in: int,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(monarch_bwd_input(g, ...), *monarch_bwd_weight(x, g, ...))`` in one call: backends with a
    ``monarch_bwd`` primitive share the recomputed intermediate and ``dy``; the others run the two."""
    _check_monarch_bwd(x, g, w1, w2, n_in, backend)
    return _monarch_bwd_impl(x, g, w1, w2, n_in, backend)


@_monarch_bwd.register_fake
def _(x, g, w1, w2, n_in, backend):
    _check_monarch_bwd(x, g, w1, w2, n_in, backend)
    return g.new_empty(*g.shape[:-1], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _monarch_bwd_epilogue_impl(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], n_in: int,
                               activation: str, backend: str, want_dx: bool = True, z: Optional[Tensor] = None,
                               want_dw: bool = True, pre: Optional[Tensor] = None):
    """``(dx | None, dw1 | None, dw2 | None, db)`` of ``⟨g, act(M x + bias)⟩`` (``db`` zeros without a bias)
    through the backend's ``monarch_bwd_epilogue`` (one pass on CPU; the reference and Triton reuse ``z``, and
    Triton ``pre``, what their saving forwards kept) where it has one for these tensors, else composed: a
    forward for the pre-activation (unless ``pre`` is given), the activation's derivative, the fused backward.
    The weight gradients are ``None`` unless ``want_dw``."""
    impl = backends.impl(backend)
    xf, gf = _flat(x), _flat(g)
    fused = getattr(impl, "monarch_bwd_epilogue", None)
    out = None if fused is None else fused(xf, gf, w1, w2, bias, n_in, activation, want_dx, z, want_dw, pre)
    if out is not None:
        dx, dw1, dw2, db = out
    else:
        if activation != "none":
            if pre is None:
                pre = impl.monarch_fwd(xf, w1, w2, bias, gf.shape[1], "none")
            gf = activations.backward(activation, pre, gf)
        dx, dw1, dw2 = _monarch_bwd_impl(xf, gf, w1, w2, n_in, backend)
        db = gf.sum(0) if bias is not None else None
    dx = _unflat(dx, g.shape[:-1]) if want_dx else None
    dw1, dw2 = (dw1.contiguous(), dw2.contiguous()) if want_dw else (None, None)
    return dx, dw1, dw2, gf.new_zeros(gf.shape[1]) if bias is None else db


def _check_monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, backend):
    fn = f"{_NS}::monarch_bwd_epilogue"
    check_monarch_op(fn, w1, w2, x=x, g=g, n_in=n_in, bias=bias, n_out=g.shape[-1])
    _check_op_args(fn, backend, x, activation)


@torch.library.custom_op(f"{_NS}::monarch_bwd_epilogue", mutates_args=())
def _monarch_bwd_epilogue(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], n_in: int,
                          activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first-order backward of ``act(M x + bias)``: ``(dx, dw1, dw2, db)`` (``db`` zeros without a bias), the
    pre-activation recomputed inside the backend's pass instead of by a separate forward. Not differentiable: a
    backward that must itself be differentiated runs ``monarch_fwd``, ``monarch_bwd_input``, ``monarch_bwd_weight``."""
    _check_monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, backend)
    return _monarch_bwd_epilogue_impl(x, g, w1, w2, bias, n_in, activation, backend)


@_monarch_bwd_epilogue.register_fake
def _(x, g, w1, w2, bias, n_in, activation, backend):
    _check_monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, backend)
    return (g.new_empty(*g.shape[:-1], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
            g.new_empty(g.shape[-1]))


def _backward_monarch_bwd_epilogue(ctx, *grads):
    raise RuntimeError(f"{_NS}::monarch_bwd_epilogue is a first-order backward and is not differentiable; "
                       "differentiate monarch_fwd, monarch_bwd_input and monarch_bwd_weight instead")


_monarch_bwd_epilogue.register_autograd(_backward_monarch_bwd_epilogue)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


DIRECT, FUNCTION, OP = "direct", "function", "op"


def _route(*tensors: Optional[Tensor]) -> str:
    """How a forward call runs, with identical results on every route. In eager mode (not compiling, no
    profiler, no dispatch/function mode, no functorch transform) on plain tensors the custom-op dispatch,
    which costs more than the kernel itself for a few tokens, is skipped: ``DIRECT`` runs the implementation
    when autograd has nothing to record, ``FUNCTION`` runs it inside a plain ``autograd.Function`` with the
    op's formulas (:class:`_MonarchFwdEager`, :class:`_BlockdiagFwdEager`) when it has. Everything else goes
    through the custom op (``OP``), which the compiler, the profiler and dispatch modes observe."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled():
        return OP
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return OP
    if not all(t is None or type(t) in _PLAIN_TENSORS for t in tensors):
        return OP
    return FUNCTION if _training(*tensors) else DIRECT


def _training(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these tensors (its backward will run on the backend chosen now)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------
# autograd formulas (written with the ops themselves, so they are differentiable again)
#
# Each backward is the real-case formula evaluated at the *conjugated* saved tensors with the upstream
# gradient as is; that is PyTorch's convention ``grad = Jᴴ h`` for complex inputs and a no-op for real ones.
# Backward functions call the ops through _call, so they also work under torch.func transforms.
# --------------------------------------------------------------------------------------------------


def _saved(ctx):
    return [t.conj() if t is not None else None for t in ctx.saved_tensors]


def _setup_blockdiag_fwd(ctx, inputs, output):
    x, w, bias, n_out, activation, backend = inputs
    ctx.save_for_backward(x, w, bias)
    ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation


def _backward_blockdiag_fwd(ctx, g):
    return _blockdiag_fwd_grads(ctx, *ctx.saved_tensors, g, _call)


def _blockdiag_fwd_grads(ctx, x, w, bias, g, call):
    """Gradients of ``blockdiag_fwd`` for the cotangent ``g``; ``call(op, *args)`` runs the ops (through
    :func:`_call`, differentiable, or :func:`_direct_call`)."""
    if ctx.activation != "none":  # recompute the pre-activation instead of saving it
        pre = call(_blockdiag_fwd, x, w, bias, ctx.n_out, "none", ctx.backend)
        g = activations.backward(ctx.activation, pre, g)
    x, w = x.conj(), w.conj()
    k, q, p = w.shape
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = call(_blockdiag_fwd, g, w.transpose(1, 2), None, x.shape[-1], "none", ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = call(_blockdiag_wgrad, x, g, k, q, p, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = _flat(g).sum(0)
    return dx, dw, db, None, None, None


def _setup_blockdiag_wgrad(ctx, inputs, output):
    x, g, k, q, p, backend = inputs
    ctx.save_for_backward(x, g)
    ctx.backend = backend


def _backward_blockdiag_wgrad(ctx, h):
    # dw[kk] = Σ_t g_kk x_kkᵀ  =>  d/dx = BD(h)ᵀ g,  d/dg = BD(h) x.
    x, g = _saved(ctx)
    dx = dg = None
    if ctx.needs_input_grad[0]:
        dx = _call(_blockdiag_fwd, g, h.transpose(1, 2), None, x.shape[-1], "none", ctx.backend)
    if ctx.needs_input_grad[1]:
        dg = _call(_blockdiag_fwd, x, h, None, g.shape[-1], "none", ctx.backend)
    return dx, dg, None, None, None, None


def _setup_monarch_fwd(ctx, inputs, output):
    x, w1, w2, bias, n_out, activation, backend = inputs
    ctx.save_for_backward(x, w1, w2, bias)  # the stage-1 intermediate is recomputed in backward, not saved
    ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation


def _backward_monarch_fwd(ctx, g):
    return _monarch_fwd_grads(ctx, *ctx.saved_tensors, g, _call)


def _monarch_fwd_grads(ctx, x, w1, w2, bias, g, call):
    """Gradients of ``monarch_fwd`` for the cotangent ``g``; ``call(op, *args)`` runs the ops (through
    :func:`_call`, differentiable, or :func:`_direct_call`)."""
    need = ctx.needs_input_grad
    if ctx.activation != "none" and (need[1] or need[2]) and not torch.is_grad_enabled():
        # first-order with an activation: one epilogue call recomputes the pre-activation inside its pass
        dx, dw1, dw2, db = call(_monarch_bwd_epilogue, x, g, w1, w2, bias, x.shape[-1], ctx.activation, ctx.backend)
        return (dx if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None,
                db if ctx.has_bias and need[3] else None, None, None, None)
    if ctx.activation != "none":  # recompute the pre-activation instead of saving it
        pre = call(_monarch_fwd, x, w1, w2, bias, ctx.n_out, "none", ctx.backend)
        g = activations.backward(ctx.activation, pre, g)
    x, w1, w2 = x.conj(), w1.conj(), w2.conj()
    dx = dw1 = dw2 = db = None
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if need_x and need_w and not torch.is_grad_enabled():  # first-order backward: one fused call
        dx, dw1, dw2 = call(_monarch_bwd, x, g, w1, w2, x.shape[-1], ctx.backend)
    else:
        if need_x:
            dx = call(_monarch_bwd_input, g, w1, w2, x.shape[-1], ctx.backend)
        if need_w:
            dw1, dw2 = call(_monarch_bwd_weight, x, g, w1, w2, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = _flat(g).sum(0)
    return dx, dw1, dw2, db, None, None, None


def _vjp_bwd_input(g, w1, w2, h, need_g: bool, need_w: bool, backend: str):
    """Cotangents ``(dg, dw1, dw2)`` of ``a = Mᵀ g`` for the cotangent ``h`` of ``a`` (conjugated partners):
    ``⟨h, a⟩ = ⟨g, M h⟩``, so ``d/dg = M h`` and ``d/dw = ∇_w ⟨g, M h⟩``."""
    dg = dw1 = dw2 = None
    if h is None:
        return dg, dw1, dw2
    if need_g:
        dg = _call(_monarch_fwd, h, w1, w2, None, g.shape[-1], "none", backend)
    if need_w:
        dw1, dw2 = _call(_monarch_bwd_weight, h, g, w1, w2, backend)
    return dg, dw1, dw2


def _vjp_bwd_weight(x, g, w1, w2, h1, h2, needs: tuple, backend: str):
    """Cotangents ``(dx, dg, dw1, dw2)`` of ``(dw1, dw2) = ∇ ⟨g, M(w1, w2) x⟩`` for cotangents ``(h1, h2)``:
    the pairing is ``⟨g, M(h1, w2) x⟩ + ⟨g, M(w1, h2) x⟩``; ``needs`` flags ``(x, g, w1, w2)``."""
    n_in, n_out = x.shape[-1], g.shape[-1]
    pairs = []  # (stage-1, stage-2) factors of each term of the directional derivative
    if h1 is not None:
        pairs.append((h1, w2))
    if h2 is not None:
        pairs.append((w1, h2))
    dx = dg = dw1 = dw2 = None
    if needs[0] and pairs:
        dx = sum(_call(_monarch_bwd_input, g, a, c, n_in, backend) for a, c in pairs)
    if needs[1] and pairs:
        dg = sum(_call(_monarch_fwd, x, a, c, None, n_out, "none", backend) for a, c in pairs)
    if needs[2] and h2 is not None:
        dw1 = _call(_monarch_bwd_weight, x, g, w1, h2, backend)[0]
    if needs[3] and h1 is not None:
        dw2 = _call(_monarch_bwd_weight, x, g, h1, w2, backend)[1]
    return dx, dg, dw1, dw2


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _setup_monarch_bwd_input(ctx, inputs, output):
    g, w1, w2, n_in, backend = inputs
    ctx.save_for_backward(g, w1, w2)
    ctx.backend = backend


def _backward_monarch_bwd_input(ctx, h):
    g, w1, w2 = _saved(ctx)
    need = ctx.needs_input_grad
    dg, dw1, dw2 = _vjp_bwd_input(g, w1, w2, h, need[0], need[1] or need[2], ctx.backend)
    return dg, dw1, dw2, None, None


def _setup_monarch_bwd_weight(ctx, inputs, output):
    x, g, w1, w2, backend = inputs
    ctx.save_for_backward(x, g, w1, w2)
    ctx.backend = backend


def _backward_monarch_bwd_weight(ctx, h1, h2):
    x, g, w1, w2 = _saved(ctx)
    return (*_vjp_bwd_weight(x, g, w1, w2, h1, h2, ctx.needs_input_grad[:4], ctx.backend), None)


def _setup_monarch_bwd(ctx, inputs, output):
    x, g, w1, w2, n_in, backend = inputs
    ctx.save_for_backward(x, g, w1, w2)
    ctx.backend = backend


def _backward_monarch_bwd(ctx, hx, h1, h2):
    # the op is (monarch_bwd_input(g, w1, w2), *monarch_bwd_weight(x, g, w1, w2)): the sum of both pullbacks
    x, g, w1, w2 = _saved(ctx)
    need = ctx.needs_input_grad
    dg_a, dw1_a, dw2_a = _vjp_bwd_input(g, w1, w2, hx, need[1], need[2] or need[3], ctx.backend)
    dx, dg_b, dw1_b, dw2_b = _vjp_bwd_weight(x, g, w1, w2, h1, h2, need[:4], ctx.backend)
    dw1, dw2 = _add(dw1_a, dw1_b), _add(dw2_a, dw2_b)
    return dx, _add(dg_a, dg_b), dw1 if need[2] else None, dw2 if need[3] else None, None, None


# --------------------------------------------------------------------------------------------------
# registration: autograd (torch.library and torch.func), vmap
# --------------------------------------------------------------------------------------------------

#: token-parallel ops and the argument whose leading dims may absorb a vmapped dimension
_TOKEN_ARG = {"blockdiag_fwd": 0, "monarch_fwd": 0, "monarch_bwd_input": 0}
_FUNC_FUNCTIONS: dict = {}  # custom op -> its autograd.Function for torch.func transforms


def _call(op, *args):
    """Run custom op ``op``; under a ``torch.func`` transform through its ``autograd.Function`` twin."""
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        return _FUNC_FUNCTIONS[op].apply(*args)
    return op(*args)


def _vmap_rule(op, name: str) -> Callable:
    """vmap of ``op``: token-parallel ops fold the vmapped dim of their token input into its leading dims;
    any other batching (of weights, or of the reductions over tokens) runs one call per batch element."""
    token_arg = _TOKEN_ARG.get(name)

    def rule(info, in_dims, *args):
        batched = [i for i, d in enumerate(in_dims) if d is not None]
        if batched == [token_arg]:
            args = list(args)
            args[token_arg] = args[token_arg].movedim(in_dims[token_arg], 0)
            return op(*args), 0
        outs = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _functorch_function(op, name: str, setup_context: Callable, backward: Callable) -> type:
    def forward(*args):
        return op(*args)

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs arrive as None, as in the custom-op formula
        setup_context(ctx, inputs, output)

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "generate_vmap_rule": True,
    })


for _op, _setup, _backward in (
    (_blockdiag_fwd, _setup_blockdiag_fwd, _backward_blockdiag_fwd),
    (_blockdiag_wgrad, _setup_blockdiag_wgrad, _backward_blockdiag_wgrad),
    (_monarch_fwd, _setup_monarch_fwd, _backward_monarch_fwd),
    (_monarch_bwd_input, _setup_monarch_bwd_input, _backward_monarch_bwd_input),
    (_monarch_bwd_weight, _setup_monarch_bwd_weight, _backward_monarch_bwd_weight),
    (_monarch_bwd, _setup_monarch_bwd, _backward_monarch_bwd),
):
    _name = _op._name.split("::")[-1]
    _op.register_autograd(_backward, setup_context=_setup)
    _op.register_vmap(_vmap_rule(_op, _name))
    _FUNC_FUNCTIONS[_op] = _functorch_function(_op, _name, _setup, _backward)


# --------------------------------------------------------------------------------------------------
# eager autograd without the custom-op dispatch (route FUNCTION)
# --------------------------------------------------------------------------------------------------

_IMPLS = {  # custom op -> its implementation without validation (same arguments)
    _blockdiag_fwd: _blockdiag_fwd_impl,
    _blockdiag_wgrad: _blockdiag_wgrad_impl,
    _monarch_fwd: _monarch_fwd_impl,
    _monarch_bwd_input: _monarch_bwd_input_impl,
    _monarch_bwd_weight: _monarch_bwd_weight_impl,
    _monarch_bwd: _monarch_bwd_impl,
    _monarch_bwd_epilogue: _monarch_bwd_epilogue_impl,
}


def _direct_call(op, *args):
    """Run ``op``'s implementation directly: for first-order eager backwards, whose arguments the forward
    validated and whose results nothing records."""
    return _IMPLS[op](*args)


class _BlockdiagFwdEager(torch.autograd.Function):
    """``blockdiag_fwd`` for eager calls that autograd records: the op's formula (:func:`_blockdiag_fwd_grads`)
    without the custom-op dispatch. A first-order backward runs the implementations directly; a backward
    with ``create_graph=True`` runs the ops, so it is differentiable again."""

    @staticmethod
    def forward(ctx, x, w, bias, n_out, activation, backend):
        ctx.save_for_backward(x, w, bias)
        ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation
        return _blockdiag_fwd_impl(x, w, bias, n_out, activation, backend)

    @staticmethod
    def backward(ctx, g):
        return _blockdiag_fwd_grads(ctx, *ctx.saved_tensors, g, _call if torch.is_grad_enabled() else _direct_call)


class _MonarchFwdEager(torch.autograd.Function):
    """``monarch_fwd`` for eager calls that autograd records (see :class:`_BlockdiagFwdEager`). A backend with
    ``monarch_fwd_saving`` (the torch reference, Triton) keeps the stage-1 intermediate and hands it to its
    first-order backward (``monarch_bwd_epilogue``) when that needs the weight gradients or an activation's
    pre-activation (which it may have kept too); the others (and a saving forward that kept nothing) save
    what the custom op saves and run its formula."""

    @staticmethod
    def forward(ctx, x, w1, w2, bias, n_out, activation, backend):
        saving = getattr(backends.impl(backend), "monarch_fwd_saving", None)
        if saving is None:
            out, z, pre = _monarch_fwd_impl(x, w1, w2, bias, n_out, activation, backend), None, None
        else:
            out, z, pre = saving(_flat(x), w1, w2, bias, n_out, activation)
            out = _unflat(out, x.shape[:-1])
        ctx.save_for_backward(x, w1, w2, bias, z, pre)
        ctx.backend, ctx.has_bias, ctx.n_out, ctx.activation = backend, bias is not None, n_out, activation
        return out

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, bias, z, pre = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the differentiable formula (z is a constant here)
            return _monarch_fwd_grads(ctx, x, w1, w2, bias, g, _call)
        need = ctx.needs_input_grad
        want_dw = need[1] or need[2]
        # the saved z pays when weight gradients need it, or (frozen weights) to get an activation's
        # pre-activation from stage 2 alone (a saved pre-activation, from nothing); dx alone without an
        # activation needs neither
        if (z is None and pre is None) or not (want_dw or ctx.activation != "none"):
            return _monarch_fwd_grads(ctx, x, w1, w2, bias, g, _direct_call)
        # the real-case formula at conjugated partners (z too; pre is real: activations need real tensors)
        dx, dw1, dw2, db = _monarch_bwd_epilogue_impl(x.conj(), g, w1.conj(), w2.conj(), bias, x.shape[-1],
                                                      ctx.activation, ctx.backend, need[0],
                                                      None if z is None else z.conj(), want_dw, pre)
        return (dx, dw1 if need[1] else None, dw2 if need[2] else None, db if ctx.has_bias and need[3] else None,
                None, None, None)


class _MonarchMLPEager(torch.autograd.Function):
    """:func:`monarch_mlp` for eager calls that autograd records, on a backend with a fused MLP forward and
    backward (``monarch_mlp_fwd_saving``, ``monarch_mlp_bwd``): the forward keeps what the backward needs (the
    two layers' stage-1 intermediates, not the ``T × n_h`` hidden activation); the first-order backward runs
    the backend's fused one. A backward with ``create_graph=True`` recomputes the two layers through the ops and
    differentiates them (each op's own formulas, differentiable again)."""

    @staticmethod
    def forward(ctx, x, w1a, w2a, w1b, w2b, b1, b2, n_h, n_out, activation, backend):
        out, saved = backends.impl(backend).monarch_mlp_fwd_saving(_flat(x), w1a, w2a, b1, w1b, w2b, b2, n_h, n_out,
                                                                    activation)
        ctx.save_for_backward(x, w1a, w2a, w1b, w2b, b1, b2, *saved)
        ctx.n_h, ctx.n_out, ctx.activation, ctx.backend = n_h, n_out, activation, backend
        return _unflat(out, x.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        x, w1a, w2a, w1b, w2b, b1, b2, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:7]
        if torch.is_grad_enabled():  # create_graph: the layers recomputed and differentiated
            inputs = (x, w1a, w2a, w1b, w2b, b1, b2)
            wanted = [t for t, n in zip(inputs, need) if n]
            with torch.enable_grad():
                sh1 = MonarchShape.from_factors(w1a.shape, w2a.shape)
                sh2 = MonarchShape.from_factors(w1b.shape, w2b.shape)
                hidden = _dispatch_monarch(x, w1a, w2a, b1, sh1, ctx.n_h, ctx.activation, ctx.backend)
                out = _dispatch_monarch(hidden, w1b, w2b, b2, sh2, ctx.n_out, "none", ctx.backend)
            grads = iter(torch.autograd.grad(out, wanted, g, create_graph=True, allow_unused=True))
            return (*(next(grads) if n else None for n in need), None, None, None, None)
        dx, dw1a, dw2a, db1, dw1b, dw2b, db2 = backends.impl(ctx.backend).monarch_mlp_bwd(
            _flat(x), _flat(g), w1a, w2a, b1, w1b, w2b, b2 is not None, saved, ctx.activation, need[0], need[1:5])
        grads = (None if dx is None else _unflat(dx, x.shape[:-1]), dw1a, dw2a, dw1b, dw2b, db1, db2)
        return (*(t if n else None for t, n in zip(grads, need)), None, None, None, None)


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
    name = backends.resolve("blockdiag", x.device, x.dtype, (_tokens(x), x.shape[-1], n_out, p), backend,
                            _training(x, w, bias), act, bias is not None)
    route = _route(x, w, bias)
    if route == DIRECT:
        return _blockdiag_fwd_impl(x, w, bias, n_out, act, name)
    if route == FUNCTION:
        return _BlockdiagFwdEager.apply(x, w, bias, n_out, act, name)
    return _call(_blockdiag_fwd, x, w, bias, n_out, act, name)


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
    """Resolve the backend for validated arguments and run the forward op (on the route :func:`_route` picks)."""
    block = max(sh.p, sh.q, sh.r, sh.s)
    name = backends.resolve("monarch", x.device, x.dtype, (_tokens(x), x.shape[-1], n_out, block), backend,
                            _training(x, w1, w2, bias), act, bias is not None)
    route = _route(x, w1, w2, bias)
    if route == DIRECT:
        return _monarch_fwd_impl(x, w1, w2, bias, n_out, act, name)
    if route == FUNCTION:
        return _MonarchFwdEager.apply(x, w1, w2, bias, n_out, act, name)
    return _call(_monarch_fwd, x, w1, w2, bias, n_out, act, name)


def monarch_mlp(
    x: Tensor,
    fc1_w1: Tensor,
    fc1_w2: Tensor,
    fc2_w1: Tensor,
    fc2_w2: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_bias: Optional[Tensor] = None,
    *,
    activation: Optional[str] = "gelu",
    hidden_features: Optional[int] = None,
    out_features: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """A Monarch MLP ``fc2(act(fc1(x)))``, the same values as ``monarch_linear(monarch_linear(x, fc1_w1, fc1_w2,
    fc1_bias, out_features=hidden_features, activation=activation), fc2_w1, fc2_w2, fc2_bias,
    out_features=out_features)``.

    ``x (..., n_in)``; fc1 ``w1 (k1, q1, p1)``, ``w2 (l1, s1, r1)``: ``n_in -> n_h = hidden_features`` (default
    ``l1·s1``); fc2 ``w1 (k2, q2, p2)``, ``w2 (l2, s2, r2)``: ``n_h -> out_features`` (default ``l2·s2``),
    ``n_h ≤ k2·p2``; biases ``(n_h,)`` and ``(out_features,)`` or ``None``; ``activation`` as in
    :func:`monarch_linear`.

    In eager mode (outside ``torch.compile``), where the backend in effect (under ``auto`` on a GPU: Triton where
    the cost model prices the fused call below the two layers on their own picks,
    :func:`.gpu_dispatch.fused_mlp_wins`) has a fused MLP that takes the shapes (Triton,
    :mod:`monarch_kernels.triton.mlp`: fp16/bf16, ``n_in = k1·p1``, ``n_h = l1·s1 = k2·p2``, ``p2 % l1 == 0``
    with ``p2 / l1 ≥ 16``, ``q2 ≤ 256`` — e.g. a GPT-2 MLP 768 → 3072 → 768 with 4 blocks), the forward keeps
    the hidden activation ``(T, n_h)`` out of memory: fc1's stage 2, the bias, the activation and fc2's stage 1
    run as one kernel. A call autograd records (fc1's ``r1 ≤ 256`` too) keeps only the two stage-1
    intermediates, and its first-order backward recomputes the pre-activation inside one kernel that also
    applies the activation's derivative and fc1's stage-2 transpose; a backward with ``create_graph=True``
    recomputes and differentiates the two layers. Everywhere else the two layers run in turn.
    """
    fn = "monarch_mlp"
    check_tensor("x", x, fn)
    sh1 = check_monarch_factors(fn, fc1_w1, fc1_w2)
    sh2 = check_monarch_factors(fn, fc2_w1, fc2_w2)
    check_input_width(fn, x, sh1.n_in, True, f"fc1_w1 of shape {tuple(fc1_w1.shape)}")
    n_h = check_out_features(fn, hidden_features, sh1.n_out, "hidden_features")
    if n_h > sh2.n_in:
        raise ValueError(f"{fn}: the hidden width {n_h} (fc1_w2 of shape {tuple(fc1_w2.shape)}) exceeds fc2's "
                         f"input width k2·p2 = {sh2.n_in} (fc2_w1 of shape {tuple(fc2_w1.shape)})")
    n_out = check_out_features(fn, out_features, sh2.n_out)
    check_same(fn, x, fc1_w1=fc1_w1, fc2_w1=fc2_w1)
    check_bias(fn, fc1_bias, x, n_h)
    check_bias(fn, fc2_bias, x, n_out)
    act = _check_activation(fn, activation, x)
    tensors = (x, fc1_w1, fc1_w2, fc2_w1, fc2_w2, fc1_bias, fc2_bias)
    route = _route(*tensors)
    if route in (DIRECT, FUNCTION):
        training = route == FUNCTION
        name = _mlp_backend(x, sh1, sh2, n_h, n_out, act, backend, training, (fc1_bias is not None,
                                                                              fc2_bias is not None))
        impl = None if name is None else backends.impl(name)
        fusable = getattr(impl, "monarch_mlp_fusable", None)
        if fusable is not None and fusable(sh1, sh2, x.shape[-1], n_h, x.dtype, training):
            if training:
                return _MonarchMLPEager.apply(*tensors, n_h, n_out, act, name)
            out = impl.monarch_mlp_fwd(_flat(x), fc1_w1, fc1_w2, fc1_bias, fc2_w1, fc2_w2, fc2_bias, n_h, n_out, act)
            return _unflat(out, x.shape[:-1])
    hidden = _dispatch_monarch(x, fc1_w1, fc1_w2, fc1_bias, sh1, n_h, act, backend)
    return _dispatch_monarch(hidden, fc2_w1, fc2_w2, fc2_bias, sh2, n_out, "none", backend)


def _mlp_backend(x: Tensor, sh1: MonarchShape, sh2: MonarchShape, n_h: int, n_out: int, act: str,
                 backend: Optional[str], training: bool = False, biases: tuple = (False, False)) -> Optional[str]:
    """The backend whose fused MLP :func:`monarch_mlp` tries (its forward; with ``training`` its forward and
    backward), ``None`` for the layers in turn: the one requested (``backend=``, :func:`use_backend`,
    :func:`set_backend`); under ``auto`` on a CUDA device Triton where :func:`.gpu_dispatch.fused_mlp_wins`
    prices its fused hidden layer below the two layers on the backends ``auto`` picks for them (``biases``:
    whether fc1 and fc2 have one)."""
    requested = backends.get_backend() if backend is None else backend
    if requested != backends.AUTO:  # checked as for any call (available, supports the tensors); no rule runs
        return backends.resolve("monarch", x.device, x.dtype, (_tokens(x), x.shape[-1], n_h, 1), requested,
                                training)
    triton = backends.get("triton")
    if x.device.type != "cuda" or not (triton.available and triton.supports(x.device, x.dtype)):
        return None
    from . import cost_model as cm
    from .gpu_dispatch import fused_mlp_wins

    T = max(_tokens(x), 1)
    fc1 = cm.Problem(T, x.shape[-1], n_h, sh1, act, biases[0])
    fc2 = cm.Problem(T, n_h, n_out, sh2, bias=biases[1])
    picks = tuple(backends.resolve("monarch", x.device, x.dtype, (T, p.n_in, p.n_out, max(s.p, s.q, s.r, s.s)), None,
                                   training, p.activation, p.bias) for p, s in ((fc1, sh1), (fc2, sh2)))
    return "triton" if fused_mlp_wins(fc1, fc2, x.dtype, picks, training=training) else None


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


def resolve_backend(op: str, x: Tensor, *factors: Tensor, backend: Optional[str] = None,
                    activation: Optional[str] = None, bias: Optional[Tensor] = None) -> str:
    """The backend a call of ``op`` with these arguments would use: ``op="blockdiag"`` with one factor
    ``w (k, q, p)``, or ``op="monarch"`` with two factors ``w1 (k, q, p)``, ``w2 (l, s, r)`` (a training call,
    i.e. one autograd records, when any of them or ``bias`` requires grad and grad mode is on), with
    ``activation`` fused into its epilogue and ``bias`` added as in :func:`monarch_linear`."""
    fn = "resolve_backend"
    if op not in ("blockdiag", "monarch"):
        raise ValueError(f"{fn}: op must be 'blockdiag' or 'monarch', got {op!r}")
    check_tensor("x", x, fn)
    want = 1 if op == "blockdiag" else 2
    if len(factors) != want:
        names = "w (k, q, p)" if want == 1 else "w1 (k, q, p), w2 (l, s, r)"
        raise ValueError(f"{fn}: op {op!r} takes {want} factor{'s' if want > 1 else ''} ({names}), got {len(factors)}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., n_in), got a 0-d tensor")
    act = _check_activation(fn, activation, x)
    if op == "blockdiag":
        (w,) = factors
        check_factor("w", w, fn)
        dims = (_tokens(x), x.shape[-1], w.shape[0] * w.shape[1], w.shape[2])
    else:
        sh = check_monarch_factors(fn, *factors)
        dims = (_tokens(x), x.shape[-1], sh.n_out, max(sh.p, sh.q, sh.r, sh.s))
    if bias is not None:  # a call with out_features = len(bias) (monarch_linear truncates to it)
        check_tensor("bias", bias, fn)
        if bias.dim() != 1 or not 1 <= bias.shape[0] <= dims[2]:
            raise ValueError(f"{fn}: bias has shape {tuple(bias.shape)}, expected (out_features,) with "
                             f"1 <= out_features <= {dims[2]}")
        check_same(fn, x, bias=bias)
        dims = (dims[0], dims[1], bias.shape[0], dims[3])
    return backends.resolve(op, x.device, x.dtype, dims, backend, _training(x, *factors, bias), act,
                            bias is not None)
