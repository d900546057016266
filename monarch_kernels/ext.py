"""The compiled extension (``monarch_kernels._C``, sources in ``csrc/``) as the ``cpu`` and ``cuda`` backends.

The extension registers its kernels as ``torch.ops.monarch_kernels_ext.*`` through ``TORCH_LIBRARY``, with
argument checks and autograd in C++ (``csrc/ops.cpp``); this module adds fake (meta) implementations for them,
which run the same checks as the C++ ones (through :mod:`monarch_kernels.shapes`), and adapts them to the
backend primitives (plus ``monarch_bwd_act``, the first-order backward with a fused activation).
"""
from __future__ import annotations

import contextlib

import torch

from . import shapes
from .activations import CODES

_loaded = None


def load():
    """Import the extension once; raises ImportError with the reason when it was not built."""
    global _loaded
    if _loaded is None:
        try:
            from . import _C
        except ImportError as exc:
            raise ImportError(
                f"the C++ extension monarch_kernels._C is not built ({exc}); reinstall with a C++ compiler "
                "(pip install --no-build-isolation -e .)"
            ) from exc
        _register_fakes()
        _loaded = _C
    return _loaded


def built_with_cuda() -> bool:
    return bool(load().with_cuda)


DECODE_KERNELS = ("auto", "cooperative", "rowsplit")
MANY_TOKEN_KERNELS = ("resident", "tiles")


@contextlib.contextmanager
def _kernel_choice(fn: str, setter: str, name: str, names: tuple):
    """Within the block, the extension's process-wide kernel choice ``setter`` is ``name``; restored after."""
    if name not in names:
        raise ValueError(f"{fn}: name={name!r} must be one of {names}")
    if not built_with_cuda():
        raise RuntimeError(f"{fn}: the extension was built without CUDA")
    before = getattr(load(), setter)(name)
    try:
        yield
    finally:
        getattr(load(), setter)(before)


def decode_kernel(name: str):
    """Within the block, the CUDA backend's few-token Monarch forward is ``name``: ``"auto"`` / ``"cooperative"``
    (the default: both stages in one cooperative launch with a grid barrier, measured on an H200) or
    ``"rowsplit"`` (``csrc/cuda/decode_rowsplit.cuh``: one ordinary launch without a barrier, each CTA computing
    the stage-1 rows its stage-2 block needs; checked on the CPU emulation, not yet run on a GPU), where its plan
    takes the call. Process-wide (not per thread or stream); a CUDA graph keeps the kernel it captured."""
    return _kernel_choice("decode_kernel", "set_decode_kernel", name, DECODE_KERNELS)


def many_token_kernel(name: str):
    """Within the block, the CUDA backend's Monarch forward past the few-token kernels is ``name``:
    ``"resident"`` (the default: both factors in shared memory, x read and the output written once — one
    persistent CTA per SM, ``csrc/cuda/resident.cuh``, or for square Monarch with 16/32/64 blocks past one SM a
    thread-block cluster, ``csrc/cuda/cluster_resident.cuh``; fp16/bf16 where their plans take the call, the tile
    kernels elsewhere; checked on the CPU emulation, not yet run on a GPU) or ``"tiles"`` (always the tile kernels of
    ``csrc/cuda/monarch_kernels.cu``), e.g. to time them side by side. Process-wide, like :func:`decode_kernel`."""
    return _kernel_choice("many_token_kernel", "set_many_token_kernel", name, MANY_TOKEN_KERNELS)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_2d(fn: str, **tensors) -> None:
    """The compiled ops take 2-D token inputs of a real floating dtype (the factors must match it)."""
    for name, t in tensors.items():
        shapes.check_tensor(name, t, fn)
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected (tokens, n)")
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; the compiled kernels take float16, bfloat16, "
                            "float32 or float64")


def _check_act(fn: str, act) -> None:
    if act not in CODES.values() or isinstance(act, bool):
        raise ValueError(f"{fn}: act={act!r} must be an activation code {dict((v, k) for k, v in CODES.items())}")


