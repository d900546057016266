"""Op-level sweep: dense ``F.linear`` (cuBLAS / MKL) vs Monarch on every available backend.

For each problem ``(T tokens, n_in -> n_out, nblocks)`` (Monarch factors as in ``MonarchLinear``) it times
the forward and forward+backward passes and derives, from the *ideal* traffic and work of each layer:

* FLOPs: dense ``2·T·n_in·n_out``; Monarch ``2·T·(|w1| + |w2|)`` (×3 for forward+backward);
* bytes (minimum traffic, each tensor touched once per pass): forward ``x + y + weights``;
  forward+backward ``3·x + 2·y + 3·weights`` (x read twice and dx written, y written and dy read,
  weights read twice and their gradient written).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import monarch_kernels as mk

from .timing import device_time_us, median_time_us


@dataclass(frozen=True)
class Problem:
    tokens: int
    n_in: int
    n_out: int
    nblocks: int

    @property
    def label(self) -> str:
        return f"T={self.tokens} {self.n_in}->{self.n_out} nb={self.nblocks}"

    @classmethod
    def parse(cls, text: str) -> "Problem":
        """``"T:n_in:n_out:nblocks"`` (or ``"T:n:nblocks"`` for square)."""
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 3:
            parts = [parts[0], parts[1], parts[1], parts[2]]
        if len(parts) != 4 or min(parts) < 1:
            raise ValueError(f"shape {text!r}: expected T:n_in:n_out:nblocks or T:n:nblocks with positive ints")
        return cls(*parts)


CPU_SHAPES = ["2048:1024:1024:4", "2048:1024:1024:32", "2048:768:3072:4", "2048:3072:768:4",
              "512:4096:4096:64", "16:2048:2048:16"]
CPU_QUICK = ["512:1024:1024:4", "512:1024:1024:32", "512:768:3072:4", "16:2048:2048:16"]
GPU_SHAPES = [f"{T}:{s}" for T in (16384, 65536) for s in ("1024:1024:32", "2048:2048:32", "4096:4096:64",
                                                              "768:3072:4", "3072:768:4")] + ["16:4096:4096:64"]
GPU_QUICK = ["16384:1024:1024:32", "16384:4096:4096:64", "16384:768:3072:4", "16:4096:4096:64"]


def default_shapes(device: torch.device, quick: bool) -> list[str]:
    if device.type == "cuda":
        return GPU_QUICK if quick else GPU_SHAPES
    return CPU_QUICK if quick else CPU_SHAPES


@dataclass
class Row:
    shape: str
    dtype: str
    impl: str
    mode: str
    us: float
    gbs: float
    tflops: float
    pct_copy_bw: float
    speedup_vs_dense: float = float("nan")
    speedup_vs_torch: float = float("nan")
    device_us: float = float("nan")  # kernel time alone (CUDA): ``us`` also waits for the host

    def asdict(self):
        return asdict(self)


def _grad_step(fn: Callable, inputs: list, grad: torch.Tensor) -> Callable:
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    return step


def run_problem(prob: Problem, dtype: torch.dtype, device: torch.device, impls: list[str], modes: list[str],
                copy_gbs: float, budget_s: float) -> list[Row]:
    sh = mk.monarch_factor_shapes(prob.n_in, prob.n_out, prob.nblocks)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(prob.tokens, prob.n_in)
    W = rand(prob.n_out, prob.n_in, scale=prob.n_in ** -0.5)
    w1 = rand(*sh.w1_shape, scale=sh.p ** -0.5)
    w2 = rand(*sh.w2_shape, scale=sh.r ** -0.5)
    gy = rand(prob.tokens, prob.n_out)
    elt = x.element_size()
    monarch_numel = w1.numel() + w2.numel()
    rows = []
    for impl in impls:
        if impl == "dense":
            weights, flops_fwd, n_w = [W], 2 * prob.tokens * prob.n_in * prob.n_out, W.numel()
            fwd = lambda: F.linear(x, W)
        else:
            weights, flops_fwd, n_w = [w1, w2], 2 * prob.tokens * monarch_numel, monarch_numel
            fwd = lambda b=impl: mk.monarch_linear(x, w1, w2, out_features=prob.n_out, backend=b)
        for mode in modes:
            kernels = float("nan")
            if mode == "fwd":
                with torch.no_grad():
                    us = median_time_us(fwd, device, budget_s=budget_s)
                    if device.type == "cuda":
                        kernels = device_time_us(fwd)
                flops, nbytes = flops_fwd, elt * (prob.tokens * (prob.n_in + prob.n_out) + n_w)
            else:
                for t in [x, *weights]:
                    t.requires_grad_(True)
                step = _grad_step(fwd, [x, *weights], gy)
                us = median_time_us(step, device, budget_s=budget_s)
                if device.type == "cuda":
                    kernels = device_time_us(step)
                for t in [x, *weights]:
                    t.requires_grad_(False)
                    t.grad = None
                flops, nbytes = 3 * flops_fwd, elt * (prob.tokens * (3 * prob.n_in + 2 * prob.n_out) + 3 * n_w)
            gbs = nbytes / (us * 1e-6) / 1e9
            rows.append(Row(prob.label, str(dtype).replace("torch.", ""), impl, mode, us, gbs,
                            flops / (us * 1e-6) / 1e12, 100 * gbs / copy_gbs, device_us=kernels))
    for r in rows:
        dense = next((d for d in rows if d.impl == "dense" and d.mode == r.mode), None)
        ref = next((d for d in rows if d.impl == "torch" and d.mode == r.mode), None)
        if dense is not None:
            r.speedup_vs_dense = dense.us / r.us
        if ref is not None and r.impl != "dense":
            r.speedup_vs_torch = ref.us / r.us
    return rows


def monarch_backends(device: torch.device, dtype: torch.dtype, requested: Optional[list[str]]) -> list[str]:
    """Backends that can run on ``device``/``dtype`` (all available ones unless ``requested``)."""
    from monarch_kernels import backends as registry

    names = requested or [n for n, s in mk.available_backends().items() if s == "available"]
    usable = []
    for n in names:
        b = registry.get(n)
        if b.available and b.supports(device, dtype):
            usable.append(n)
        elif requested:
            raise SystemExit(f"backend {n!r} cannot run {dtype} on {device}: {mk.available_backends()[n]}")
    return usable
