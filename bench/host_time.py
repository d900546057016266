"""Host time of the Triton backend's own code per call, measured without a GPU.

``python -m bench.host_time`` runs the backend's host functions (:mod:`monarch_kernels.triton`) on ``meta``
tensors, sized as on an H100 (:func:`bench.kernel_audit.triton_part.h100_host`), with every kernel launch
replaced by a no-op that only records it: what is left is what our Python costs per call (path and tile
choice, plans, buffer allocation, argument tuples) and the torch operations it calls (allocations, views,
cuBLAS ``bmm``, reductions), which every eager call pays before Triton's own launcher (binder, cache lookup,
driver call) runs. On ``meta`` tensors some torch operations (``bmm``, ``sum``) run Python meta functions, slower
than CUDA's C++ dispatch, so each row also counts the aten operations a call dispatches (``torch_ops``).
``--triton`` also times that launcher's Python part (``run`` with ``warmup=True`` on a kernel compiled offline
for sm_90: argument binding, specialisation key and cache lookup, everything but the driver call) for one
launch of each kernel the first case makes.

Measured on the H200's host (2026-11-30, ``bench/RESULTS.md`` §8) a Triton forward at 16 tokens cost ~300 µs of
host time against 26 µs for dense ``F.linear``; this tool tracks our share of that on any machine. Times are
medians of ``--rounds`` rounds of ``--calls`` calls each; this machine's CPU speed sets the scale, so compare
rows measured side by side in one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

#: (label, T, n_in, n_out, nblocks, activation): a decode-sized and a large square layer, a small square one on
#: the fused path (``auto`` takes it at 1024/32 up to 64 tokens), GPT-2's fc1 and fc2
LAYERS = [("4096/64", 16, 4096, 4096, 64, "none"), ("4096/64", 16384, 4096, 4096, 64, "none"),
          ("1024/32 fused", 64, 1024, 1024, 32, "none"),
          ("768->3072/4 +gelu", 16384, 768, 3072, 4, "gelu"), ("3072->768/4", 16384, 3072, 768, 4, "none")]


def cases(dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, Callable[[], object]]]:
    """``(label, call)`` for each layer of :data:`LAYERS` (forward; saving forward and fused backward) and the
    GPT-2 MLP (fused forward; saving forward and fused backward), on ``meta`` tensors."""
    import monarch_kernels as mk
    from monarch_kernels import triton as backend

    meta = lambda *s: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    out = []
    for label, T, n_in, n_out, nb, act in LAYERS:
        sh = mk.monarch_factor_shapes(n_in, n_out, nb)
        x, g, b, w1, w2 = meta(T, n_in), meta(T, n_out), meta(n_out), meta(*sh.w1_shape), meta(*sh.w2_shape)

        def step(x=x, g=g, b=b, w1=w1, w2=w2, n_in=n_in, n_out=n_out, act=act):
            _, z, pre = backend.monarch_fwd_saving(x, w1, w2, b, n_out, act)
            return backend.monarch_bwd_epilogue(x, g, w1, w2, b, n_in, act, True, z=z, pre=pre)

        out.append((f"T={T} {label} forward", lambda x=x, w1=w1, w2=w2, b=b, n_out=n_out, act=act:
                    backend.monarch_fwd(x, w1, w2, b, n_out, act)))
        out.append((f"T={T} {label} forward+backward", step))
    T, n, h = 16384, 768, 3072
    sh1, sh2 = mk.monarch_factor_shapes(n, h, 4), mk.monarch_factor_shapes(h, n, 4)
    x, g, b2 = meta(T, n), meta(T, n), meta(n)
    w = (meta(*sh1.w1_shape), meta(*sh1.w2_shape), meta(h), meta(*sh2.w1_shape), meta(*sh2.w2_shape))
    if backend.monarch_mlp_fusable(sh1, sh2, n, h, dtype, training=True):
        def mlp_step():
            _, saved = backend.monarch_mlp_fwd_saving(x, *w, b2, h, n, "gelu")
            return backend.monarch_mlp_bwd(x, g, *w, True, saved, "gelu")

        out.append((f"T={T} GPT-2 MLP 768->3072->768/4 fused forward",
                    lambda: backend.monarch_mlp_fwd(x, *w, b2, h, n, "gelu")))
        out.append((f"T={T} GPT-2 MLP 768->3072->768/4 fused forward+backward", mlp_step))
    return out


def _median_us(fn: Callable[[], object], calls: int, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _torch_ops(fn: Callable[[], object]) -> int:
    """How many aten operations (allocations, views, ``bmm``, reductions) one call of ``fn`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def measure(calls: int = 200, rounds: int = 5, only: str = "") -> list[dict]:
    """One row per case: host µs per call (our Python and the torch operations it calls, on ``meta`` tensors),
    the kernel launches it makes (Triton's launcher not run) and the torch operations it dispatches."""
    from monarch_kernels.triton import blockdiag

    from bench.kernel_audit.triton_part import h100_host

    launched: list = []
    kind = type(blockdiag._bd_fwd_kernel)  # JITFunction; the interpreter's own under TRITON_INTERPRET=1
    original = kind.run

    def no_launch(self, *args, grid, warmup, **kwargs):
        launched.append(self.fn.__name__)

    rows = []
    kind.run = no_launch
    try:
        with h100_host():
            for label, fn in cases():
                if only and only not in label:
                    continue
                launched.clear()
                fn()
                kernels = list(launched)
                rows.append(dict(case=label, host_us=round(_median_us(fn, calls, rounds), 1),
                                 launches=len(kernels), torch_ops=_torch_ops(fn), kernels=sorted(set(kernels))))
    finally:
        kind.run = original
    return rows


def triton_launcher_us(calls: int = 500) -> list[dict]:
    """Triton's own per-launch Python (``JITFunction.run`` with ``warmup=True``, kernel cached) for each launch of
    the first case, compiled offline for sm_90 (:func:`bench.kernel_audit.offline.compile_only`)."""
    from triton.runtime import jit

    from bench.kernel_audit.offline import compile_only
    from bench.kernel_audit.triton_part import h100_host

    label, fn = cases()[0]
    recorded = []
    original = jit.JITFunction.run
    with h100_host(), compile_only():
        fn()  # compiles every kernel the case launches
        jit.JITFunction.run = lambda self, *args, grid, warmup, **kwargs: recorded.append((self, args, kwargs))
        try:
            fn()
        finally:
            jit.JITFunction.run = original
        rows = []
        for kernel, args, kwargs in recorded:
            run = lambda: original(kernel, *args, grid=(1,), warmup=True, **kwargs)  # noqa: E731
            rows.append(dict(case=f"{label}: Triton launcher, {kernel.__name__}", args=len(args) + len(kwargs),
                             host_us=round(_median_us(run, calls, 5), 1)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default="", help="cases whose label contains this")
    p.add_argument("--triton", action="store_true", help="also time Triton's launcher (compiles for sm_90 offline)")
    args = p.parse_args(argv)
    rows = measure(args.calls, args.rounds, args.only)
    if args.triton:
        rows += triton_launcher_us()
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