def _register_fakes() -> None:
    """Fake implementations with the C++ ops' checks (the compiled checks run at the BackendSelect key, below
    the Python key at which fake tensors are handled)."""
    lib = "monarch_kernels_ext"

    @torch.library.register_fake(f"{lib}::blockdiag_fwd")
    def _(x, w, bias, n_out, act):
        fn = f"{lib}::blockdiag_fwd"
        _check_2d(fn, x=x)
        shapes.check_blockdiag_op(fn, x, w, bias, n_out)
        _check_act(fn, act)
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{lib}::blockdiag_wgrad")
    def _(x, g, k, q, p):
        fn = f"{lib}::blockdiag_wgrad"
        _check_2d(fn, x=x, g=g)
        shapes.check_blockdiag_wgrad_op(fn, x, g, k, q, p)
        return x.new_empty(k, q, p)

    @torch.library.register_fake(f"{lib}::monarch_fwd")
    def _(x, w1, w2, bias, n_out, act):
        fn = f"{lib}::monarch_fwd"
        _check_2d(fn, x=x)
        shapes.check_monarch_op(fn, w1, w2, x=x, bias=bias, n_out=n_out)
        _check_act(fn, act)
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{lib}::monarch_bwd_input")
    def _(g, w1, w2, n_in):
        fn = f"{lib}::monarch_bwd_input"
        _check_2d(fn, g=g)
        shapes.check_monarch_op(fn, w1, w2, g=g, n_in=n_in)
        return g.new_empty(g.shape[0], n_in)

    @torch.library.register_fake(f"{lib}::monarch_bwd_weight")
    def _(x, g, w1, w2):
        fn = f"{lib}::monarch_bwd_weight"
        _check_2d(fn, x=x, g=g)
        shapes.check_monarch_op(fn, w1, w2, x=x, g=g)
        return w1.new_empty(w1.shape), w2.new_empty(w2.shape)

    @torch.library.register_fake(f"{lib}::monarch_bwd")
    def _(x, g, w1, w2, n_in):
        fn = f"{lib}::monarch_bwd"
        _check_2d(fn, x=x, g=g)
        shapes.check_monarch_op(fn, w1, w2, x=x, g=g, n_in=n_in)
        return g.new_empty(g.shape[0], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape)

    @torch.library.register_fake(f"{lib}::monarch_bwd_act")
    def _(x, g, w1, w2, bias, n_in, act):
        fn = f"{lib}::monarch_bwd_act"
        _check_2d(fn, x=x, g=g)
        shapes.check_monarch_op(fn, w1, w2, x=x, g=g, n_in=n_in, bias=bias, n_out=g.shape[1])
        _check_act(fn, act)
        return (g.new_empty(g.shape[0], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape),
                g.new_empty(g.shape[1]))


def _ops():
    load()
    return torch.ops.monarch_kernels_ext


class Primitives:
    """The five backend primitives on top of the compiled ops (same for the CPU and CUDA dispatch keys)."""

    @staticmethod
    def blockdiag_fwd(x, w, bias, n_out, activation="none"):
        return _ops().blockdiag_fwd(x, w, bias, n_out, CODES[activation])

    @staticmethod
    def blockdiag_wgrad(x, g, k, q, p):
        return _ops().blockdiag_wgrad(x, g, k, q, p)

    @staticmethod
    def monarch_fwd(x, w1, w2, bias, n_out, activation="none"):
        return _ops().monarch_fwd(x, w1, w2, bias, n_out, CODES[activation])

    @staticmethod
    def monarch_fwd_saving(x, w1, w2, bias, n_out, activation="none"):
        """``(out, z, None)``, the forward of an eager training call. On CUDA, where a resident kernel runs the
        forward (``csrc/cuda/resident.cuh``, ``cluster_resident.cuh``: fp16/bf16 shapes its plans take) and the
        Triton backend can run the backward, it also stores the stage-1 intermediate ``z (T, k·q)`` (stage 2's
        column order, row-major: ``T·k·q`` more bytes written, no recompute later) for
        :meth:`monarch_bwd_epilogue`; ``z`` is ``None`` elsewhere (the backward then recomputes what it needs)."""
        if x.device.type == "cuda" and _triton_backward_available(x):
            out, z = load().monarch_fwd_keeping(x, w1, w2, bias, n_out, CODES[activation])
            return out, z, None
        return Primitives.monarch_fwd(x, w1, w2, bias, n_out, activation), None, None

    @staticmethod
    def monarch_bwd_input(g, w1, w2, n_in):
        return _ops().monarch_bwd_input(g, w1, w2, n_in)

    @staticmethod
    def monarch_bwd_weight(x, g, w1, w2):
        return tuple(_ops().monarch_bwd_weight(x, g, w1, w2))

    @staticmethod
    def monarch_bwd(x, g, w1, w2, n_in):
        """(dx, dw1, dw2) in one pass on CPU; the CUDA kernels compose the two separate ones."""
        if x.device.type == "cpu":
            return tuple(_ops().monarch_bwd(x, g, w1, w2, n_in))
        return (_ops().monarch_bwd_input(g, w1, w2, n_in), *_ops().monarch_bwd_weight(x, g, w1, w2))

    @staticmethod
    def monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, want_dx, z=None, want_dw=True, pre=None):
        """(dx, dw1, dw2, db) of ``⟨g, act(M x + bias)⟩``. Given the intermediate ``z`` that
        :meth:`monarch_fwd_saving` kept (a resident CUDA forward), the Triton backend's backward kernels on it
        (:func:`monarch_kernels.triton.monarch_bwd_epilogue`: ``dw2`` reads ``z``, an activation's pre-activation
        is stage 2 of ``z``; this backend's own large-token backward, the tile kernels, is slower). Without ``z``,
        on CPU with an activation: one pass that gets the pre-activation from one stage-2 GEMM per row tile (dx,
        db and the weight gradients computed even when not wanted). None otherwise: the caller composes it."""
        if z is not None:
            from . import triton as triton_backend

            return triton_backend.monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, want_dx, z, want_dw,
                                                       pre)
        if x.device.type != "cpu" or activation == "none":
            return None
        return tuple(_ops().monarch_bwd_act(x, g, w1, w2, bias, n_in, CODES[activation]))


def _triton_backward_available(x) -> bool:
    """Whether the Triton backend can run the backward of a call on ``x``'s device and dtype (the reader of a kept
    intermediate)."""
    from . import backends

    triton = backends.get("triton")
    return triton.available and triton.supports(x.device, x.dtype)
