"""``torch.compile(fullgraph=True)`` with a dynamic batch: one graph per layer on every backend (D7).

The backend is chosen while Dynamo traces and baked into the graph as a constant, without consulting the
input's sizes, so neither the CPU token-count rule (thresholds at 4, 32, 64, 256, 1024 tokens) nor lazy loading
of a backend adds guards that would recompile the layer when the batch size crosses a threshold.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import monarch_kernels as mk
from monarch_kernels.layers import BlockdiagLinear, MonarchLinear
from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKENDS = ["auto"] + [b for b in ("torch", "cpu", "triton") if mk.available_backends()[b] == "available"]


def _batches(backend):
    # the interpreter is slow: small batches; the others cross every threshold of the CPU rule
    return (2, 5, 40) if backend == "triton" else (2, 5, 40, 70, 300, 1100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["monarch", "blockdiag"])
def test_one_graph_per_layer_with_dynamic_batch(layer, backend):
    torch._dynamo.reset()
    # blocks of 128 in fp32: the CPU rule depends on the token count for these (below 64 / from 1024)
    name = None if backend == "auto" else backend
    if layer == "monarch":
        module = MonarchLinear(256, 256, nblocks=2, backend=name)
    else:
        module = BlockdiagLinear(256, 256, nblocks=2, backend=name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for T in _batches(backend):
        x = torch.randn(T, 256, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        out = compiled(x)
        expect = module(x)
        assert rel_err(out, expect) < 1e-5
        (gx,) = torch.autograd.grad(out.sum(), x)
        (ex,) = torch.autograd.grad(expect.sum(), x)
        assert rel_err(gx, ex) < 1e-5
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for one layer"


def test_compiled_calls_take_the_large_batch_branch_of_the_cpu_rule():
    """Under torch.compile the token count reaches the rule as None (unbounded): fp32 Monarch with blocks of
    128 goes to the C++ kernels (as from 1024 tokens), never guarding on the size."""
    from monarch_kernels.cpu_dispatch import prefers_cpu_kernel

    assert prefers_cpu_kernel("monarch", torch.float32, (None, 256, 256, 128))
    assert not prefers_cpu_kernel("monarch", torch.float32, (None, 4096, 4096, 2048))  # as from 32 tokens
    assert prefers_cpu_kernel("monarch", torch.float16, (None, 256, 256, 128))
    assert not prefers_cpu_kernel("monarch", torch.bfloat16, (None, 256, 256, 128))


def test_compiling_before_any_backend_is_loaded():
    """The first call of a fresh process may be a compiled one: resolving the backend then loads it at trace
    time without Dynamo tracing the loader (on main this was a graph break in register_fake), one graph. The
    import does not load Dynamo (1.1 s); the backend choice is still a trace-time constant when it comes later."""
    code = (
        "import sys, torch\n"
        "from monarch_kernels.layers import MonarchLinear\n"
        "assert 'torch._dynamo' not in sys.modules, 'import monarch_kernels loaded torch._dynamo'\n"
        "from torch._dynamo.testing import CompileCounterWithBackend\n"
        "layer = MonarchLinear(256, 256, nblocks=2)\n"
        "counter = CompileCounterWithBackend('aot_eager')\n"
        "compiled = torch.compile(layer, backend=counter, fullgraph=True)\n"
        "for T in (3, 70, 1100):\n"
        "    x = torch.randn(T, 256)\n"
        "    torch._dynamo.mark_dynamic(x, 0)\n"
        "    assert torch.allclose(compiled(x), layer(x), rtol=1e-5, atol=1e-5)\n"
        "print('graphs', counter.frame_count)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "graphs 1" in res.stdout


def test_trace_time_resolution_is_marked_as_torch_marks_it():
    """backends._assume_constant_result stands in for torch.compiler.assume_constant_result (which imports Dynamo):
    both must leave a function with the same attributes, or Dynamo would trace the registry and guard on it."""
    from monarch_kernels import backends

    def ours():
        return 1

    def torchs():
        return 1

    backends._assume_constant_result(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) and vars(ours)
