"""``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch with static and dynamic
shapes) on every registered op: the six Python custom ops on every available backend, and the six compiled
ops of the C++ extension, four samples each (ragged widths, p = 1 / q = 1, leading dims, zero tokens, bias and
activation), with and without ``requires_grad``."""
import pytest
import torch

import monarch_kernels as mk
from monarch_kernels import activations, ext

BACKENDS = [b for b in ("torch", "cpu", "triton") if mk.available_backends()[b] == "available"]
DTYPE = {"torch": torch.float64, "cpu": torch.float64, "triton": torch.float32}
PY = torch.ops.monarch_kernels


def _t(*shape, dtype, grad):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# (w1 shape, w2 shape, leading dims of x, n_in, n_out): MonarchLinear-style, q % l != 0, p = q = 1, zero tokens
MONARCH = [((4, 5, 8), (4, 6, 5), (3,), 30, 22), ((3, 4, 2), (2, 3, 6), (2, 3), 6, 6),
           ((2, 1, 1), (1, 3, 2), (5,), 1, 2), ((2, 4, 4), (2, 4, 4), (0,), 8, 7)]
# (w shape, leading dims, n_in, n_out)
BLOCKDIAG = [((4, 7, 8), (3,), 30, 26), ((2, 3, 4), (2, 3), 8, 6), ((3, 1, 1), (5,), 2, 3), ((2, 3, 3), (0,), 6, 5)]
ACTS = ["gelu", "none", "relu", "gelu_tanh"]


def python_samples(op: str, backend: str, grad: bool):
    dt = DTYPE[backend]
    t = lambda *s: _t(*s, dtype=dt, grad=grad)
    for i, ((s1, s2, lead, n_in, n_out), (w, blead, bn_in, bn_out)) in enumerate(zip(MONARCH, BLOCKDIAG)):
        bias = t(n_out) if i % 2 == 0 else None
        if op == "monarch_fwd":
            yield (t(*lead, n_in), t(*s1), t(*s2), bias, n_out, ACTS[i], backend)
        elif op == "monarch_bwd_input":
            yield (t(*lead, n_out), t(*s1), t(*s2), n_in, backend)
        elif op == "monarch_bwd_weight":
            yield (t(*lead, n_in), t(*lead, n_out), t(*s1), t(*s2), backend)
        elif op == "monarch_bwd":
            yield (t(*lead, n_in), t(*lead, n_out), t(*s1), t(*s2), n_in, backend)
        elif op == "blockdiag_fwd":
            yield (t(*blead, bn_in), t(*w), t(bn_out) if i % 2 == 0 else None, bn_out, ACTS[i], backend)
        else:  # blockdiag_wgrad
            yield (t(*blead, bn_in), t(*blead, bn_out), *w, backend)


PY_OPS = ["blockdiag_fwd", "blockdiag_wgrad", "monarch_fwd", "monarch_bwd_input", "monarch_bwd_weight", "monarch_bwd"]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PY_OPS)
def test_opcheck_python_ops(op, backend, grad):
    for args in python_samples(op, backend, grad):
        torch.library.opcheck(getattr(PY, op).default, args)


#: how many leading arguments of each op are token inputs (x and/or g)
TOKEN_ARGS = {"blockdiag_fwd": 1, "blockdiag_wgrad": 2, "monarch_fwd": 1, "monarch_bwd_input": 1,
              "monarch_bwd_weight": 2, "monarch_bwd": 2}


def ext_samples(op: str, grad: bool):
    """The Python samples as the compiled ops take them: 2-D token inputs, an integer activation code, no backend."""
    for args in python_samples(op, "torch", grad):
        args = list(args[:-1])
        for i in range(TOKEN_ARGS[op]):
            args[i] = args[i].detach().reshape(-1, args[i].shape[-1]).requires_grad_(grad)
        if op in ("monarch_fwd", "blockdiag_fwd"):
            args[-1] = activations.CODES[args[-1]]
        yield tuple(args)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu extension not built")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("op", PY_OPS)
def test_opcheck_compiled_ops(op, grad):
    ext.load()
    for args in ext_samples(op, grad):
        torch.library.opcheck(getattr(torch.ops.monarch_kernels_ext, op).default, args)
