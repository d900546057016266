"""The compiled extension (``monarch_kernels._C``, sources in ``csrc/``) as the ``cpu`` and ``cuda`` backends.

The extension registers its kernels as ``torch.ops.monarch_kernels_ext.*`` through ``TORCH_LIBRARY``; this
module adds fake (meta) implementations for them and adapts them to the five backend primitives.
"""
from __future__ import annotations

import torch

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


def _register_fakes() -> None:
    lib = "monarch_kernels_ext"

    @torch.library.register_fake(f"{lib}::blockdiag_fwd")
    def _(x, w, bias, n_out, act):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{lib}::blockdiag_wgrad")
    def _(x, g, k, q, p):
        return x.new_empty(k, q, p)

    @torch.library.register_fake(f"{lib}::monarch_fwd")
    def _(x, w1, w2, bias, n_out, act):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake(f"{lib}::monarch_bwd_input")
    def _(g, w1, w2, n_in):
        return g.new_empty(g.shape[0], n_in)

    @torch.library.register_fake(f"{lib}::monarch_bwd_weight")
    def _(x, g, w1, w2):
        return w1.new_empty(w1.shape), w2.new_empty(w2.shape)

    @torch.library.register_fake(f"{lib}::monarch_bwd")
    def _(x, g, w1, w2, n_in):
        return g.new_empty(g.shape[0], n_in), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


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
